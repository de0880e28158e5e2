"""Replication benchmark on loopback: figures side by side with baselines measured in the same run.

- full sync throughput vs a raw TCP socket copy of the same bytes (file -> socket -> file + fsync),
  on two volumes: random bytes (the worst case: no free space, nothing compresses, every byte
  goes through TLS) and an ext4 filesystem half full of this machine's files (a server's disk:
  its free space goes as zero blocks, no data; zstd only where it pays, which on loopback it
  does not: the agent then sends raw)
- delta resync with 1 % of blocks changed vs the full sync
- resume cost after a cut mid-transfer (bytes and blocks fetched beyond one full sync)
- replicator peak memory: VmHWM of a child process running only the replicator. Not ru_maxrss:
  Linux carries the parent's peak RSS over fork+exec into the child's ru_maxrss (and into the
  parent's RUSAGE_CHILDREN), so a child started from a big pytest process "peaked" at that
  process's size -- the 3.3 GiB once seen in CI for a replicator that used ~40 MiB.

CPU seconds are printed beside wall seconds: on a shared 2-core box the wall figures swing with
the neighbours' load, the work done much less. The digest floor lines are the floor of that work,
per algorithm: a full sync to "ready" hashes every byte four times (agent read, arrival check,
read-back, the agent's digests for the verification -- which the bench makes it re-read, as it
must on a block device), a rescan hashes the local disk once. The block digest is negotiated
(protocol version 2: BLAKE3 where both sides have it); the same full sync pinned to SHA-256 runs
in the same process right after it, so the effect of the digest is measured, not assumed.

Run: `inv bench-replication [--repeat 3]`, or .venv/bin/python -m image.bench.replication [--size-mib 256]
[--dir /dev/shm/x] [--repeat 3] (or `pytest --run-slow tests/test_replication_bench.py -s`). Prints;
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from failback_replicator.tlsconf import client_context, server_context
from failback_replicator.wire import DIGEST_SHA256, available_digests, digest_function

from image.core.mounts import require_no_mounts
from image.core.run import run
from image.stages.hashes import sha512_file

MiB = 1024 * 1024


@dataclass
class BenchResult:
    size_bytes: int
    volume: str  # "random" (incompressible, no free space: the worst case) or "filesystem" (ext4, half full)
    file_bytes: int  # bytes of file data on the volume (random: all of it)
    zero_blocks: int  # blocks of the volume that are all zeros (free space never written)
    wire_bytes: int  # bytes the full sync received from the agent (after compression and zero blocks)
    raw_copy_s: float
    tls_copy_s: float  # the same copy over mutual TLS, no digests: the encryption's own cost
    full_sync_s: float  # to "ready": transfer + verification pass
    full_transfer_s: float  # the streaming phase alone
    delta_s: float
    link_mbps: int | None
    link_full_s: float | None
    link_delta_s: float | None
    delta_blocks_sent: int
    delta_blocks_total: int
    resume_s: float
    resume_extra_blocks: int
    resume_checkpoint_blocks: int
    replicator_peak_rss_kib: int
    sha256_pass_s: float = 0.0  # one SHA-256 pass over the volume's bytes, one core, from memory
    digest: str = ""  # the block digest the replicator and the agent negotiated
    protocol_version: int = 0
    digest_pass_s: dict[str, float] = field(default_factory=dict)  # one pass per available algorithm
    sha256_full_sync_s: float = 0.0  # the same full sync with digests pinned to SHA-256
    sha256_full_transfer_s: float = 0.0
    sha256_full_cpu_replicator_s: float = 0.0
    sha256_full_cpu_agent_s: float = 0.0
    raw_copy_cpu_s: float = 0.0
    full_cpu_replicator_s: float = 0.0
    full_cpu_agent_s: float = 0.0
    delta_cpu_replicator_s: float = 0.0
    delta_cpu_agent_s: float = 0.0

    @property
    def full_vs_raw(self) -> float:
        return self.raw_copy_s / self.full_sync_s

    @property
    def delta_speedup(self) -> float:
        return self.full_sync_s / self.delta_s

    @property
    def full_transfer_vs_raw(self) -> float:
        return self.raw_copy_s / self.full_transfer_s

    def describe_volume(self) -> str:
        if self.volume == "random":
            return "volume of random bytes (worst case: no free space, nothing compresses)"
        return (
            f"{self.volume} volume (ext4, {self.file_bytes / MiB:.0f} MiB of this machine's files,"
            f" {self.zero_blocks} of {self.size_bytes // MiB} blocks free)"
        )

    def _floor(self, name: str, seconds: float) -> str:
        return (
            f"  {name + ' floor':20s}  {seconds:7.2f} s  per pass on one core: full sync 4 passes on 2 cores"
            f" >= {2 * seconds:.2f} s (= {self.raw_copy_s / (2 * seconds):.2f}x raw at best),"
            f" rescan 1 pass >= {seconds / 2:.2f} s"
        )

    def report(self) -> str:
        mb = self.size_bytes / MiB
        floors = {DIGEST_SHA256: self.sha256_pass_s, **self.digest_pass_s}
        sha_line = []
        if self.digest != DIGEST_SHA256 and self.sha256_full_sync_s:
            sha_line = [
                f"  same, SHA-256 digests {self.sha256_full_transfer_s:7.2f} s transfer"
                f" = {self.raw_copy_s / self.sha256_full_transfer_s:.2f}x raw,"
                f" {self.sha256_full_sync_s:.2f} s to ready = {self.raw_copy_s / self.sha256_full_sync_s:.2f}x raw"
                f"  CPU replicator {self.sha256_full_cpu_replicator_s:.2f} s"
                f" + agent {self.sha256_full_cpu_agent_s:.2f} s"
                "  (same run, digests pinned to sha256)"
            ]
        return "\n".join(
            [
                f"replication benchmark, {mb:.0f} MiB {self.describe_volume()}, loopback, one run,"
                f" load {os.getloadavg()[0]:.1f}",
                f"  block digest          {self.digest} (negotiated, protocol version {self.protocol_version};"
                f" available here: {', '.join(floors)})",
                f"  raw socket copy       {self.raw_copy_s:7.2f} s  {mb / self.raw_copy_s:8.1f} MiB/s  (baseline)"
                f"  CPU {self.raw_copy_cpu_s:.2f} s",
                f"  TLS socket copy       {self.tls_copy_s:7.2f} s  {mb / self.tls_copy_s:8.1f} MiB/s"
                f"  = {self.raw_copy_s / self.tls_copy_s:.2f}x raw  (encryption alone, no digests)",
                f"  full sync, transfer   {self.full_transfer_s:7.2f} s  {mb / self.full_transfer_s:8.1f} MiB/s"
                f"  = {self.raw_copy_s / self.full_transfer_s:.2f}x raw,"
                f" {self.tls_copy_s / self.full_transfer_s:.2f}x TLS copy"
                "  (target >= 0.8x raw)",
                f"  on the wire           {self.wire_bytes / MiB:7.1f} MiB of {mb:.0f} MiB"
                "  (zero blocks are not sent; zstd where it pays)",
                f"  full sync, to ready   {self.full_sync_s:7.2f} s  {mb / self.full_sync_s:8.1f} MiB/s"
                f"  = {self.full_vs_raw:.2f}x raw  (includes reading every block back to verify)"
                f"  CPU replicator {self.full_cpu_replicator_s:.2f} s + agent {self.full_cpu_agent_s:.2f} s",
                *sha_line,
                *(self._floor({"sha256": "SHA-256", "blake3": "BLAKE3"}.get(n, n), s) for n, s in floors.items()),
                f"  delta resync (1 %)    {self.delta_s:7.2f} s  "
                f"{self.delta_blocks_sent}/{self.delta_blocks_total} blocks sent"
                f"  = {self.delta_speedup:.1f}x faster than full"
                "  (target >= 10x; bound by hashing the local disk)"
                f"  CPU replicator {self.delta_cpu_replicator_s:.2f} s + agent {self.delta_cpu_agent_s:.2f} s",
                f"  resume after a cut    {self.resume_s:7.2f} s  {self.resume_extra_blocks} block(s) fetched beyond"
                f" one full sync (checkpoint = {self.resume_checkpoint_blocks} blocks)",
                *(
                    [
                        f"  on a {self.link_mbps} Mbps link: full sync {self.link_full_s:.2f} s,"
                        f" delta {self.link_delta_s:.2f} s"
                        f"  = {self.link_full_s / self.link_delta_s:.1f}x faster"
                    ]
                    if self.link_full_s and self.link_delta_s
                    else []
                ),
                f"  replicator peak RSS   {self.replicator_peak_rss_kib / 1024:7.1f} MiB  (VmHWM of the replicator"
                " process; target: far below 1 GiB)",
            ]
        )


def raw_socket_copy(src: Path, dst: Path, chunk: int = MiB, tls: tuple | None = None) -> float:
    """Plain TCP on loopback: read the file, send it, receive and pwrite it, fsync. No hashing;
    with tls=(server_ctx, client_ctx) the same copy over TLS (to show what the encryption alone costs)."""
    size = src.stat().st_size
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        if tls:
            conn = tls[0].wrap_socket(conn, server_side=True)
        with conn, open(src, "rb", buffering=0) as f:
            while data := f.read(chunk):
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    start = time.perf_counter()
    t.start()
    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    buf = bytearray(chunk)
    view = memoryview(buf)
    sock = socket.create_connection(("127.0.0.1", port))
    if tls:
        sock = tls[1].wrap_socket(sock)
    with sock:
        off = 0
        while off < size:
            got = 0
            while got < chunk and off + got < size:
                n = sock.recv_into(view[got:], min(chunk, size - off) - got)
                if not n:
                    raise ConnectionError("raw copy: sender closed early")
                got += n
            os.pwrite(fd, view[:got], off)
            off += got
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    t.join()
    listener.close()
    return elapsed


_CHILD = r"""
import dataclasses, json, resource, sys
from failback_replicator.config import ReplicatorConfig
from failback_replicator.engine import Replicator
from failback_replicator.interfaces import Command, QueueCommandSource
cfg = ReplicatorConfig.from_dict(json.loads(sys.argv[1]))

