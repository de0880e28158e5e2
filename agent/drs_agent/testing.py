"""Helpers for replication tests and the benchmark (image/bench/replication.py): a pairing PKI, source
images (and their age, which the agent's digest cache goes by), a link-cutting proxy, and a ready-made
agent + replicator configuration on loopback. Hashes of images: image.stages.hashes.sha512_file."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from failback_replicator.config import ReplicatorConfig, VolumeMapping
from failback_replicator.interfaces import (
    InitiationStep,
    ReplicationError,
    ReplicationSnapshot,
    ReplicationState,
    StepStatus,
)
from failback_replicator.tlsconf import TlsFiles

from .pki import CertificateAuthority
from .server import AgentConfig, AgentServer
from .volume import VolumeSpec

RECOVERY_INSTANCE_ID = "i-0a1b2c3d4e5f60718"
CLIENT_ID = "fbc-0123456789abcdefg"
AGENT_CN = f"drs-agent.{RECOVERY_INSTANCE_ID}"


@dataclass(frozen=True)
class Pki:
    agent: TlsFiles
    client: TlsFiles
    rogue_client: TlsFiles  # valid certificate for CLIENT_ID, but from another CA
    other_client: TlsFiles  # from the pairing CA, but for another failback client ID
    rogue_agent: TlsFiles  # an agent certificate from another CA

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca = CertificateAuthority.create(directory / "ca")
        rogue = CertificateAuthority.create(directory / "rogue-ca", name="rogue-ca")
        client = ca.issue(directory / "client", CLIENT_ID, "client")
        rogue_client = rogue.issue(directory / "rogue-client", CLIENT_ID, "client")
        rogue_agent = rogue.issue(directory / "rogue-agent", AGENT_CN, "server")
        return cls(
            agent=ca.issue(directory / "agent", AGENT_CN, "server"),
            client=client,
            # The replicator pins the pairing CA; the rogue peer presents its own chain.
            rogue_client=TlsFiles(ca=ca.cert, cert=rogue_client.cert, key=rogue_client.key),
            other_client=ca.issue(directory / "other", "fbc-zzzzzzzzzzzzzzzzz", "client"),
            rogue_agent=TlsFiles(ca=ca.cert, cert=rogue_agent.cert, key=rogue_agent.key),
        )


def blank_image(path: Path, size: int) -> Path:
    """An empty (sparse, all-zero) target image of `size` bytes: what a fresh local disk reads as."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_image(path: Path, size: int, seed: int = 1, zero_fraction: float = 0.25) -> Path:
    """A disk image of random 64 KiB chunks with some all-zero chunks (like a real disk's free space)."""
    rng = random.Random(seed)
    chunk = 64 * 1024
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(bytes(chunk) if rng.random() < zero_fraction else rng.randbytes(chunk))
    return path


def age(path: Path, seconds: float) -> None:
    """Sets the image's mtime `seconds` ago (0: just written, as a live block device always looks to the
    agent, which then cannot trust digests it took before; 60: untouched, its digest cache may serve)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def change_blocks(path: Path, blocks: list[int], block_size: int, seed: int = 7) -> None:
    """Overwrites a few bytes in each listed block (as a running server would)."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    try:
        for b in blocks:
            os.pwrite(fd, rng.randbytes(4096), b * block_size + rng.randrange(0, block_size - 4096))
        os.fsync(fd)
    finally:
        os.close(fd)


def start_agent(
    pki: Pki, volumes: dict[str, Path], port: int = 0, watch_interval: float = 0.2, **settings: Any
) -> AgentServer:
    """An agent on loopback; `settings` are further AgentConfig fields (e.g. protocol_versions=(1,)
    and digests=("sha256",) to play a version-1 agent)."""
    cfg = AgentConfig(
        recovery_instance_id=RECOVERY_INSTANCE_ID,
        volumes=[VolumeSpec(name, path) for name, path in volumes.items()],
        tls=pki.agent,
        paired_clients={CLIENT_ID},
        port=port,
        watch_interval=watch_interval,
        **settings,
    )
    return AgentServer(cfg).start()


