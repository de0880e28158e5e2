"""Shared helpers for the failback client's tests (no tests here; named test_client_* to stay in that file set)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "client"
BIOS_ROOT = str(DATA / "sysroot-bios")  # original server: MAC 52:54:00:12:34:56, sda 20 GiB, sdb 9.75 GiB
UEFI_ROOT = str(DATA / "sysroot-uefi")  # another machine: nvme0n1 30 GiB, nvme1n1 100 GiB, Secure Boot on
GIB = 2**30

ORIGINAL_RI = "i-0000000000000a001"  # recovery instance of the machine BIOS_ROOT describes
OTHER_RI = "i-0000000000000b002"  # one 10 GiB volume
BIG_RI = "i-0000000000000c003"  # 200 GiB: fits no test machine
DRILL_RI = "i-0000000000000d004"  # three volumes: more than the test machines have

SEED = {
    "source_servers": [
        {
            "id": "s-aaaaaaaaaaaaaaaaa",
            "hostname": "orig01",
            "vmware_uuid": "4210a1b2-c3d4-e5f6-0718-293a4b5c6d7e",
            "nics": [{"mac": "52:54:00:12:34:56", "ips": ["192.168.10.21"]}],
            "disks": [{"device": "/dev/sda", "bytes": GIB}, {"device": "/dev/sdb", "bytes": 2 * GIB}],
        },
        {
            "id": "s-bbbbbbbbbbbbbbbbb",
            "hostname": "other01",
            "nics": [{"mac": "00:50:56:00:00:01"}],
            "disks": [{"device": "/dev/sda", "bytes": 10 * GIB}],
        },
        {
            "id": "s-ccccccccccccccccc",
            "hostname": "big01",
            "nics": [{"mac": "00:50:56:00:00:02"}],
            "disks": [{"device": "/dev/sda", "bytes": 200 * GIB}],
        },
        {
            "id": "s-ddddddddddddddddd",
            "hostname": "files01",
            "nics": [{"mac": "00:50:56:00:00:03"}],
            "disks": [{"device": f"/dev/sd{c}", "bytes": GIB} for c in "abc"],
        },
    ],
    "recovery_instances": [
        {
            "id": ORIGINAL_RI,
            "source_server": "s-aaaaaaaaaaaaaaaaa",
            "private_ip": "127.0.0.1",
            "use_private_ip": True,
            "disks": [
                {"device": "/dev/nvme0n1", "bytes": GIB, "source_device": "/dev/sda"},
                {"device": "/dev/nvme1n1", "bytes": 2 * GIB, "source_device": "/dev/sdb"},
            ],
        },
        {
            "id": OTHER_RI,
            "source_server": "s-bbbbbbbbbbbbbbbbb",
            "private_ip": "127.0.0.1",
            "use_private_ip": True,
            "disks": [{"device": "/dev/nvme0n1", "bytes": 10 * GIB, "source_device": "/dev/sda"}],
        },
        {"id": BIG_RI, "source_server": "s-ccccccccccccccccc", "private_ip": "127.0.0.1", "use_private_ip": True},
        {"id": DRILL_RI, "source_server": "s-ddddddddddddddddd", "private_ip": "127.0.0.1", "is_drill": True},
    ],
}

CLIENT_ENV_VARS = (
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_DRS_ENDPOINT",
    "RECOVERY_INSTANCE_ID",
    "DEVICE_MAPPING",
    "NO_PROMPT",
    "FAILBACK_SYSROOT",
    "FAILBACK_S3_ENDPOINT",
    "FAILBACK_CONSOLE_LOCK",
    "FAILBACK_INCLUDE_LOOP",
    "FAILBACK_PLAIN",
    "FAILBACK_FIX_CLOCK",
    "FAILBACK_AGENT_PORT",
    "https_proxy",
    "HTTPS_PROXY",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "FAILBACK_CHECK_ONLY",
    "FAILBACK_WORK_DIR",
    "REBOOT",
    "FAILBACK_CONSOLE",
    "FAILBACK_WAIT_UNITS",
)


@contextmanager
def agent_listener() -> Iterator[int]:
    """A TCP listener on 127.0.0.1 standing in for the recovery instance's port 1500 (connect is all we test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(
    cp, *, root: str = BIOS_ROOT, agent_port: int | None = None, with_creds: bool = True, **extra: str
) -> dict[str, str]:
    """Launcher-style variables for a client run against control plane `cp`."""
    # FAILBACK_CHECK_ONLY: these runs end after guide step 12 (tests/test_client_replication*.py go further).
    env = {
        "FAILBACK_SYSROOT": root,
        "FAILBACK_S3_ENDPOINT": cp.url,
        "FAILBACK_FIX_CLOCK": "0",
        "FAILBACK_CHECK_ONLY": "1",
    }
    if with_creds:
        env.update(
            AWS_ACCESS_KEY=cp.access_key, AWS_SECRET_KEY=cp.secret_key, AWS_REGION=cp.region, AWS_DRS_ENDPOINT=cp.url
        )
        if cp.session_token:
            env["AWS_SESSION_TOKEN"] = cp.session_token
    if agent_port is not None:
        env["FAILBACK_AGENT_PORT"] = str(agent_port)
    env.update(extra)
    return env


@dataclass
class Run:
    status: int
    out: str
    err: str
    log: str

    @property
    def all(self) -> str:
        return self.out + self.err + self.log


def run_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, env: dict[str, str], *args: str
) -> Run:
    """main() in this process with exactly `env` for the client's variables (fast: no interpreter start)."""
    from failback_client.cli import main

    for name in CLIENT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    log = tmp_path / "client.log"
    capsys.readouterr()
    status = main(["--log-file", str(log), *args])
    captured = capsys.readouterr()
    return Run(status, captured.out, captured.err, log.read_text() if log.exists() else "")


def subprocess_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_VARS}
    base.update(env)
    base["PYTHONUNBUFFERED"] = "1"
    return base


def client_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "failback_client", *args]


def run_subprocess(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_command(*args),
        env=subprocess_env(env),
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
