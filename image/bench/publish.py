"""Benchmark: publishing one artifact to 1 region and to N regions, next to the S3 server's floor.

All runs go to moto's S3 server over HTTP on 127.0.0.1, started here in a child process of its
own, so that its CPU is counted apart from the publisher's and the two do not share one GIL.
Printed side by side, nothing asserted on time:

- the real publish (hash, verify, hashes, latest/, manifest) to 1 region and to N regions;
- the raw floor: the fewest boto3 calls that leave the same large objects in the buckets
  (one upload, then every other `{version}/` and `latest/` object as a server-side copy, the
  same S3 checksum requests, regions in parallel), without hashing, ordering or verification;
- the CPU seconds spent by the publisher's process and by the S3 server in each run.

On real S3 a server-side copy is S3's work; here it is moto's, on the same CPUs as the
publisher (moto reads, writes and MD5s/SHA256s every copied byte). The N-region floor therefore
bounds what any publisher can reach on this host; the report says how close the publish gets.

The TEST server's storage is configurable and always printed (`MotoStorage`): by default moto
spools every object over 5 MiB to a temporary file on disk, so each 200 MiB copy also costs a
200 MiB file write and reads (kernel time, page-cache pressure, writeback). "memory" keeps the
objects in RAM (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE above the artifact size), lets glibc reuse the
freed copy buffers instead of mapping and faulting fresh pages for each one, and has the server
touch that RAM once before the first timed run (otherwise whichever run comes first pays the
kernel's page faults for every object); "both" measures the two side by side in one run.
Neither changes a single request of the publisher or what it verifies.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import boto3
import requests
from botocore.config import Config

from image.release.publish.cli import OUT_DIR, PublishOptions, default_transfer_jobs, publish_release, transfer_config
from image.release.publish.regions import COMMERCIAL_REGIONS

MiB = 1024 * 1024
ARTIFACT = "aws-failback-livecd-64bit.iso"
PREFIX = "aws-elastic-disaster-recovery"
VERSION = "bench-1"


@dataclass(frozen=True)
class MotoStorage:
    """How the benchmark's moto server holds object bytes: configuration of the TEST server only."""

    name: str  # "disk" (moto's default) or "memory"
    env: dict[str, str]  # set in the server process's environment before it starts
    note: str = ""  # why this storage was chosen (e.g. a fallback)
    prefault: int = 0  # bytes the server allocates, touches and frees before the timed runs

    def describe(self, key_buffer: int) -> str:
        """The printed line; `key_buffer` is what the running server reported it uses."""
        where = "in memory" if self.name == "memory" else "temporary files on disk above that size (moto's default)"
        env = " ".join(f"{k}={v}" for k, v in self.env.items() if k != "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE")
        line = f"moto key buffer: {where} (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE={key_buffer}"
        line += f"; glibc {env}: freed copy buffers reused)" if env else ")"
        if self.prefault:
            line += f"; {self.prefault / 2**30:.1f} GiB touched before the timed runs"
        return line + (f"; {self.note}" if self.note else "")


