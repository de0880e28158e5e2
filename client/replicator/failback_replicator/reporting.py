"""What the engine counts (`Stats`) and tells the service (`Reports`): replication state, DRS
errors, progress snapshots and the rate they carry."""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .blockio import block_span
from .interfaces import ReplicationError, ReplicationSnapshot, ReplicationState, StateReporter
from .targets import Target
from .wire import Connection

log = logging.getLogger("failback_replicator")


@dataclass
class Stats:
    """Counters for tests and the benchmark (what was really sent and written)."""

    sessions: int = 0
    blocks_fetched: int = 0
    bytes_written: int = 0
    wire_bytes_in: int = 0
    digest_failures: int = 0
    verify_passes: int = 0
    local_blocks_read: int = 0
    blocks_received: int = 0  # every block that arrived, checkpointed or not (resume cost)
    transfer_seconds: float = 0.0  # time spent streaming blocks
    ready_seconds: float | None = None  # run() start -> first consistency attained
    protocol_version: int = 0  # negotiated with the agent in the last session
    digest_algorithm: str = ""  # block digest negotiated in the last session
    # Every block index fetched, in order (tests, benchmark): 8 bytes a block in an array('q'),
    # not ~40 in a list of ints, since it grows for as long as continuous replication runs.
    fetched_by_volume: dict[str, array] = field(default_factory=dict)


class RateMeter:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.bytes = 0
        self.rate = 0.0
        self._last = self.start
        self._acc = 0

    def add(self, n: int) -> None:
        self.bytes += n
        self._acc += n
        now = time.monotonic()
        if now - self._last >= 0.5:
            inst = self._acc / (now - self._last)
            self.rate = inst if not self.rate else 0.7 * self.rate + 0.3 * inst
            self._last, self._acc = now, 0


class Reports:
    """The engine's side of `StateReporter`: state changes, errors (each reported once until
    cleared), progress at most once a second unless forced."""

    def __init__(
        self,
        reporter: StateReporter,
        targets: Sequence[Target],
        stats: Stats,
        live_conn: Callable[[], Connection | None],
    ) -> None:
        self.reporter = reporter
        self.state = ReplicationState.INITIATING
        self.error: ReplicationError | None = None  # the last error reported and not cleared
        self.meter = RateMeter()
        self.in_sync_since: float | None = None
        self.session_start = time.monotonic()
        self._targets = targets
        self._stats = stats
        self._live_conn = live_conn
        self._last_report = 0.0

    def set_state(self, state: ReplicationState) -> None:
        if state != self.state:
            self.state = state
            self.reporter.replication_state(state)

    def report_error(self, error: ReplicationError, raw: str) -> None:
        log.warning("%s: %s", error, raw)
        self.error = error
        self.reporter.error(error, raw)

    def clear_error(self) -> None:
        if self.error is not None:
            self.error = None
            self.reporter.error_cleared()

    def snapshot(self) -> ReplicationSnapshot:
        backlog = sum(t.progress.backlogged_bytes for t in self._targets)
        rate = self.meter.rate
        lag = 0 if not backlog else int(time.monotonic() - (self.in_sync_since or self.session_start))
        conn = self._live_conn()
        return ReplicationSnapshot(
            state=self.state,
            disks=[t.progress for t in self._targets],
            lag_seconds=lag,
            eta_seconds=(backlog / rate if rate > 0 else None) if backlog else 0.0,
            throughput_bps=rate,
            wire_bytes=self._stats.wire_bytes_in + (conn.bytes_in if conn else 0),
        )

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= 1.0:
            self._last_report = now
            self.reporter.progress(self.snapshot())

    def checkpoints(self, t: Target, checkpoints: deque[dict[int, bytes]], block_size: int) -> None:
        """Counts and reports the batches the writer made durable (block -> digest each)."""
        while checkpoints:
            verified = checkpoints.popleft()
            n_bytes = sum(block_span(i, t.size, block_size)[1] for i in verified)
            self._stats.blocks_fetched += len(verified)
            self._stats.bytes_written += n_bytes
            self._stats.fetched_by_volume.setdefault(t.mapping.recovery_device, array("q")).extend(verified)
            self.meter.add(n_bytes)
            t.need_bytes = max(0, t.need_bytes - n_bytes)
            t.progress.backlogged_bytes = t.need_bytes
            t.progress.replicated_bytes = min(t.size, t.progress.replicated_bytes + n_bytes)
            t.progress.rate_bps = self.meter.rate
            self.progress()
