"""Guide step 14: the replication software's configuration (JSON read by `failback-replicator --config`).

Written from what the earlier steps settled: the recovery instance, where its agent listens (the replication
endpoint DRS gave at association), the completed volume mapping, whether this is the original server
(rescan: compare local blocks and fetch only what differs) or another one (full sync), the bandwidth limit
of the failback replication configuration, the state directory for the journals, and (after pairing) the
TLS files and the agent's certificate name. The downloaded software itself checks the file
(`--check-config`), so a configuration it would refuse fails here, at CONFIGURE_REPLICATION_SOFTWARE.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from failback_client.download import Software
from failback_client.errors import EXIT_REPLICATION, ClientError
from failback_client.mapping import MappedVolume
from failback_client.pairing import TlsPaths


class ConfigureError(ClientError):
    exit_status = EXIT_REPLICATION


@dataclass
class ReplicationSetup:
    recovery_instance_id: str
    client_id: str
    agent_host: str
    agent_port: int
    volumes: list[tuple[str, str]]  # (recovery device, local target)
    rescan: bool
    bandwidth_mbps: int | None
    state_dir: Path
    tls: TlsPaths
    agent_identity: str = ""  # known after pairing (IssueAgentCertificateForDrs' agentCommonName)
    extra: dict[str, Any] = field(default_factory=dict)  # further replicator settings (tests: timeouts)

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "agent_host": self.agent_host,
            "agent_port": self.agent_port,
            "agent_identity": self.agent_identity or "not-paired-yet",
            "client_identity": self.client_id,
            "recovery_instance_id": self.recovery_instance_id,
            "tls": self.tls.as_config(),
            "volumes": [{"recovery_device": r, "target": t} for r, t in self.volumes],
            "state_dir": str(self.state_dir),
            "rescan": self.rescan,
            "bandwidth_mbps": self.bandwidth_mbps or None,
        }
        config.update(self.extra)
        return config


def mapped_volumes(volumes: list[MappedVolume]) -> list[tuple[str, str]]:
    """The replicated pairs of the completed mapping (EXCLUDEd volumes left out)."""
    pairs = [(v.recovery.name, v.local.path) for v in volumes if v.local is not None]
    if not pairs:
        raise ConfigureError("every recovery volume is EXCLUDEd: nothing to replicate")
    return pairs


def write_config(setup: ReplicationSetup, path: Path) -> Path:
    """Atomically (tmp + rename), mode 0600: it names the key file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(setup.as_config(), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def check_config(software: Software, path: Path) -> None:
    """Let the downloaded software validate the file; its one-line verdict is the error shown."""
    try:
        proc = subprocess.run(
            [str(software.launcher), "--config", str(path), "--check-config"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except OSError as e:
        raise ConfigureError(f"Cannot start the replication software {software.launcher}: {e.strerror or e}") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise ConfigureError(
            f"The replication software refused its configuration {path}: "
            f"{detail[-1] if detail else f'exit status {proc.returncode}'}"
        )