def _mem_available() -> int:
    """Bytes the kernel says new allocations can get without swapping (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def moto_storage(name: str, size_mib: int, regions: int) -> MotoStorage:
    """The server storage for one run; "memory" falls back to "disk" (saying so) without the RAM.

    In memory the server holds every object of the run at once: the 2N versioned and latest/
    copies plus the seed's multipart parts, and a few copies' transient buffers on top.
    """
    if name == "disk":
        return MotoStorage("disk", {})
    if name != "memory":
        raise ValueError(f"bad moto storage {name!r}: use memory, disk or both")
    objects = (2 * regions + 1 + 4) * size_mib * MiB  # + the parts, and transient buffers of copies
    need = objects + 1024 * MiB  # + moto itself
    avail = _mem_available()
    if avail < need * 5 // 4:  # keep a quarter spare for the rest of the host (QEMU, builds)
        return MotoStorage(
            "disk",
            {},
            note=f"memory asked but {need / 2**30:.1f} GiB needed and only "
            f"{avail / 2**30:.1f} GiB available: stayed on disk",
        )
    return MotoStorage(
        "memory",
        {
            "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str((size_mib + 1) * MiB),
            # One arena, no mmap for big blocks, no trimming: a freed 200 MiB buffer is reused by the
            # next copy (moto's werkzeug threads would otherwise each get new zero-filled pages).
            "MALLOC_ARENA_MAX": "1",
            "MALLOC_MMAP_MAX_": "0",
            "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
        },
        note=f"~{need / 2**30:.1f} GiB of RAM for {2 * regions + 1} objects",
        prefault=objects,
    )


def _prefault(total: int, block: int = 64 * MiB) -> None:
    """Grow the heap to `total` bytes, writing every page, and free it: with MALLOC_TRIM_THRESHOLD_
    high the pages stay mapped, so objects allocated later reuse them instead of faulting."""
    blocks = [b"\x01" * block for _ in range(total // block)]  # bytes * n: malloc + memset
    del blocks


def _serve(conn: Connection, prefault: int = 0) -> None:
    """Child process: moto's S3 server; answers each message with its own (CPU seconds, peak RSS KiB)."""
    if prefault:
        _prefault(prefault)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer
    from moto.settings import get_s3_default_key_buffer_size

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send((*server.get_host_and_port(), get_s3_default_key_buffer_size()))
    try:
        while conn.recv() != "stop":
            t = os.times()
            conn.send((t.user + t.system, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    except EOFError:  # the benchmark died: go with it
        pass
    finally:
        server.stop()


class MotoProcess:
    """moto's S3 server in a spawned child process (no fork: the parent may hold threads and locks)."""

    def __init__(self, storage: MotoStorage | None = None) -> None:
        self.storage = storage or MotoStorage("disk", {})
        self.key_buffer = 0  # what the running server reports (moto reads it per object)

    def __enter__(self) -> MotoProcess:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.storage.prefault), name="moto-s3", daemon=True)
        # The child inherits os.environ at exec: glibc reads its MALLOC_* settings only at
        # start-up, so they cannot be set from inside the child. Restored right after.
        saved = {k: os.environ.get(k) for k in self.storage.env}
        try:
            os.environ.update(self.storage.env)
            self._proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        if not self._conn.poll(180):  # with a prefault it first writes every page of its RAM
            self._proc.kill()
            raise RuntimeError("moto's S3 server did not start within 180 s")
        host, port, self.key_buffer = self._conn.recv()
        self.url = f"http://{host}:{port}"
        return self

    def usage(self) -> tuple[float, int]:
        """(CPU seconds so far, peak RSS in KiB) of the server process."""
        self._conn.send("usage")
        cpu, rss = self._conn.recv()
        return float(cpu), int(rss)

    def reset(self) -> None:
        """Drop every bucket and object (moto frees their temporary files)."""
        requests.post(f"{self.url}/moto-api/reset", timeout=120).raise_for_status()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):  # the child is already gone
            self._conn.send("stop")
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


@dataclass
class BenchRun:
    regions: int
    seconds: float  # wall time, from the first call to every region done
    client_cpu: float  # CPU seconds of this process (the publisher: hashing, boto3, threads)
    server_cpu: float  # CPU seconds of the S3 server process
    sent_mib: float = 0.0  # uploaded from this host
    copied_mib: float = 0.0  # copied server-side (inside the S3 server)
    ok: bool = True


def _mean(a: BenchRun, b: BenchRun) -> BenchRun:
    return BenchRun(
        a.regions,
        (a.seconds + b.seconds) / 2,
        (a.client_cpu + b.client_cpu) / 2,
        (a.server_cpu + b.server_cpu) / 2,
        a.sent_mib,
        a.copied_mib,
        a.ok and b.ok,
    )


