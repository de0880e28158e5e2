"""What a release publish writes: every object, in which bucket, under which key, in which order.

The plan is computed locally (no S3 call), so `--dry-run` can print it without credentials. Its
order is the safety argument of the whole publish (each step only makes visible what the
previous steps have already put in place and verified):

1. `artifact`     versioned artifacts in the release bucket (`{version}/failback_livecd/…`)
2. `hash`         their `.sha512` files and SHA512SUMS(.asc) in the hashes bucket
3. `latest`       server-side copies of the verified versioned objects to `latest/…`
4. `latest-hash`  the `latest/…sha512` files (after the object they describe)
5. `manifest`     `latest/manifest.json`, which points at `{installerVersion}/failback_assets/`, and
                  `latest/failback_livecd/version.json`, the release version of the latest ISO (the
                  failback client reads it to tell the admin a newer ISO exists)
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from failback_client.regions import hashes_bucket, release_bucket

from image.core.errors import ImageError
from image.release.publish.regions import partition_of

LIVECD_FOLDER = "failback_livecd"
ASSETS_FOLDER = "failback_assets"
ASSETS_NAME = "failback_assets.tar.gz"
DEFAULT_BUCKET_PREFIX = "aws-elastic-disaster-recovery"
PHASES = ("artifact", "hash", "latest", "latest-hash", "manifest")

_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_READ_BLOCK = 1024 * 1024


class PlanError(ImageError, ValueError):
    """Bad publish input (version, bucket prefix, artifact file)."""


@dataclass(frozen=True)
class S3Digests:
    """What S3 may report as the SHA256 checksum of an object with these bytes.

    A single PUT (or a copy with ChecksumAlgorithm) stores the full-object SHA256; a multipart
    upload stores the "composite" one: SHA256 over the parts' SHA256 digests, which depends on
    the part size. Both are computed from the local file, so either one proves the bucket holds
    exactly our bytes.
    """

    full: str
    composite: str | None = None

    def accepts(self, reported: str | None) -> bool:
        if not reported:
            return False
        value = reported.split("-", 1)[0]  # AWS appends "-<parts>" to composite checksums
        return value in {self.full, self.composite}


@dataclass(frozen=True)
class LocalArtifact:
    """A file to publish, hashed once (streamed) for all regions."""

    path: Path
    name: str
    folder: str
    content_type: str
    size: int
    sha512: str
    s3: S3Digests


@dataclass(frozen=True)
class PlannedObject:
    """One object of the release. Exactly one of `artifact`, `data`, `copy_from` says its source."""

    phase: str
    bucket: str
    key: str
    size: int
    sha512: str
    content_type: str
    s3: S3Digests
    artifact: LocalArtifact | None = None  # upload this file (or copy it from the seed region)
    data: bytes | None = None  # small object written in one PUT
    copy_from: str | None = None  # server-side copy of this key, same bucket
    # A versioned artifact or its hash: once published never replaced by different bytes (a
    # reader holding the old hash would otherwise meet a different object).
    immutable: bool = False

    @property
    def is_large(self) -> bool:
        return self.data is None


@dataclass
class RegionPlan:
    region: str
    release_bucket: str
    hashes_bucket: str
    objects: list[PlannedObject] = field(default_factory=list)
    # Stale objects removed before the phase that would leave them lying next to a newer file.
    deletions: list[tuple[str, str, str]] = field(default_factory=list)  # (phase, bucket, key)

    @property
    def partition(self) -> str:
        return partition_of(self.region)

    @property
    def transfer_bytes(self) -> int:
        return sum(o.size for o in self.objects)


@dataclass
class ReleasePlan:
    version: str
    artifacts: list[LocalArtifact]
    regions: list[RegionPlan]
    sums_text: str
    signature: bytes | None


def bytes_digests(data: bytes) -> tuple[str, S3Digests]:
    full = base64.b64encode(hashlib.sha256(data).digest()).decode()
    return hashlib.sha512(data).hexdigest(), S3Digests(full=full)


def s3_digests_of_file(path: Path, part_size: int) -> S3Digests:
    """Full and composite (for `part_size` parts) SHA256 of a file, in one streamed pass."""
    full = hashlib.sha256()
    part = hashlib.sha256()
    in_part = 0
    part_digests: list[bytes] = []
    with path.open("rb") as fh:
        while block := fh.read(_READ_BLOCK):
            full.update(block)
            view = memoryview(block)
            while view:
                take = min(len(view), part_size - in_part)
                part.update(view[:take])
                in_part += take
                view = view[take:]
                if in_part == part_size:
                    part_digests.append(part.digest())
                    part, in_part = hashlib.sha256(), 0
    if in_part or not part_digests:
        part_digests.append(part.digest())
    composite = base64.b64encode(hashlib.sha256(b"".join(part_digests)).digest()).decode()
    return S3Digests(full=base64.b64encode(full.digest()).decode(), composite=composite)


@functools.lru_cache(maxsize=16)
def _composite_cached(path: Path, part_size: int, size: int, mtime_ns: int) -> str | None:
    return s3_digests_of_file(path, part_size).composite


def composite_for_part_size(path: Path, part_size: int) -> str | None:
    """The composite SHA256 S3 reports for this file uploaded in `part_size` parts (cached: an
    object uploaded by an earlier run with another part size is checked once, not per region)."""
    st = path.stat()
    return _composite_cached(path, part_size, st.st_size, st.st_mtime_ns)


def check_version(version: str) -> str:
    if version == "latest" or not _VERSION_RE.match(version):
        raise PlanError(
            f"bad --version {version!r}: use letters, digits and . _ + - (max 64, not 'latest'), e.g. 1.2.3"
        )
    return version


def bucket_names(prefix: str, region: str) -> tuple[str, str]:
    """(release bucket, hashes bucket) for a region, e.g. aws-elastic-disaster-recovery-us-east-1."""
    release, hashes = release_bucket(region, prefix), hashes_bucket(region, prefix)
    for name in (release, hashes):
        if not _BUCKET_RE.match(name) or ".." in name:
            raise PlanError(
                f"bad --bucket-prefix {prefix!r}: bucket name {name!r} is not a valid S3 bucket name "
                "(lower-case letters, digits, '-' and '.', 3-63 characters)"
            )
    return release, hashes


def sums_text(artifacts: Sequence[LocalArtifact]) -> str:
    """SHA512SUMS in the `sha512sum -c` format, one line per published artifact."""
    return "".join(f"{a.sha512}  {a.name}\n" for a in artifacts)


def manifest_bytes(version: str, artifacts: Sequence[LocalArtifact]) -> bytes:
    """`latest/manifest.json`: deterministic (no timestamps) so an unchanged release re-publishes nothing."""
    body: dict[str, object] = {"installerVersion": version}
    for a in artifacts:
        body["failbackAssets" if a.folder == ASSETS_FOLDER else "failbackLivecd"] = {
            "key": f"{version}/{a.folder}/{a.name}",
            "size": a.size,
            "sha512": a.sha512,
        }
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


VERSION_KEY = f"latest/{LIVECD_FOLDER}/version.json"


def version_bytes(version: str, artifacts: Sequence[LocalArtifact]) -> bytes | None:
    """`latest/failback_livecd/version.json`: which release `latest/` holds and its ISO (None without an ISO).
    The failback client compares its own version with `version` (publish with --version = the client's)."""
    isos = [a for a in artifacts if a.folder == LIVECD_FOLDER]
    if not isos:
        return None
    iso = isos[0]
    body = {
        "version": version,
        "iso": {
            "name": iso.name,
            "key": f"latest/{LIVECD_FOLDER}/{iso.name}",
            "versionKey": f"{version}/{LIVECD_FOLDER}/{iso.name}",
            "size": iso.size,
            "sha512": iso.sha512,
        },
    }
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def _small(phase: str, bucket: str, key: str, data: bytes, content_type: str) -> PlannedObject:
    sha512, s3 = bytes_digests(data)
    return PlannedObject(phase, bucket, key, len(data), sha512, content_type, s3, data=data)


def plan_region(
    region: str,
    version: str,
    artifacts: Sequence[LocalArtifact],
    bucket_prefix: str,
    sums: str,
    signature: bytes | None,
) -> RegionPlan:
    release, hashes = bucket_names(bucket_prefix, region)
    rp = RegionPlan(region, release, hashes)
    objs = rp.objects
    for a in artifacts:
        objs.append(
            PlannedObject(
                "artifact",
                release,
                f"{version}/{a.folder}/{a.name}",
                a.size,
                a.sha512,
                a.content_type,
                a.s3,
                artifact=a,
                immutable=True,
            )
        )
    for a in artifacts:
        h = _small("hash", hashes, f"{version}/{a.folder}/{a.name}.sha512", a.sha512.encode(), "text/plain")
        objs.append(dataclasses.replace(h, immutable=True))
    objs.append(_small("hash", hashes, f"{version}/SHA512SUMS", sums.encode(), "text/plain"))
    if signature is not None:
        objs.append(_small("hash", hashes, f"{version}/SHA512SUMS.asc", signature, "application/pgp-signature"))
    for a in artifacts:
        objs.append(
            PlannedObject(
                "latest",
                release,
                f"latest/{a.folder}/{a.name}",
                a.size,
                a.sha512,
                a.content_type,
                a.s3,
                artifact=a,
                copy_from=f"{version}/{a.folder}/{a.name}",
            )
        )
    for a in artifacts:
        objs.append(
            _small("latest-hash", hashes, f"latest/{a.folder}/{a.name}.sha512", a.sha512.encode(), "text/plain")
        )
    if signature is None:
        # An old signature must not sit next to a SHA512SUMS it does not sign.
        rp.deletions.append(("latest-hash", hashes, "latest/SHA512SUMS.asc"))
    objs.append(_small("latest-hash", hashes, "latest/SHA512SUMS", sums.encode(), "text/plain"))
    if signature is not None:
        objs.append(_small("latest-hash", hashes, "latest/SHA512SUMS.asc", signature, "application/pgp-signature"))
    # The manifest names {installerVersion}/failback_assets/: only written when those assets exist.
    if any(a.folder == ASSETS_FOLDER for a in artifacts):
        objs.append(
            _small("manifest", release, "latest/manifest.json", manifest_bytes(version, artifacts), "application/json")
        )
    version_doc = version_bytes(version, artifacts)
    if version_doc is not None:  # last: it names the latest ISO only once that ISO and its hash are in place
        objs.append(_small("manifest", release, VERSION_KEY, version_doc, "application/json"))
    return rp


def build_plan(
    regions: Sequence[str],
    version: str,
    artifacts: Sequence[LocalArtifact],
    bucket_prefix: str = DEFAULT_BUCKET_PREFIX,
    signature: bytes | None = None,
) -> ReleasePlan:
    check_version(version)
    if not artifacts:
        raise PlanError("nothing to publish: no artifact given")
    sums = sums_text(artifacts)
    plans = [plan_region(r, version, artifacts, bucket_prefix, sums, signature) for r in regions]
    return ReleasePlan(version, list(artifacts), plans, sums, signature)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def seed_regions(regions: Sequence[str]) -> dict[str, str]:
    """The first region of each partition: it uploads, the others copy from it server-side."""
    seeds: dict[str, str] = {}
    for r in regions:
        seeds.setdefault(partition_of(r), r)
    return seeds


def render_plan(plan: ReleasePlan, seed_copy: bool = True) -> str:
    """The `--dry-run` output: every object, bucket, key, size and SHA512, in publish order."""
    seeds = seed_regions([rp.region for rp in plan.regions]) if seed_copy else {}
    lines = [f"release {plan.version}: {len(plan.regions)} region(s), {len(plan.artifacts)} artifact(s)"]
    for a in plan.artifacts:
        lines.append(f"  artifact {a.path} ({a.size} bytes) sha512 {a.sha512}")
    for rp in plan.regions:
        lines.append(f"region {rp.region} (partition {rp.partition}):")
        for phase in PHASES:
            for _, bucket, key in (d for d in rp.deletions if d[0] == phase):
                lines.append(f"  {phase:<11} delete-if-present  s3://{bucket}/{key}")
            for o in (o for o in rp.objects if o.phase == phase):
                if o.copy_from:
                    how = f"copy of {o.copy_from}"
                elif o.artifact and seeds.get(rp.partition, rp.region) != rp.region:
                    how = f"copy from {seeds[rp.partition]}"
                else:
                    how = "upload" if o.artifact else "put"
                lines.append(f"  {phase:<11} {how:<18} s3://{o.bucket}/{o.key}  {o.size} bytes  sha512 {o.sha512}")
    total = sum(rp.transfer_bytes for rp in plan.regions)
    lines.append(f"total: {sum(len(rp.objects) for rp in plan.regions)} objects, {human_size(total)}")
    return "\n".join(lines)
