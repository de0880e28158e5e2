"""The AWS Regions where DRS runs (AWS General Reference, DRS endpoints), a helpful answer to a mistyped
one, and the regional buckets.

The one home of the region list: image/release/publish/regions.py (the release's `--regions`) imports it.
"""

from __future__ import annotations

import difflib

COMMERCIAL_REGIONS: tuple[str, ...] = (
    "af-south-1",
    "ap-east-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-south-1",
    "ap-south-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ca-central-1",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "il-central-1",
    "me-central-1",
    "me-south-1",
    "sa-east-1",
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
)
GOVCLOUD_REGIONS: tuple[str, ...] = ("us-gov-east-1", "us-gov-west-1")
DRS_REGIONS: tuple[str, ...] = COMMERCIAL_REGIONS + GOVCLOUD_REGIONS


def region_problem(region: str) -> str | None:
    """None when `region` is a DRS region, else the reason (with a suggestion when it looks like a typo)."""
    if region in DRS_REGIONS:
        return None
    lowered = region.strip().lower()
    if lowered in DRS_REGIONS:
        return f"region {region!r} must be written in lower case: {lowered}"
    # Typos are often equally close to two regions (us-est-1: us-east-1 or us-west-1): offer both.
    close = difflib.get_close_matches(lowered, DRS_REGIONS, n=2, cutoff=0.75)
    ratios = [difflib.SequenceMatcher(None, lowered, c).ratio() for c in close]
    close = [c for c, r in zip(close, ratios, strict=True) if r == ratios[0]]
    hint = f"; did you mean {' or '.join(sorted(close))}?" if close else f"; DRS regions are: {', '.join(DRS_REGIONS)}"
    return f"{region!r} is not an AWS Region where Elastic Disaster Recovery runs{hint}"


def default_endpoint(region: str) -> str:
    return f"https://drs.{region}.amazonaws.com"


BUCKET_PREFIX = "aws-elastic-disaster-recovery"


def release_bucket(region: str, prefix: str = BUCKET_PREFIX) -> str:
    """The region's public bucket: replication software, manifests and the published LiveCD. `prefix` is
    DRS's own unless a release goes to test buckets (`inv publish --bucket-prefix`)."""
    return f"{prefix}-{region}"


def hashes_bucket(region: str, prefix: str = BUCKET_PREFIX) -> str:
    """The region's bucket of sha512 digests for what release_bucket holds."""
    return f"{prefix}-hashes-{region}"