@dataclass
class BenchResult:
    size_mib: int
    one: BenchRun  # publish to 1 region: mean of a run before and a run after the N-region one
    many: BenchRun
    floor_one: BenchRun
    floor_many: BenchRun
    baseline_runs: tuple[float, float] = (0.0, 0.0)  # 1-region wall times before / after
    server_peak_rss_mib: float = 0.0
    cpus: int = 1
    storage: str = ""  # the printed "moto key buffer: ..." line
    storage_name: str = "disk"  # the server storage actually used (memory may have fallen back)

    @property
    def ratio(self) -> float:
        return self.many.seconds / self.one.seconds

    def render(self) -> str:
        n = self.many.regions
        head = f"{'':<34}{'1 region':>10}{f'{n} regions':>12}{'ratio':>9}"

        def row(label: str, one: float, many: float, fmt: str = ".2f", ratio: bool = True) -> str:
            tail = f"{many / one:>8.2f}x" if ratio and one > 0 else ""
            return f"{label:<34}{one:>10{fmt}}{many:>12{fmt}}{tail}"

        server_bound = self.floor_many.server_cpu / self.cpus  # seconds, if the server used every CPU
        rows = [
            f"publish benchmark: {self.size_mib} MiB artifact, moto S3 server (own process) over HTTP on "
            f"127.0.0.1, {self.cpus} CPUs shared by both",
            head,
            row("publish: wall (s)", self.one.seconds, self.many.seconds)
            + f"   (1 region: {self.baseline_runs[0]:.2f} s before, {self.baseline_runs[1]:.2f} s after)",
            row("raw floor: wall (s)", self.floor_one.seconds, self.floor_many.seconds),
            row(
                "publish / raw floor, wall",
                self.one.seconds / self.floor_one.seconds,
                self.many.seconds / self.floor_many.seconds,
                ratio=False,
            ),
            row("client CPU, publish (s)", self.one.client_cpu, self.many.client_cpu),
            row("client CPU, raw floor (s)", self.floor_one.client_cpu, self.floor_many.client_cpu),
            row("S3 server CPU, publish (s)", self.one.server_cpu, self.many.server_cpu),
            row("S3 server CPU, raw floor (s)", self.floor_one.server_cpu, self.floor_many.server_cpu),
            row("MiB sent from this host", self.one.sent_mib, self.many.sent_mib, ".0f", ratio=False),
            row("MiB copied inside S3", self.one.copied_mib, self.many.copied_mib, ".0f", ratio=False),
            f"{'all verified':<34}{'yes' if self.one.ok else 'NO':>10}{'yes' if self.many.ok else 'NO':>12}",
            self.storage,
            f"raw floor = 1 upload + {2 * n - 1} server-side copies with boto3, no hashing/verification/ordering; "
            f"S3 server peak RSS {self.server_peak_rss_mib:.0f} MiB",
            f"the S3 server's own work for {n} regions is {self.floor_many.server_cpu:.1f} CPU-s even on the floor: "
            f">= {server_bound:.1f} s on {self.cpus} CPUs = {server_bound / self.one.seconds:.1f}x the 1-region "
            "publish (on AWS that work is S3's, not this host's)",
            f"target: {n} regions <= 3x one region -> " + ("met" if self.ratio <= 3 else "NOT met"),
        ]
        return "\n".join(rows)


def write_artifact(path: Path, size_mib: int) -> None:
    """Incompressible bytes, written block by block."""
    with path.open("wb") as fh:
        for _ in range(size_mib):
            fh.write(os.urandom(MiB))


def _client(url: str, region: str = "us-east-1") -> Any:
    return boto3.client(
        "s3",
        region_name=region,
        endpoint_url=url,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=64),
    )


def _make_buckets(url: str, regions: list[str]) -> None:
    s3 = _client(url)
    for region in regions:
        for bucket in (f"{PREFIX}-{region}", f"{PREFIX}-hashes-{region}"):
            conf = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            s3.create_bucket(Bucket=bucket, **conf)


def _measured(server: MotoProcess, regions: list[str], work: Callable[[], BenchRun]) -> BenchRun:
    """Run `work` on fresh buckets and fill in its wall time and both processes' CPU seconds."""
    server.reset()  # frees the previous run's objects
    _make_buckets(server.url, regions)
    cpu0, start, (server0, _) = os.times(), time.monotonic(), server.usage()
    run = work()
    run.seconds = time.monotonic() - start
    cpu1 = os.times()
    run.client_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    run.server_cpu = server.usage()[0] - server0
    return run


def _publish(server: MotoProcess, regions: list[str], artifact: Path, workdir: Path, jobs: int) -> BenchRun:
    opts = PublishOptions(
        regions=regions,
        version=VERSION,
        iso=artifact,
        endpoint_url=server.url,
        release_dir=workdir / "release",
        progress="none",
        jobs=jobs,
    )

    def work() -> BenchRun:
        report = publish_release(opts, io.StringIO())
        sent = sum(r.sent_bytes for r in report.results) / MiB
        copied = sum(r.bytes - r.sent_bytes for r in report.results) / MiB
        return BenchRun(len(regions), 0.0, 0.0, 0.0, sent, copied, report.ok)

    return _measured(server, regions, work)


