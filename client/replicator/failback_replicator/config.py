"""Replicator configuration: written by the failback client (CONFIGURE_REPLICATION_SOFTWARE) as JSON."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .tlsconf import TlsFiles
from .wire import DEFAULT_BLOCK_SIZE, DEFAULT_PORT, DIGEST_ALGORITHMS


class ConfigError(ValueError):
    """The configuration file is missing something or holds a bad value; the message names it."""


@dataclass(frozen=True)
class VolumeMapping:
    recovery_device: str  # the recovery instance's device name, as the agent lists it
    target: Path  # local block device or image file that receives it


@dataclass(frozen=True)
class ReplicatorConfig:
    agent_host: str
    agent_identity: str  # CN of the agent certificate (IssueAgentCertificateForDrs' agentCommonName)
    client_identity: str  # our failback client ID (CN of our certificate)
    recovery_instance_id: str
    tls: TlsFiles
    volumes: tuple[VolumeMapping, ...]
    state_dir: Path  # journals live here
    agent_port: int = DEFAULT_PORT
    # True when failing back to the original server: compare local blocks first ("rescan") and
    # send only what differs. False (a different server): full sync of every block.
    rescan: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    checkpoint_blocks: int = 64  # journal checkpoint (fdatasync + journal write) every N blocks
    bandwidth_mbps: int | None = None
    connect_timeout: float = 10.0
    io_timeout: float = 120.0
    changes_wait: float = 2.0  # long-poll for source changes in CONTINUOUS
    agent_not_seen_after: float = 60.0  # reconnect attempts this long => AGENT_NOT_SEEN
    give_up_after: float | None = None  # None: keep retrying until STOP
    max_converge_rounds: int = 8
    # Block digests to offer the agent, in order of preference; None: every one available here
    # (BLAKE3 when the blake3 module loads, then SHA-256). ["sha256"] pins SHA-256.
    digests: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.volumes:
            raise ConfigError("volumes: no volume is mapped (every recovery volume was EXCLUDEd?)")
        names = [v.recovery_device for v in self.volumes]
        if len(set(names)) != len(names):
            raise ConfigError(f"volumes: a recovery device is mapped twice: {names}")
        targets = [str(v.target) for v in self.volumes]
        if len(set(targets)) != len(targets):
            raise ConfigError(f"volumes: a local target is used twice: {targets}")
        bs = self.block_size
        if bs < 64 * 1024 or bs > 16 * 1024 * 1024 or bs & (bs - 1):
            raise ConfigError(f"block_size: {bs} must be a power of two between 64 KiB and 16 MiB")
        if not 1 <= self.agent_port <= 65535:
            raise ConfigError(f"agent_port: {self.agent_port} is not a TCP port")
        if self.checkpoint_blocks < 1:
            raise ConfigError("checkpoint_blocks: must be at least 1")
        if self.digests is not None:
            bad = [d for d in self.digests if d not in DIGEST_ALGORITHMS]
            if bad or not self.digests:
                raise ConfigError(
                    f"digests: {list(self.digests)} must list some of {', '.join(DIGEST_ALGORITHMS)} (or be null)"
                )

    def to_json(self) -> str:
        d = asdict(self)
        d["tls"] = {k: str(v) for k, v in d["tls"].items()}
        d["volumes"] = [{"recovery_device": v.recovery_device, "target": str(v.target)} for v in self.volumes]
        d["state_dir"] = str(self.state_dir)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicatorConfig:
        d = dict(d)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in d:
                raise ConfigError(f"missing setting {f.name!r}")
        try:
            tls = d.pop("tls")
            d["tls"] = TlsFiles(ca=Path(tls["ca"]), cert=Path(tls["cert"]), key=Path(tls["key"]))
            d["volumes"] = tuple(VolumeMapping(v["recovery_device"], Path(v["target"])) for v in d.pop("volumes"))
            d["state_dir"] = Path(d["state_dir"])
            if d.get("digests") is not None:
                if not isinstance(d["digests"], list | tuple):
                    raise ConfigError(f"digests: {d['digests']!r} is not a list of algorithm names")
                d["digests"] = tuple(d["digests"])
            cfg = cls(**d)
        except KeyError as exc:
            raise ConfigError(f"missing setting {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: Path) -> ReplicatorConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
