"""The regions a release is published to, and parsing of the `--regions` option.

The list is the DRS service's, kept in the client (failback_client.regions): 28 commercial regions plus
the two GovCloud regions, which live in their own partition (own credentials, and S3 cannot
copy between partitions).
"""

from __future__ import annotations

import difflib

from failback_client.regions import COMMERCIAL_REGIONS, DRS_REGIONS, GOVCLOUD_REGIONS

from image.core.errors import ImageError

ALL_REGIONS: tuple[str, ...] = DRS_REGIONS


class RegionError(ImageError, ValueError):
    """The `--regions` value names something that is not a DRS region."""


def partition_of(region: str) -> str:
    """The AWS partition of a region: objects are only copied server-side within one."""
    return "aws-us-gov" if region.startswith("us-gov-") else "aws"


def parse_regions(spec: str) -> list[str]:
    """`all`, `commercial`, `govcloud` or a comma list of region names → ordered unique list.

    Unknown names raise RegionError naming each bad entry with the closest valid name.
    """
    words = [w.strip().lower() for w in spec.split(",") if w.strip()]
    if not words:
        raise RegionError("no region given: pass --regions all, or a comma list such as us-east-1,eu-west-1")
    groups = {"all": ALL_REGIONS, "commercial": COMMERCIAL_REGIONS, "govcloud": GOVCLOUD_REGIONS}
    out: list[str] = []
    problems: list[str] = []
    for word in words:
        if word in groups:
            names: tuple[str, ...] = groups[word]
        elif word in ALL_REGIONS:
            names = (word,)
        else:
            close = difflib.get_close_matches(word, [*ALL_REGIONS, *groups], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{word!r} is not a DRS region{hint}")
            continue
        out.extend(n for n in names if n not in out)
    if problems:
        raise RegionError(
            "; ".join(problems) + ". Valid: all, commercial, govcloud or any of " + ", ".join(ALL_REGIONS)
        )
    return out