def _raw_floor(server: MotoProcess, regions: list[str], artifact: Path, jobs: int) -> BenchRun:
    """The same large objects with the fewest calls: upload once, copy server-side everywhere else."""
    transfer = transfer_config(PublishOptions(regions=regions, version=VERSION, iso=artifact))
    key, latest = f"{VERSION}/failback_livecd/{artifact.name}", f"latest/failback_livecd/{artifact.name}"
    first = f"{PREFIX}-{regions[0]}"
    checksum = {"ChecksumAlgorithm": "SHA256"}  # what the publisher asks S3 for, on uploads and copies

    def work() -> BenchRun:
        s3 = _client(server.url)
        s3.upload_file(str(artifact), first, key, ExtraArgs=checksum, Config=transfer)

        def region(r: str) -> None:
            bucket = f"{PREFIX}-{r}"
            if bucket != first:
                s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": first, "Key": key}, **checksum)
            s3.copy_object(Bucket=bucket, Key=latest, CopySource={"Bucket": bucket, "Key": key}, **checksum)

        # as many copies in flight as the publisher allows itself against this server
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(regions), default_transfer_jobs(server.url)))) as pool:
            list(pool.map(region, regions))
        size = artifact.stat().st_size / MiB
        return BenchRun(len(regions), 0.0, 0.0, 0.0, size, size * (2 * len(regions) - 1))

    return _measured(server, regions, work)


def run_benchmark(
    size_mib: int = 200,
    regions: int = 28,
    workdir: Path | None = None,
    jobs: int = 30,
    storage: MotoStorage | None = None,
) -> BenchResult:
    storage = storage or moto_storage("memory", size_mib, regions)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # moto accepts any credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    base = OUT_DIR.parent / "bench"
    base.mkdir(parents=True, exist_ok=True)
    one, many = ["us-east-1"], list(COMMERCIAL_REGIONS[:regions])
    with tempfile.TemporaryDirectory(dir=workdir or base) as tmp:
        work = Path(tmp)
        artifact = work / ARTIFACT
        write_artifact(artifact, size_mib)
        with MotoProcess(storage) as server:
            # The host is shared (2 CPUs, other builds): the 1-region publish is timed before AND
            # after the N-region one and their mean used, so load drift biases neither side.
            before = _publish(server, one, artifact, work, jobs)
            many_run = _publish(server, many, artifact, work, jobs)
            floor_many = _raw_floor(server, many, artifact, jobs)
            floor_one = _raw_floor(server, one, artifact, jobs)
            after = _publish(server, one, artifact, work, jobs)
            server.reset()
            peak_rss = server.usage()[1] / 1024
            described = server.storage.describe(server.key_buffer)
    return BenchResult(
        size_mib,
        _mean(before, after),
        many_run,
        floor_one,
        floor_many,
        (before.seconds, after.seconds),
        peak_rss,
        os.cpu_count() or 1,
        described,
        server.storage.name,
    )


def render_comparison(disk: BenchResult, memory: BenchResult) -> str:
    """One run, two server storages: what keeping moto's objects in RAM changed."""
    n = disk.many.regions

    def per_copy(r: BenchResult) -> float:
        return r.floor_many.server_cpu / (2 * n - 1)  # ~ the floor's server CPU per copy

    return "\n".join(
        [
            f"moto storage, same run:{disk.storage_name:>15}{memory.storage_name:>10}",
            f"{'publish 1 region (s)':<23}{disk.one.seconds:>15.2f}{memory.one.seconds:>10.2f}",
            f"{f'publish {n} regions (s)':<23}{disk.many.seconds:>15.2f}{memory.many.seconds:>10.2f}",
            f"{'ratio':<23}{disk.ratio:>14.2f}x{memory.ratio:>9.2f}x",
            f"{'floor N regions (s)':<23}{disk.floor_many.seconds:>15.2f}{memory.floor_many.seconds:>10.2f}",
            f"{'server CPU, publish N':<23}{disk.many.server_cpu:>15.1f}{memory.many.server_cpu:>10.1f}",
            f"{'server CPU-s per copy':<23}{per_copy(disk):>15.2f}{per_copy(memory):>10.2f}",
        ]
    )


def main(
    size_mib: int = 200, regions: int = 28, jobs: int = 30, moto_buffer: str = "memory", out: TextIO = sys.stdout
) -> int:
    """Print the benchmark; `moto_buffer` is memory, disk or both (both: the two, then a comparison)."""
    if moto_buffer not in {"memory", "disk", "both"}:
        print(f"bench-publish: bad --moto-buffer {moto_buffer!r}: use memory, disk or both", file=sys.stderr)
        return 2
    names = ["disk", "memory"] if moto_buffer == "both" else [moto_buffer]
    results = []
    for name in names:
        result = run_benchmark(size_mib, regions, jobs=jobs, storage=moto_storage(name, size_mib, regions))
        print(result.render() + "\n", file=out, flush=True)
        results.append(result)
    if len(results) == 2:
        print(render_comparison(*results), file=out)
    return 0 if all(r.one.ok and r.many.ok for r in results) else 1
