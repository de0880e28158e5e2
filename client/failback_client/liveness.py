"""What DRS sees of a running failback client besides replication: a heartbeat
(UpdateFailbackClientLastSeenForDrs, so DRS does not show FAILBACK_CLIENT_NOT_SEEN), metrics
(SendClientMetricsForDrs: replicated and backlogged bytes, rate, lag) and, on a failure and at completion,
the client's log (SendClientLogsForDrs) through the same redaction as the log file.

None of these may stop replication: a failed call is logged and tried again at the next period.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from failback_client.errors import ClientError
from failback_client.logs import RedactingFormatter

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
METRICS_S = 60.0
LOG_EVENTS = 1000  # SendClientLogsForDrs takes at most 1000 events a call
MAX_MESSAGE = 30000
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LogBuffer(logging.Handler):
    """The last LOG_EVENTS records, formatted (and so redacted) like the log file's lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(RedactingFormatter("%(name)s: %(message)s"))
        self.events: collections.deque[dict[str, str]] = collections.deque(maxlen=LOG_EVENTS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname if record.levelname in _LEVELS else "INFO"
            self.events.append(
                {"timestamp": _iso(record.created), "level": level, "message": self.format(record)[:MAX_MESSAGE]}
            )
        except Exception:  # a log handler must never raise
            self.handleError(record)


def metrics_from_status(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The replication software's status as SendClientMetricsForDrs metrics."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    disks = status.get("replicatedDisks") or []
    out = [
        {
            "name": "replicatedBytes",
            "unit": "Bytes",
            "value": float(sum(d.get("replicatedStorageBytes", 0) for d in disks)),
        },
        {"name": "totalBytes", "unit": "Bytes", "value": float(sum(d.get("totalStorageBytes", 0) for d in disks))},
        {
            "name": "backloggedBytes",
            "unit": "Bytes",
            "value": float(sum(d.get("backloggedStorageBytes", 0) for d in disks)),
        },
    ]
    if status.get("throughputBytesPerSecond") is not None:
        out.append({"name": "throughput", "unit": "BytesPerSecond", "value": float(status["throughputBytesPerSecond"])})
    if status.get("lagSeconds") is not None:
        out.append({"name": "lag", "unit": "Seconds", "value": float(status["lagSeconds"])})
    for metric in out:
        metric["timestamp"] = now
    return out


class Liveness:
    """Ticked by the replication supervisor's loop: heartbeat and metrics at their periods."""

    def __init__(
        self,
        rapi: Any,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        metrics_s: float = METRICS_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rapi, self.heartbeat_s, self.metrics_s, self.clock = rapi, heartbeat_s, metrics_s, clock
        self._next_heartbeat = 0.0
        self._next_metrics = 0.0
        self.heartbeats = 0
        self.buffer = LogBuffer()
        logging.getLogger().addHandler(self.buffer)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.buffer)

    def tick(self, status: dict[str, Any] | None) -> None:
        now = self.clock()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_s
            try:
                self.rapi.seen()
                self.heartbeats += 1
            except ClientError as e:
                log.warning("heartbeat (UpdateFailbackClientLastSeenForDrs) failed: %s", e)
        if status and now >= self._next_metrics:
            self._next_metrics = now + self.metrics_s
            try:
                self.rapi.metrics(metrics_from_status(status))
            except ClientError as e:
                log.warning("SendClientMetricsForDrs failed: %s", e)

    def send_logs(self, why: str) -> bool:
        """Upload the buffered log (at completion, or after a failure); False if DRS could not take it."""
        log.info("sending the client log to DRS (%s)", why)
        events = list(self.buffer.events)
        if not events:
            return False
        try:
            self.rapi.logs(events)
        except ClientError as e:
            log.warning("SendClientLogsForDrs failed: %s", e)
            return False
        return True
