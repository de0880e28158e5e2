"""The replication engine: pairs with the agent, brings every mapped volume in sync, keeps it in
sync until the service asks for the final sync, and resumes from the journal after any interruption.

Every session (a TCP+TLS connection) runs the same idempotent steps, so resuming after a cut is
not a special case: compare the source's block digests with what the journal says is verified
locally, fetch what differs (verifying each block on arrival), verify both sides in full, then
follow the source's changes.

The parts, each in its module: `session` (connect, HELLO, reconnect policy), `compare` (digests
and rescan), `transfer` (block streaming and checkpoints), `reporting` (state, errors, progress,
counters), `targets` (the local volumes and their journals). This module runs a session's steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from .compare import Comparer
from .config import ConfigError, ReplicatorConfig
from .interfaces import (
    Command,
    CommandSource,
    InitiationStep,
    LoggingReporter,
    QueueCommandSource,
    ReplicationError,
    ReplicationSnapshot,
    ReplicationState,
    StateReporter,
    StepStatus,
)
from .reporting import Reports, Stats
from .session import AgentRefused, EngineContext, Link, Outcome, StopRequested, expect
from .targets import ReplicationFailed, Target, open_targets
from .throttle import TokenBucket
from .transfer import BlockTransfer
from .wire import Connection

__all__ = ["AgentRefused", "Outcome", "ReplicationFailed", "Replicator", "Stats"]

log = logging.getLogger("failback_replicator")


class Replicator:
    def __init__(
        self,
        config: ReplicatorConfig,
        reporter: StateReporter | None = None,
        commands: CommandSource | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        config.validate()
        self.cfg = config
        self.reporter: StateReporter = reporter or LoggingReporter()
        self.commands: CommandSource = commands or QueueCommandSource()
        self.stats = Stats()
        stats_lock = threading.Lock()  # the reader/writer threads update counters and digests too
        self._targets: list[Target] = []
        self._bucket = TokenBucket(config.bandwidth_mbps)
        self._throttle_mbps = config.bandwidth_mbps
        self._reports = Reports(self.reporter, self._targets, self.stats, lambda: self._link.conn)
        self._link = Link(config, self.reporter, self._reports, self.stats, self._targets, self.commands, sleep)
        ctx = EngineContext(config, self._link, self._reports, self.stats, stats_lock)
        self._transfer = BlockTransfer(ctx, self._bucket, self._check_stop)
        self._comparer = Comparer(ctx, self._transfer)

    # ------------------------------------------------------------------ public
    def run(self) -> Outcome:
        """Replicates until the final sync is done (COMPLETED) or the service says STOP."""
        self._run_started = time.perf_counter()
        try:
            self._targets[:] = open_targets(self.cfg)
        except (OSError, ConfigError) as exc:
            self.reporter.error(ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE, str(exc))
            raise ReplicationFailed(ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE, str(exc)) from exc
        try:
            return self._link.run(self._session)
        except ReplicationFailed as exc:
            if exc.error is ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE and not self._link.established:
                self.reporter.initiation_step(
                    InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION, StepStatus.FAILED
                )
            if self._reports.error is not exc.error:
                self._reports.report_error(exc.error, str(exc).split(": ", 1)[-1])
            raise
        finally:
            for t in self._targets:
                try:
                    os.fsync(t.fd)
                    os.close(t.fd)
                except OSError:
                    pass

    def snapshot(self) -> ReplicationSnapshot:
        return self._reports.snapshot()

    # ------------------------------------------------------------------ commands
    def _check_stop(self) -> None:
        cmd, mbps = self.commands.poll()
        self._apply_throttle(mbps)
        if cmd in (Command.STOP, Command.COMPLETE):
            raise StopRequested()

    def _apply_throttle(self, mbps: int | None) -> None:
        # None: the service did not say (keep the configured value); 0: no throttling.
        if mbps is not None and mbps != self._throttle_mbps:
            log.info("bandwidth throttling: %s", f"{mbps} Mbps" if mbps else "off")
            self._throttle_mbps = mbps
            self._bucket.set_rate(mbps)

    # ------------------------------------------------------------------ one session
    def _session(self, conn: Connection) -> Outcome:
        reports = self._reports
        self._link.hello(conn)
        reports.clear_error()
        reports.session_start = time.monotonic()
        first = all(t.journal.phase == "SYNC" for t in self._targets)
        reports.set_state(ReplicationState.RESCAN if (self.cfg.rescan or not first) else ReplicationState.INITIAL_SYNC)
        self._converge(conn, full_verify=True)
        for t in self._targets:
            t.journal.phase = "VERIFIED"
            t.journal.save()
        reports.in_sync_since = time.monotonic()
        reports.set_state(ReplicationState.CONTINUOUS)
        reports.progress(force=True)
        if self.stats.ready_seconds is None:
            self.stats.ready_seconds = time.perf_counter() - self._run_started
        self.reporter.consistency_attained()
        while True:
            cmd, mbps = self.commands.poll()
            self._apply_throttle(mbps)
            if cmd in (Command.STOP, Command.COMPLETE):
                log.info("service command %s: stopping replication", cmd)
                self._bye(conn)
                reports.set_state(ReplicationState.STOPPED)
                return Outcome.STOPPED
            if cmd is Command.FINAL_SYNC:
                log.info("failback launch requested: final sync")
                conn.send_json({"op": "SCAN"})
                expect(conn, "SCAN")
                self._follow_changes(conn, wait=0.0)
                # SCAN + CHANGES already brought the last writes: go straight to the verification.
                self._converge(conn, full_verify=True, compare_first=False)
                self.reporter.completed()
                self._bye(conn)
                return Outcome.COMPLETED
            self._follow_changes(conn, wait=self.cfg.changes_wait)
            reports.progress()

    def _bye(self, conn: Connection) -> None:
        with contextlib.suppress(OSError):
            conn.send_json({"op": "BYE"})

    # ------------------------------------------------------------------ sync steps
    def _converge(self, conn: Connection, full_verify: bool, compare_first: bool = True) -> None:
        """Fetch until source digests equal local ones; with full_verify, first read back every block
        written (or never read) since the last read-back and compare it too."""
        compare, fetch_all = self._comparer.compare, self._transfer.fetch_all
        if compare_first:
            fetch_all(conn, self._targets, compare(conn, self._targets, reread_local=False))
        rounds = 0
        while True:
            rounds += 1
            need = compare(conn, self._targets, reread_local=full_verify)
            if full_verify:
                self.stats.verify_passes += 1
                full_verify = False
            if not any(need.values()):
                return
            n = sum(len(v) for v in need.values())
            log.info("verification found %d block(s) that differ (changed on the source meanwhile?); fetching", n)
            if rounds >= self.cfg.max_converge_rounds:
                self._reports.report_error(
                    ReplicationError.NOT_CONVERGING, f"{n} block(s) still differ after {rounds} rounds"
                )
            fetch_all(conn, self._targets, need)

    def _follow_changes(self, conn: Connection, wait: float) -> None:
        conn.send_json({"op": "CHANGES", "since": {str(t.index): t.generation for t in self._targets}, "wait": wait})
        msg = expect(conn, "CHANGES")
        changed = {int(k): [i for s, c in v for i in range(s, s + c)] for k, v in msg["changed"].items()}
        if any(changed.values()):
            if self._reports.in_sync_since is not None:
                self._reports.set_state(ReplicationState.CONTINUOUS)
            self._transfer.fetch_all(conn, self._targets, changed)
        for t in self._targets:
            t.generation = int(msg["generations"][str(t.index)])
        self._reports.in_sync_since = time.monotonic()