class StopWhenReady(QueueCommandSource):
    # The figures are "to ready" (consistency attained): stop there, so that the CPU seconds
    # measured cover the same work as the wall seconds (no final sync, whose SCAN re-reads all).
    def poll(self):
        return (Command.STOP if r.stats.ready_seconds is not None else Command.CONTINUE), None

r = Replicator(cfg, commands=StopWhenReady(), sleep=lambda s: None)
outcome = r.run()
r.stats.fetched_by_volume.clear()
stats = dataclasses.asdict(r.stats)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"outcome": outcome, **stats, "maxrss_kib": hwm, "cpu_s": ru.ru_utime + ru.ru_stime}))
"""


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _replicate_in_child(cfg) -> dict:
    """Runs the replicator alone in a fresh interpreter: its own CPU and its own peak RSS. Adds
    `agent_cpu_s`: this process's CPU meanwhile (the agent's threads; the waiting is ~free)."""
    before = _cpu_s()
    proc = run([sys.executable, "-c", _CHILD, json.dumps(json.loads(cfg.to_json()))], capture=True)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "agent_cpu_s": _cpu_s() - before}


def digest_pass(path: Path, algorithm: str = DIGEST_SHA256, chunk: int = MiB) -> float:
    """Seconds to digest the file's bytes in 1 MiB pieces on one core (read from memory first), with
    the replicator's own digest function."""
    fn = digest_function(algorithm)
    data = path.read_bytes()
    view = memoryview(data)
    start = time.perf_counter()
    for off in range(0, len(view), chunk):
        fn(view[off : off + chunk])
    return time.perf_counter() - start


