"""Release publishing: the ISO (and the replication assets) to every DRS region's S3 buckets.

`publish_release()` hashes the artifacts once (streamed), builds the plan (image.release.publish.plan),
optionally signs SHA512SUMS with GPG, then publishes the regions in parallel
(image.release.publish.s3), one thread per region. The first region of each partition uploads the
artifacts; the others copy them server-side from it once they are verified there, so the
bytes leave this host once per partition. Large-object writes share one budget across the
regions (`default_transfer_jobs`). The exit status (`publish_command`) is 0 only if every
region ended verified.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ProfileNotFound
from s3transfer.utils import ChunksizeAdjuster

from image.core.errors import ImageError
from image.core.run import CommandError, run
from image.release.publish.plan import (
    ASSETS_FOLDER,
    ASSETS_NAME,
    DEFAULT_BUCKET_PREFIX,
    LIVECD_FOLDER,
    LocalArtifact,
    PlanError,
    ReleasePlan,
    build_plan,
    check_version,
    render_plan,
    s3_digests_of_file,
    seed_regions,
    sums_text,
)
from image.release.publish.progress import RegionResult, make_reporter, render_table
from image.release.publish.regions import RegionError, parse_regions
from image.release.publish.s3 import RegionPublisher, S3Settings, SeedBoard, StepHook
from image.stages.hashes import sha512_file

log = logging.getLogger("image.release.publish.cli")

REPO = Path(__file__).resolve().parents[3]
OUT_DIR = REPO / "build" / "out"
MiB = 1024 * 1024


@dataclass
class PublishOptions:
    regions: list[str]
    version: str
    iso: Path
    assets: Path | None = None
    endpoint_url: str | None = None
    bucket_prefix: str = DEFAULT_BUCKET_PREFIX
    expected_owner: str | None = None
    acl: str | None = None  # e.g. "public-read"; None for bucket-owner-enforced buckets
    gpg_key: str | None = None
    gpg_homedir: Path | None = None
    dry_run: bool = False
    jobs: int = 30  # regions published at once (all DRS regions: the work is mostly waiting on S3)
    seed_copy: bool = True
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 4  # parts in flight per upload
    transfer_jobs: int | None = None  # large-object writes in flight across all regions (None: default_transfer_jobs)
    release_dir: Path = OUT_DIR / "release"
    progress: str = "auto"  # auto | rich | plain | none
    profile: str | None = None
    session: boto3.Session | None = None  # tests hook events on it; default: the standard chain
    on_step: StepHook | None = None  # tests: called after each object is in place


@dataclass
class PublishReport:
    plan: ReleasePlan
    results: list[RegionResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)


class PublishError(ImageError, ValueError):
    """Bad publish input, reported before anything is written."""


def default_iso_path() -> Path:
    """build/out/<artifact> with the artifact name of the image definition."""
    from image.stages.config import load_config

    return OUT_DIR / load_config(REPO / "image" / "image.yaml").iso.artifact


def default_transfer_jobs(endpoint_url: str | None) -> int:
    """Large-object writes (uploads, server-side copies) in flight at once across all regions.

    On AWS a copy is S3's work and 8 keep every region moving. An S3 server on this host (moto,
    MinIO on loopback) does every copy with our own CPUs: more copies in flight than CPUs only
    make each one slower (and longer than botocore's read timeout, which retries it).
    """
    host = urlsplit(endpoint_url).hostname if endpoint_url else None
    if host is not None and (host == "localhost" or _is_loopback(host)):
        return max(1, os.cpu_count() or 1)
    return 8


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transfer_config(opts: PublishOptions) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=opts.multipart_threshold,
        multipart_chunksize=opts.multipart_chunksize,
        max_concurrency=opts.max_concurrency,
        use_threads=True,
    )


def _read_sidecar(path: Path) -> str | None:
    side = path.with_name(path.name + ".sha512")
    if not side.is_file():
        return None
    words = side.read_text().split()
    return words[0].lower() if words else ""


def hash_artifact(path: Path, folder: str, name: str, content_type: str, transfer: TransferConfig) -> LocalArtifact:
    """Stream the file twice: SHA512 (published) and the SHA256s S3 will report (verification)."""
    if not path.is_file():
        what = "ISO" if folder == LIVECD_FOLDER else "assets tarball"
        raise PublishError(f"{what} {path} does not exist: build it first (inv build) or pass its path")
    size = path.stat().st_size
    digest = sha512_file(path)
    side = _read_sidecar(path)
    if side is not None and side != digest:
        raise PublishError(f"{path}.sha512 does not match {path} (stale?): rebuild, or delete the .sha512 file")
    part = ChunksizeAdjuster().adjust_chunksize(transfer.multipart_chunksize, size)
    s3 = s3_digests_of_file(path, part)
    return LocalArtifact(path, name, folder, content_type, size, digest, s3)


def sign_sums(sums: str, key: str, out_dir: Path, homedir: Path | None = None) -> bytes:
    """Detached ASCII-armoured signature of SHA512SUMS, reused while the file and key are unchanged
    (a new signature has a new timestamp, which would re-publish an unchanged release)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sums_path, sig_path, key_path = out_dir / "SHA512SUMS", out_dir / "SHA512SUMS.asc", out_dir / "SHA512SUMS.key"
    env = {"GNUPGHOME": str(homedir)} if homedir else None
    gpg = ["gpg", *([] if sys.stdin.isatty() else ["--batch"])]
    reusable = (
        sums_path.is_file()
        and sums_path.read_text() == sums
        and sig_path.is_file()
        and key_path.is_file()
        and key_path.read_text() == key
    )
    if reusable:
        try:
            run([*gpg, "--verify", sig_path, sums_path], env=env, capture=True)
            return sig_path.read_bytes()
        except CommandError:
            log.info("old signature of %s does not verify: signing again", sums_path)
    sums_path.write_text(sums)
    try:
        run(
            [*gpg, "--yes", "--local-user", key, "--armor", "--detach-sign", "--output", sig_path, sums_path],
            env=env,
            capture=True,
        )
    except CommandError as exc:
        raise PublishError(
            f"gpg could not sign {sums_path} with key {key!r} (is the secret key in the keyring"
            f"{' ' + str(homedir) if homedir else ''}, and its passphrase available to gpg-agent?)\n"
            + exc.output.strip()
        ) from None
    key_path.write_text(key)
    return sig_path.read_bytes()


def prepare(opts: PublishOptions) -> ReleasePlan:
    """Validate the input, hash the artifacts and build the plan (no S3 call)."""
    check_version(opts.version)
    if not opts.regions:
        raise PublishError("no region to publish to")
    transfer = transfer_config(opts)
    artifacts = [hash_artifact(opts.iso, LIVECD_FOLDER, opts.iso.name, "application/x-iso9660-image", transfer)]
    if opts.assets is not None:
        if opts.assets.name != ASSETS_NAME:
            log.info("publishing %s as %s", opts.assets, ASSETS_NAME)
        artifacts.append(hash_artifact(opts.assets, ASSETS_FOLDER, ASSETS_NAME, "application/gzip", transfer))
    sig = None
    release_dir = opts.release_dir / opts.version
    if opts.gpg_key:
        sig = sign_sums(sums_text(artifacts), opts.gpg_key, release_dir, opts.gpg_homedir)
    else:
        release_dir.mkdir(parents=True, exist_ok=True)
        (release_dir / "SHA512SUMS").write_text(sums_text(artifacts))
    return build_plan(opts.regions, opts.version, artifacts, opts.bucket_prefix, sig)


def publish_release(opts: PublishOptions, out: TextIO = sys.stdout) -> PublishReport:
    """Publish (or, with dry_run, print) the release; per-region failures are in the report."""
    plan = prepare(opts)
    report = PublishReport(plan)
    if opts.dry_run:
        print(render_plan(plan, opts.seed_copy), file=out)
        return report
    settings = S3Settings(
        session=opts.session or boto3.Session(profile_name=opts.profile),
        transfer=transfer_config(opts),
        endpoint_url=opts.endpoint_url,
        expected_owner=opts.expected_owner,
        acl=opts.acl,
        seed_copy=opts.seed_copy,
        budget=threading.BoundedSemaphore(opts.transfer_jobs or default_transfer_jobs(opts.endpoint_url)),
    )
    board = SeedBoard()
    seeds = seed_regions(opts.regions)
    reporter = make_reporter(opts.progress, out)
    publishers = [
        RegionPublisher(rp, settings, reporter, board, seeds[rp.partition] == rp.region, opts.on_step)
        for rp in plan.regions
    ]
    # Seeds first: a region waiting for its seed must never hold the pool slot the seed needs.
    order = sorted(publishers, key=lambda p: not p.is_seed)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(opts.jobs, len(order))), thread_name_prefix="publish") as pool:
            futures = {p.plan.region: pool.submit(p.run) for p in order}
            report.results = [futures[rp.region].result() for rp in plan.regions]
    finally:
        reporter.close()
    render_table(
        report.results, rich_output=opts.progress == "rich" or (opts.progress == "auto" and out.isatty()), out=out
    )
    for r in report.results:
        for note in r.notes:
            print(f"note [{r.region}]: {note}", file=out)
    return report


