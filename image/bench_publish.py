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

from image.publish import OUT_DIR, PublishOptions, default_transfer_jobs, publish_release, transfer_config
from image.publish_regions import COMMERCIAL_REGIONS

MiB = 1024 * 1024
ARTIFACT = "aws-failback-livecd-64bit.iso"
PREFIX = "aws-elastic-disaster-recovery"
VERSION = "bench-1"


def _serve(conn: Connection) -> None:
    """Child process: moto's S3 server; answers each message with its own (CPU seconds, peak RSS KiB)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
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

    def __enter__(self) -> MotoProcess:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="moto-s3", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("moto's S3 server did not start within 60 s")
        host, port = self._conn.recv()
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
    return BenchRun(a.regions, (a.seconds + b.seconds) / 2, (a.client_cpu + b.client_cpu) / 2,
                    (a.server_cpu + b.server_cpu) / 2, a.sent_mib, a.copied_mib, a.ok and b.ok)


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
            row("publish / raw floor, wall", self.one.seconds / self.floor_one.seconds,
                self.many.seconds / self.floor_many.seconds, ratio=False),
            row("client CPU, publish (s)", self.one.client_cpu, self.many.client_cpu),
            row("client CPU, raw floor (s)", self.floor_one.client_cpu, self.floor_many.client_cpu),
            row("S3 server CPU, publish (s)", self.one.server_cpu, self.many.server_cpu),
            row("S3 server CPU, raw floor (s)", self.floor_one.server_cpu, self.floor_many.server_cpu),
            row("MiB sent from this host", self.one.sent_mib, self.many.sent_mib, ".0f", ratio=False),
            row("MiB copied inside S3", self.one.copied_mib, self.many.copied_mib, ".0f", ratio=False),
            f"{'all verified':<34}{'yes' if self.one.ok else 'NO':>10}{'yes' if self.many.ok else 'NO':>12}",
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
    return boto3.client("s3", region_name=region, endpoint_url=url,
                        config=Config(s3={"addressing_style": "path"}, max_pool_connections=64))


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
    opts = PublishOptions(regions=regions, version=VERSION, iso=artifact, endpoint_url=server.url,
                          release_dir=workdir / "release", progress="none", jobs=jobs)

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


def run_benchmark(size_mib: int = 200, regions: int = 28, workdir: Path | None = None, jobs: int = 30) -> BenchResult:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # moto accepts any credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    base = OUT_DIR.parent / "bench"
    base.mkdir(parents=True, exist_ok=True)
    one, many = ["us-east-1"], list(COMMERCIAL_REGIONS[:regions])
    with tempfile.TemporaryDirectory(dir=workdir or base) as tmp:
        work = Path(tmp)
        artifact = work / ARTIFACT
        write_artifact(artifact, size_mib)
        with MotoProcess() as server:
            # The host is shared (2 CPUs, other builds): the 1-region publish is timed before AND
            # after the N-region one and their mean used, so load drift biases neither side.
            before = _publish(server, one, artifact, work, jobs)
            many_run = _publish(server, many, artifact, work, jobs)
            floor_many = _raw_floor(server, many, artifact, jobs)
            floor_one = _raw_floor(server, one, artifact, jobs)
            after = _publish(server, one, artifact, work, jobs)
            server.reset()
            peak_rss = server.usage()[1] / 1024
    return BenchResult(size_mib, _mean(before, after), many_run, floor_one, floor_many,
                       (before.seconds, after.seconds), peak_rss, os.cpu_count() or 1)


def main(size_mib: int = 200, regions: int = 28, jobs: int = 30, out: TextIO = sys.stdout) -> int:
    result = run_benchmark(size_mib, regions, jobs=jobs)
    print(result.render(), file=out)
    return 0 if result.one.ok and result.many.ok else 1
