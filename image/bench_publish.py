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

from image.publish import OUT_DIR, PublishOptions, publish_release
from image.publish_regions import COMMERCIAL_REGIONS

MiB = 1024 * 1024
ARTIFACT = "aws-failback-livecd-64bit.iso"


@dataclass
class BenchRun:
    regions: int
    seconds: float  # the whole publish: hashing the artifact + every region verified
    s3_seconds: float  # the S3 part alone (slowest region)
    ok: bool


@dataclass
class BenchResult:
    size_mib: int
    one: BenchRun
    many: BenchRun

    @property
    def ratio(self) -> float:
        return self.many.seconds / self.one.seconds

    def render(self) -> str:
        rows = [
            f"publish benchmark: {self.size_mib} MiB artifact, moto S3 over HTTP on 127.0.0.1",
            f"{'':<22}{'1 region':>12}{f'{self.many.regions} regions':>14}{'ratio':>9}",
            f"{'wall time (s)':<22}{self.one.seconds:>12.2f}{self.many.seconds:>14.2f}{self.ratio:>8.2f}x",
            f"{'S3 part only (s)':<22}{self.one.s3_seconds:>12.2f}{self.many.s3_seconds:>14.2f}"
            f"{self.many.s3_seconds / self.one.s3_seconds:>8.2f}x",
            f"{'all verified':<22}{'yes' if self.one.ok else 'NO':>12}{'yes' if self.many.ok else 'NO':>14}",
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


def _one_run(url: str, regions: list[str], artifact: Path, workdir: Path) -> BenchRun:
    requests.post(f"{url}/moto-api/reset", timeout=30).raise_for_status()  # frees the previous run's objects
    _make_buckets(url, regions)
    opts = PublishOptions(regions=regions, version="bench-1", iso=artifact, endpoint_url=url,
                          release_dir=workdir / "release", progress="none", jobs=8)
    start = time.monotonic()
    report = publish_release(opts, io.StringIO())
    seconds = time.monotonic() - start
    return BenchRun(len(regions), seconds, max(r.seconds for r in report.results), report.ok)


def run_benchmark(size_mib: int = 200, regions: int = 28, workdir: Path | None = None) -> BenchResult:
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
            one = _one_run(url, ["us-east-1"], artifact, work)
            many = _one_run(url, list(COMMERCIAL_REGIONS[:regions]), artifact, work)
            requests.post(f"{url}/moto-api/reset", timeout=30)
        finally:
            server.stop()
    return BenchResult(size_mib, one, many)


def main(size_mib: int = 200, regions: int = 28, out: TextIO = sys.stdout) -> int:
    result = run_benchmark(size_mib, regions)
    print(result.render(), file=out)
    return 0 if result.one.ok and result.many.ok else 1