def publish_command(
    regions: str,
    version: str,
    iso: str | None = None,
    assets: str | None = None,
    endpoint_url: str | None = None,
    bucket_prefix: str = DEFAULT_BUCKET_PREFIX,
    expected_owner: str | None = None,
    acl: str | None = None,
    gpg_key: str | None = None,
    dry_run: bool = False,
    jobs: int = 30,
    transfer_jobs: int = 0,
    seed_copy: bool = True,
    multipart_threshold_mib: int = 64,
    multipart_chunksize_mib: int = 16,
    progress: str = "auto",
    profile: str | None = None,
    release_dir: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """The `inv publish` entry: string options in, exit status out (0 = every region verified)."""
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "found credentials in ..." noise
    try:
        opts = PublishOptions(
            regions=parse_regions(regions),
            version=version,
            iso=Path(iso) if iso else default_iso_path(),
            assets=Path(assets) if assets else None,
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None,
            bucket_prefix=bucket_prefix,
            expected_owner=expected_owner,
            acl=acl,
            gpg_key=gpg_key,
            dry_run=dry_run,
            jobs=jobs,
            transfer_jobs=transfer_jobs or None,
            seed_copy=seed_copy,
            multipart_threshold=multipart_threshold_mib * MiB,
            multipart_chunksize=multipart_chunksize_mib * MiB,
            progress=progress,
            profile=profile,
            release_dir=Path(release_dir) if release_dir else OUT_DIR / "release",
        )
        if transfer_jobs < 0:
            raise PublishError("--transfer-jobs must be at least 1 (0: the default)")
        if opts.multipart_chunksize < 5 * MiB:
            raise PublishError("--multipart-chunksize-mib must be at least 5 (the S3 minimum part size)")
        report = publish_release(opts, out)
    except (RegionError, PlanError, PublishError, ProfileNotFound) as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        return 0
    failed = [r.region for r in report.results if not r.ok]
    if failed:
        print(
            f"publish: FAILED in {len(failed)} of {len(report.results)} region(s): {', '.join(failed)}", file=sys.stderr
        )
        return 1
    print(f"publish: {opts.version} verified in {len(report.results)} region(s)", file=out)
    return 0