def count_zero_blocks(path: Path, block_size: int) -> int:
    zero = bytes(block_size)
    with open(path, "rb", buffering=0) as f:
        return sum(1 for block in iter(lambda: f.read(block_size), b"") if block == zero[: len(block)])


# Where the "filesystem" volume's files come from: a server's usual mix of binaries, libraries,
# Python and text (this machine's own, so nothing is downloaded).
FS_SOURCES = (Path("/usr/bin"), Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/python3.11"), Path("/usr/share/doc"))
VOLUMES = ("random", "filesystem")


def filesystem_image(
    path: Path, size: int, staging: Path, fill: float = 0.5, sources: tuple[Path, ...] = FS_SOURCES
) -> tuple[Path, int]:
    """An ext4 volume of `size` bytes about `fill` full of real files (copied from `sources` in a
    fixed order until the budget is spent), the rest free: how a server's disk looks, unlike random
    bytes (the worst case: nothing to skip, nothing compresses). Returns the image and the bytes of
    file data in it."""
    budget = int(size * fill)
    used = 0
    staging.mkdir(parents=True)
    for root in sources:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                src = Path(dirpath, name)
                if src.is_symlink() or not src.is_file() or used >= budget:
                    continue
                n = src.stat().st_size
                if used + n > budget:
                    continue
                dest = staging / src.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(src, dest)
                except OSError:
                    continue
                used += n
    if used < budget // 2:
        raise RuntimeError(f"filesystem volume: only {used} bytes of files found under {', '.join(map(str, sources))}")
    require_no_mounts(staging, f"copy it into {path.name}")
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "benchvol", "-d", str(staging), str(path),
         f"{size // 1024}K"], capture=True)  # fmt: skip
    shutil.rmtree(staging)
    return path, used


