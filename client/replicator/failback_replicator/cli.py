"""`failback-replicator --config FILE`: the replication software as a process.

The failback client may run the engine in-process (engine.Replicator with its own StateReporter
and CommandSource) or start this program. Then:
- commands come from signals (SIGUSR1 = FINAL_SYNC, SIGTERM/SIGINT = STOP) or from
  `--command-file` (one word: CONTINUE, FINAL_SYNC, STOP, COMPLETE; optional second word = Mbps);
- state goes to the console (progress lines), the log, and `--status-file` (JSON, replaced
  atomically on every report) for a supervising process to forward to the control plane.
`--check-config` only validates the configuration (the client runs it at CONFIGURE_REPLICATION_SOFTWARE).
Exit status: 0 final sync completed (or configuration usable), 3 stopped by the service, 2 bad configuration,
1 failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .config import ConfigError, ReplicatorConfig
from .engine import Outcome, ReplicationFailed, Replicator
from .interfaces import (
    Command,
    InitiationStep,
    LoggingReporter,
    QueueCommandSource,
    ReplicationError,
    ReplicationSnapshot,
    ReplicationState,
    StateReporter,
    StepStatus,
    TeeReporter,
)
from .progress import ProgressDisplay

log = logging.getLogger("failback_replicator")


class FileCommandSource(QueueCommandSource):
    """Reads the command from a file (re-read at most every 0.5 s); signals override it."""

    def __init__(self, path: Path | None) -> None:
        super().__init__()
        self.path = path
        self._read_at = 0.0
        self._mtime: int | None = None

    def poll(self) -> tuple[Command, int | None]:
        now = time.monotonic()
        if self.path is not None and now - self._read_at >= 0.5:
            self._read_at = now
            try:
                st = self.path.stat()
                if st.st_mtime_ns != self._mtime:
                    self._mtime = st.st_mtime_ns
                    words = self.path.read_text().split()
                    if words:
                        try:
                            command = Command(words[0].upper())
                        except ValueError:
                            log.error("%s: unknown command %r (use CONTINUE, FINAL_SYNC, STOP)", self.path, words[0])
                        else:
                            mbps = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
                            self.set(command, mbps)
            except FileNotFoundError:
                pass
        return super().poll()


class StatusFileReporter:
    """Keeps a JSON status file current (atomically replaced) for a supervising process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status: dict = {"initiationSteps": {}, "dataReplicationState": None, "error": None}

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.status, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def initiation_step(self, step: InitiationStep, status: StepStatus) -> None:
        self.status["initiationSteps"][str(step)] = str(status)
        self._write()

    def replication_state(self, state: ReplicationState) -> None:
        self.status["dataReplicationState"] = str(state)
        self._write()

    def progress(self, snapshot: ReplicationSnapshot) -> None:
        self.status["replicatedDisks"] = [d.as_drs() for d in snapshot.disks]
        self.status["lagSeconds"] = snapshot.lag_seconds
        self.status["etaSeconds"] = snapshot.eta_seconds
        self.status["throughputBytesPerSecond"] = int(snapshot.throughput_bps)
        self._write()

    def error(self, error: ReplicationError, raw: str) -> None:
        self.status["error"] = {"error": str(error), "rawError": raw}
        self._write()

    def error_cleared(self) -> None:
        self.status["error"] = None
        self._write()

    def consistency_attained(self) -> None:
        self.status["consistencyAttained"] = True
        self._write()

    def completed(self) -> None:
        self.status["completed"] = True
        self._write()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="failback-replicator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, required=True, help="JSON configuration written by the failback client")
    p.add_argument("--command-file", type=Path, default=None)
    p.add_argument("--status-file", type=Path, default=None)
    p.add_argument("--log-file", type=Path, default=None)
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between plain progress lines")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="only check the configuration file (exit 0 if usable, 2 if not) and exit",
    )
    args = p.parse_args(argv)

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log_file:
        fd = os.open(args.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        handlers.append(logging.StreamHandler(open(fd, "a", encoding="utf-8")))  # noqa: SIM115 - lives as long as the process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers)

    try:
        cfg = ReplicatorConfig.load(args.config)
    except ConfigError as exc:
        print(f"failback-replicator: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"failback-replicator: configuration {args.config} is usable", flush=True)
        return 0
    commands = FileCommandSource(args.command_file)
    signal.signal(signal.SIGUSR1, lambda *_: commands.set(Command.FINAL_SYNC))
    signal.signal(signal.SIGTERM, lambda *_: commands.set(Command.STOP))
    signal.signal(signal.SIGINT, lambda *_: commands.set(Command.STOP))
    reporters: list[StateReporter] = [LoggingReporter(), ProgressDisplay(sys.stdout, interval=args.progress_interval)]
    if args.status_file:
        reporters.append(StatusFileReporter(args.status_file))
    try:
        outcome = Replicator(cfg, reporter=TeeReporter(*reporters), commands=commands).run()
    except ReplicationFailed as exc:
        print(f"failback-replicator: replication failed: {exc}", file=sys.stderr)
        return 1
    if outcome is Outcome.COMPLETED:
        print("Final sync completed: every volume is flushed and verified.", flush=True)
        return 0
    print("Replication stopped by the service.", flush=True)
    return 3
