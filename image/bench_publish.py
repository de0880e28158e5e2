"""Benchmark: wall time of publishing one artifact to 1 region and to N regions on loopback.

Both runs go to moto's S3 server over HTTP on 127.0.0.1 (started here, in this process) with
the real publish code. Figures are printed side by side with their ratio (target: 28 regions
≤ 3× one region); nothing is asserted on time. The artifact is written in 1 MiB blocks and
every transfer streams, so memory stays far below the artifact size on our side.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import boto3
import requests
from botocore.config import Config

from image.publish import OUT_DIR, PublishOptions, prepare, publish_release
from image.publish_regions import COMMERCIAL_REGIONS

MiB = 1024 * 1024
ARTIFACT = "aws-failback-livecd-64bit.iso"


@dataclass
class BenchRun:
    regions: int
    seconds: float  # the whole publish: hashing the artifact + every region verified
    hash_seconds: float  # of which hashing the artifact (the same for any number of regions)
    sent_mib: float  # uploaded from this host
    copied_mib: float  # copied server-side (inside the S3 server)
    ok: bool

    @property
    def s3_seconds(self) -> float:
        return self.seconds - self.hash_seconds


@dataclass
class BenchResult:
    size_mib: int
    one: BenchRun
    many: BenchRun
    server_copy_seconds: float  # the S3 server's own cost of one server-side copy of the artifact
    baseline_runs: tuple[float, float] = (0.0, 0.0)  # 1-region wall times before / after the N-region run

    @property
    def ratio(self) -> float:
        return self.many.seconds / self.one.seconds

    def render(self) -> str:
        copies = self.many.copied_mib / self.size_mib
        cpus = os.cpu_count() or 1
        floor = copies * self.server_copy_seconds / cpus
        rows = [
            f"publish benchmark: {self.size_mib} MiB artifact, moto S3 over HTTP on 127.0.0.1",
            f"{'':<22}{'1 region':>12}{f'{self.many.regions} regions':>14}{'ratio':>9}",
            f"{'wall time (s)':<22}{self.one.seconds:>12.2f}{self.many.seconds:>14.2f}{self.ratio:>8.2f}x"
            f"   (1 region: {self.baseline_runs[0]:.2f} s before, {self.baseline_runs[1]:.2f} s after)",
            f"{'S3 part only (s)':<22}{self.one.s3_seconds:>12.2f}{self.many.s3_seconds:>14.2f}"
            f"{self.many.s3_seconds / self.one.s3_seconds:>8.2f}x",
            f"{'MiB sent from host':<22}{self.one.sent_mib:>12.0f}{self.many.sent_mib:>14.0f}",
            f"{'MiB copied in S3':<22}{self.one.copied_mib:>12.0f}{self.many.copied_mib:>14.0f}",
            f"{'all verified':<22}{'yes' if self.one.ok else 'NO':>12}{'yes' if self.many.ok else 'NO':>14}",
            f"one server-side copy of the artifact inside moto (same host, same CPUs): "
            f"{self.server_copy_seconds:.2f} s; the {self.many.regions}-region run makes "
            f"{copies:.0f} of them: >= {floor:.0f} s of server work even spread over {cpus} CPUs "
            f"(a ratio floor of ~{floor / self.one.seconds:.1f}x on this host; on S3 that work is S3's)",
            f"target: {self.many.regions} regions <= 3x one region -> "
            + ("met" if self.ratio <= 3 else "NOT met"),
        ]
        return "\n".join(rows)


def write_artifact(path: Path, size_mib: int) -> None:
    """Incompressible bytes, written block by block."""
    with path.open("wb") as fh:
        for _ in range(size_mib):
            fh.write(os.urandom(MiB))


def _make_buckets(url: str, regions: list[str]) -> None:
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=url, config=Config(s3={"addressing_style": "path"}))
    for region in regions:
        for bucket in (f"aws-elastic-disaster-recovery-{region}", f"aws-elastic-disaster-recovery-hashes-{region}"):
            conf = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            s3.create_bucket(Bucket=bucket, **conf)


def _one_run(url: str, regions: list[str], artifact: Path, workdir: Path, jobs: int) -> BenchRun:
    requests.post(f"{url}/moto-api/reset", timeout=30).raise_for_status()  # frees the previous run's objects
    _make_buckets(url, regions)
    opts = PublishOptions(regions=regions, version="bench-1", iso=artifact, endpoint_url=url,
                          release_dir=workdir / "release", progress="none", jobs=jobs)
    start = time.monotonic()
    prepare(opts)  # hashing alone, to split it out of the figure below
    hash_seconds = time.monotonic() - start
    start = time.monotonic()
    report = publish_release(opts, io.StringIO())
    seconds = time.monotonic() - start
    sent = sum(r.sent_bytes for r in report.results) / MiB
    copied = sum(r.bytes - r.sent_bytes for r in report.results) / MiB
    return BenchRun(len(regions), seconds, hash_seconds, sent, copied, report.ok)


def _server_copy_seconds(url: str) -> float:
    """Time moto takes for one CopyObject of the artifact (left by the 1-region run)."""
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=url, config=Config(s3={"addressing_style": "path"}))
    bucket = "aws-elastic-disaster-recovery-us-east-1"
    start = time.monotonic()
    source = {"Bucket": bucket, "Key": f"bench-1/failback_livecd/{ARTIFACT}"}
    s3.copy_object(Bucket=bucket, Key="bench-copy", CopySource=source, ChecksumAlgorithm="SHA256")
    return time.monotonic() - start


def run_benchmark(size_mib: int = 200, regions: int = 28, workdir: Path | None = None, jobs: int = 30) -> BenchResult:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # moto accepts any credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    base = OUT_DIR.parent / "bench"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir or base) as tmp:
        work = Path(tmp)
        artifact = work / ARTIFACT
        write_artifact(artifact, size_mib)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            # The host is shared (2 CPUs, other builds): time the baseline before AND after the
            # N-region run and use their mean, so load drift biases neither side.
            before = _one_run(url, ["us-east-1"], artifact, work, jobs)
            copy_seconds = _server_copy_seconds(url)
            many = _one_run(url, list(COMMERCIAL_REGIONS[:regions]), artifact, work, jobs)
            after = _one_run(url, ["us-east-1"], artifact, work, jobs)
            one = BenchRun(1, (before.seconds + after.seconds) / 2, (before.hash_seconds + after.hash_seconds) / 2,
                           before.sent_mib, before.copied_mib, before.ok and after.ok)
            baseline_runs = (before.seconds, after.seconds)
            requests.post(f"{url}/moto-api/reset", timeout=30)
        finally:
            server.stop()
    return BenchResult(size_mib, one, many, copy_seconds, baseline_runs)


def main(size_mib: int = 200, regions: int = 28, jobs: int = 30, out: TextIO = sys.stdout) -> int:
    result = run_benchmark(size_mib, regions, jobs=jobs)
    print(result.render(), file=out)
    return 0 if result.one.ok and result.many.ok else 1