def run_benchmark(
    size: int = 256 * MiB, workdir: Path | None = None, link_mbps: int | None = 200, volume: str = "random"
) -> BenchResult:
    from drs_agent.testing import (
        CuttingProxy,
        Pki,
        age,
        blank_image,
        change_blocks,
        make_image,
        replicator_config,
        start_agent,
    )

    # tmpfs by default: measures the protocol, not this VM's disk (which both paths would share).
    base = workdir or Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=base, prefix="bench-repl-") as tmp:
        d = Path(tmp)
        pki = Pki.create(d / "pki")
        if volume == "random":
            src, file_bytes = make_image(d / "source.img", size, seed=3, zero_fraction=0.0), size
        elif volume == "filesystem":
            src, file_bytes = filesystem_image(d / "source.img", size, d / "files")
        else:
            raise ValueError(f"volume {volume!r}: one of {', '.join(VOLUMES)}")
        bs = MiB
        blocks = size // bs
        zero_blocks = count_zero_blocks(src, bs)

        passes = {a: digest_pass(src, a) for a in available_digests()}
        raw_dst = d / "raw.img"
        cpu0 = _cpu_s()
        raw_s = raw_socket_copy(src, raw_dst)
        raw_cpu = _cpu_s() - cpu0
        raw_dst.unlink()
        tls_s = raw_socket_copy(src, raw_dst, tls=(server_context(pki.agent), client_context(pki.client)))
        raw_dst.unlink()

        agent = start_agent(pki, {"/dev/xvda": src}, watch_interval=0)
        try:
            # Full sync ("a different server"): every block streamed and verified on arrival, then the
            # verification pass reads every block back. Timed to "ready" (consistency attained).
            tgt = d / "target.img"
            blank_image(tgt, size)
            # "Just written": the agent cannot trust digests it took while serving READs, so the
            # verification re-reads the source, as it always must on a live block device.
            age(src, 0)
            cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt}, d / "state-full", rescan=False)
            full = _replicate_in_child(cfg)
            assert sha512_file(tgt) == sha512_file(src), "full sync: target differs from source"
            algorithm = full["digest_algorithm"]
            # The same full sync with SHA-256 digests (another target, the agent's SHA-256 cache).
            sha_full = None
            if algorithm != DIGEST_SHA256:
                tgt_sha = d / "target-sha256.img"
                blank_image(tgt_sha, size)
                age(src, 0)
                cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt_sha}, d / "state-full-sha256",
                                        rescan=False, digests=(DIGEST_SHA256,))  # fmt: skip
                sha_full = _replicate_in_child(cfg)
                assert sha_full["digest_algorithm"] == DIGEST_SHA256
                assert sha512_file(tgt_sha) == sha512_file(src), "full sync (sha256): target differs from source"
                tgt_sha.unlink()

            # Delta: the "original server" differs in 1 % of blocks; rescan sends only those.
            changed = list(range(0, blocks, 100))
            change_blocks(src, changed, bs)
            time.sleep(2.1)  # let the source's mtime age so the agent may trust its digest cache
            agent.volumes(bs, algorithm)[0].refresh()
            cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt}, d / "state-delta", rescan=True)
            delta = _replicate_in_child(cfg)
            assert sha512_file(tgt) == sha512_file(src), "delta: target differs from source"

            # The same two on a link of `link_mbps` (token bucket): how a WAN failback sees them.
            link_full = link_delta = None
            if link_mbps:
                tgt3 = d / "target3.img"
                blank_image(tgt3, size)
                cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt3}, d / "state-link-full",
                                        rescan=False, bandwidth_mbps=link_mbps)  # fmt: skip
                link_full = float(_replicate_in_child(cfg)["ready_seconds"])
                change_blocks(src, changed, bs, seed=8)
                time.sleep(2.1)
                agent.volumes(bs, algorithm)[0].refresh()
                cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt3}, d / "state-link-delta",
                                        rescan=True, bandwidth_mbps=link_mbps)  # fmt: skip
                link_delta = float(_replicate_in_child(cfg)["ready_seconds"])
                assert sha512_file(tgt3) == sha512_file(src), "link delta: target differs from source"

            # Resume: a fresh full sync through a proxy that cuts the link at 60 % of the bytes.
            tgt2 = d / "target2.img"
            blank_image(tgt2, size)
            # 60 % of what the full sync sent (a filesystem volume sends much less than its size).
            proxy = CuttingProxy(agent.port, cut_after=int(int(full["wire_bytes_in"]) * 0.6))
            cfg = replicator_config(pki, proxy.port, {"/dev/xvda": tgt2}, d / "state-resume", rescan=False)
            resume = _replicate_in_child(cfg)
            proxy.close()
            assert proxy.cuts == 1, "resume: the proxy never cut the link"
            assert sha512_file(tgt2) == sha512_file(src), "resume: target differs from source"
        finally:
            agent.stop()
        return BenchResult(
            size_bytes=size,
            volume=volume,
            file_bytes=file_bytes,
            zero_blocks=zero_blocks,
            wire_bytes=int(full["wire_bytes_in"]),
            raw_copy_s=raw_s,
            tls_copy_s=tls_s,
            full_sync_s=float(full["ready_seconds"]),
            full_transfer_s=float(full["transfer_seconds"]),
            delta_s=float(delta["ready_seconds"]),
            link_mbps=link_mbps,
            link_full_s=link_full,
            link_delta_s=link_delta,
            delta_blocks_sent=int(delta["blocks_received"]),
            delta_blocks_total=blocks,
            resume_s=float(resume["ready_seconds"]),
            resume_extra_blocks=int(resume["blocks_received"]) - blocks,
            resume_checkpoint_blocks=cfg.checkpoint_blocks,
            replicator_peak_rss_kib=max(int(x["maxrss_kib"]) for x in (full, delta, resume)),
            sha256_pass_s=passes[DIGEST_SHA256],
            digest=algorithm,
            protocol_version=int(full["protocol_version"]),
            digest_pass_s={a: s for a, s in passes.items() if a != DIGEST_SHA256},
            sha256_full_sync_s=float(sha_full["ready_seconds"]) if sha_full else 0.0,
            sha256_full_transfer_s=float(sha_full["transfer_seconds"]) if sha_full else 0.0,
            sha256_full_cpu_replicator_s=float(sha_full["cpu_s"]) if sha_full else 0.0,
            sha256_full_cpu_agent_s=float(sha_full["agent_cpu_s"]) if sha_full else 0.0,
            raw_copy_cpu_s=raw_cpu,
            full_cpu_replicator_s=float(full["cpu_s"]),
            full_cpu_agent_s=float(full["agent_cpu_s"]),
            delta_cpu_replicator_s=float(delta["cpu_s"]),
            delta_cpu_agent_s=float(delta["agent_cpu_s"]),
        )