def replicator_config(
    pki: Pki,
    port: int,
    targets: dict[str, Path],
    state_dir: Path,
    tls: TlsFiles | None = None,
    **overrides: object,
) -> ReplicatorConfig:
    settings: dict = {
        "agent_host": "127.0.0.1",
        "agent_port": port,
        "agent_identity": AGENT_CN,
        "client_identity": CLIENT_ID,
        "recovery_instance_id": RECOVERY_INSTANCE_ID,
        "tls": tls or pki.client,
        "volumes": tuple(VolumeMapping(name, path) for name, path in targets.items()),
        "state_dir": state_dir,
        "changes_wait": 0.5,
        "give_up_after": 30.0,
    }
    settings.update(overrides)
    return ReplicatorConfig(**settings)


class CuttingProxy:
    """Loopback TCP proxy that cuts the link once: the first connection to carry `cut_after` bytes from the
    agent is dropped there. Connections before it that carry less (e.g. a client's bare TCP reachability probe)
    and every later one are forwarded untouched: the replicator's reconnect must resume.
    """

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts = 0
        self.connections = 0
        self.forwarded = 0  # agent -> replicator bytes, all connections
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._cut_lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_agent: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                if from_agent and sent + len(data) >= self.cut_after:
                    with self._cut_lock:
                        cut = self.cuts == 0
                        if cut:
                            self.cuts = 1
                    if cut:
                        dst.sendall(data[: self.cut_after - sent])
                        break
                dst.sendall(data)
                sent += len(data)
                if from_agent:
                    self.forwarded += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class RecordingReporter:
    """A StateReporter that records every call (and can run a hook on progress, e.g. to cut a link)."""

    def __init__(self, on_progress: Callable[[ReplicationSnapshot], object] | None = None) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.on_progress = on_progress
        self.ready = threading.Event()
        self.snapshots: list[ReplicationSnapshot] = []

    def _rec(self, name: str, *args: object) -> None:
        self.calls.append((name, args))

    def initiation_step(self, step: InitiationStep, status: StepStatus) -> None:
        self._rec("initiation_step", str(step), str(status))

    def replication_state(self, state: ReplicationState) -> None:
        self._rec("replication_state", str(state))

    def progress(self, snapshot: ReplicationSnapshot) -> None:
        self.snapshots.append(snapshot)
        if self.on_progress is not None:
            self.on_progress(snapshot)

    def error(self, error: ReplicationError, raw: str) -> None:
        self._rec("error", str(error), raw)

    def error_cleared(self) -> None:
        self._rec("error_cleared")

    def consistency_attained(self) -> None:
        self._rec("consistency_attained")
        self.ready.set()

    def completed(self) -> None:
        self._rec("completed")

    def names(self, kind: str) -> list:
        return [args for name, args in self.calls if name == kind]


# Runs in the measured child: records its own peak RSS (VmHWM) as it exits, then runs the module
# (or -c code) given after it, as `python -m` / `python -c` would.
_PEAK_PROBE = """
import atexit, os, runpy, sys
def _record_peak():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["FAILBACK_PEAK_RSS_FILE"], "w") as f:
        f.write(kib)
atexit.register(_record_peak)
if sys.argv[1] == "-c":
    code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
    exec(compile(code, "<measured>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_measuring_peak_rss(
    args: list[str], peak_file: Path, timeout: float = 600, **popen: Any
) -> tuple[subprocess.CompletedProcess, int]:
    """Runs `python <args>` (a module and its arguments, or -c CODE ...) as a child process; returns
    its result and the child's own peak RSS in KiB (VmHWM, which the child reads as it exits).

    Not ru_maxrss (nor RUSAGE_CHILDREN, nor wait4's rusage): Linux carries the parent's peak RSS
    over fork+exec into the child's figure, so a child of a big test process would "peak" at the
    size of its parent. That is how one CI run saw a 40 MiB replicator at 3.3 GiB.
    """
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, **popen.pop("env", {}), "FAILBACK_PEAK_RSS_FILE": str(peak_file)}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, *args], env=env, capture_output=True, text=True, timeout=timeout, **popen
    )
    if not peak_file.exists():
        raise RuntimeError(f"child exited ({proc.returncode}) without recording its peak RSS: {proc.stderr[-2000:]}")
    return proc, int(peak_file.read_text())
