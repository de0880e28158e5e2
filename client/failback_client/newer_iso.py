"""A newer ISO is pointed out, as the AWS LiveCD does: once the Region is known, this client's version is
compared with the release `inv publish` put in the region's bucket as latest
(`aws-elastic-disaster-recovery-{region}/latest/failback_livecd/version.json`, image/release/publish/plan.py).

Never in the way: the lookup runs in a background thread with a short timeout and no retries, and the
workflow takes its answer later only if it is there; no network, an old bucket without the object, or a
version that does not compare (not dotted numbers) give no line at all (only the log says why).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

from failback_client import __version__
from failback_client.console import Console
from failback_client.regions import release_bucket

log = logging.getLogger(__name__)

VERSION_KEY = "latest/failback_livecd/version.json"
TIMEOUT_S = 3.0
MAX_BYTES = 16 * 1024
_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)$")


def parse_version(text: str) -> tuple[int, ...] | None:
    match = _VERSION.match(text.strip()) if isinstance(text, str) else None
    if not match:
        return None
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()  # 1.0 == 1.0.0
    return tuple(parts)


def is_newer(published: str, mine: str = __version__) -> bool:
    new, old = parse_version(published), parse_version(mine)
    return new is not None and old is not None and new > old


def iso_url(region: str, key: str, s3_endpoint: str | None) -> str:
    if s3_endpoint:
        return f"{s3_endpoint.rstrip('/')}/{release_bucket(region)}/{key}"
    return f"https://{release_bucket(region)}.s3.{region}.amazonaws.com/{key}"


def latest_published(region: str, s3_endpoint: str | None, timeout: float = TIMEOUT_S) -> dict[str, Any] | None:
    """The region's version.json (None when it is absent or unreadable). Anonymous: the bucket is public."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    from failback_client.download import s3_endpoint_url

    endpoint = s3_endpoint_url(region, s3_endpoint)
    config = Config(
        signature_version=UNSIGNED,
        region_name=region,
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "total_max_attempts": 1},
        s3={"addressing_style": "virtual" if endpoint.endswith(".amazonaws.com") else "path"},
    )
    client = boto3.session.Session().client("s3", region_name=region, endpoint_url=endpoint, config=config)
    body = client.get_object(Bucket=release_bucket(region), Key=VERSION_KEY)["Body"].read(MAX_BYTES + 1)
    doc = json.loads(body) if len(body) <= MAX_BYTES else None
    return doc if isinstance(doc, dict) and isinstance(doc.get("version"), str) else None


def notice_line(region: str, doc: dict[str, Any] | None, s3_endpoint: str | None) -> str | None:
    if not doc or not is_newer(doc["version"]):
        return None
    iso = doc.get("iso")
    key = iso.get("key") if isinstance(iso, dict) else None
    if not isinstance(key, str):
        key = "latest/failback_livecd/aws-failback-livecd-64bit.iso"
    return (
        f"A newer Failback LiveCD ({doc['version']}) is published for {region}; this one is {__version__}. "
        f"It is at {iso_url(region, key, s3_endpoint)} (this run goes on)"
    )


class NewerIsoCheck:
    """Started when the Region is known; `report()` prints the line if the answer is already in."""

    def __init__(self, region: str, s3_endpoint: str | None) -> None:
        self.region, self.s3_endpoint = region, s3_endpoint
        self.line: str | None = None
        self._thread = threading.Thread(target=self._look, name="newer-iso", daemon=True)

    @classmethod
    def start(cls, region: str | None, s3_endpoint: str | None) -> NewerIsoCheck | None:
        if not region:
            return None
        check = cls(region, s3_endpoint)
        check._thread.start()
        return check

    def _look(self) -> None:
        try:
            self.line = notice_line(self.region, latest_published(self.region, self.s3_endpoint), self.s3_endpoint)
        except Exception as e:
            log.info("newer-ISO check: no answer from the %s bucket (%s)", self.region, e)
            return
        log.info("newer-ISO check: %s", self.line or f"none newer than {__version__} published")

    def report(self, console: Console, wait: float = 1.0) -> None:
        self._thread.join(wait)
        if self.line:
            console.info(self.line)