def spread(results: list[BenchResult]) -> str:
    """min / median / max of the target ratios over several runs (the box is shared: one run lies)."""

    def line(name: str, values: list[float], unit: str = "x") -> str:
        return (
            f"  {name:22s} min {min(values):6.2f}{unit}  median {statistics.median(values):6.2f}{unit}"
            f"  max {max(values):6.2f}{unit}"
        )

    return "\n".join(
        [
            f"spread over {len(results)} runs",
            line("full transfer / raw", [r.full_transfer_vs_raw for r in results]),
            line("full to ready / raw", [r.full_vs_raw for r in results]),
            *(
                [line("SHA-256 transfer / raw", [r.raw_copy_s / r.sha256_full_transfer_s for r in results])]
                if all(r.sha256_full_transfer_s for r in results)
                else []
            ),
            line("delta speed-up", [r.delta_speedup for r in results]),
            line("resume extra blocks", [float(r.resume_extra_blocks) for r in results], ""),
            line("peak RSS MiB", [r.replicator_peak_rss_kib / 1024 for r in results], ""),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: /dev/shm)")
    p.add_argument("--link-mbps", type=int, default=200, help="also compare full and delta on such a link (0: skip)")
    p.add_argument("--repeat", type=int, default=1, help="run N times and print the spread of the ratios")
    p.add_argument(
        "--volume",
        choices=[*VOLUMES, "both"],
        default="both",
        help="random bytes (the worst case), an ext4 filesystem half full of files, or both (default)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    volumes = VOLUMES if args.volume == "both" else (args.volume,)
    results: dict[str, list[BenchResult]] = {v: [] for v in volumes}
    for _ in range(max(1, args.repeat)):
        for volume in volumes:
            result = run_benchmark(args.size_mib * MiB, args.dir, args.link_mbps or None, volume=volume)
            results[volume].append(result)
            print(json.dumps(asdict(result)) if args.json else result.report(), flush=True)
    for volume, runs in results.items():
        if len(runs) > 1 and not args.json:
            print(f"{volume} volume: {spread(runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
