"""Per-volume progress on the console: bytes, rate, ETA.

On a terminal with cursor control the lines are redrawn in place; on a serial console, a pipe or a
log the same facts come as plain lines, at most one per `interval` seconds (plus every state change),
so a 115200-baud console is never flooded.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from .interfaces import (
    DiskProgress,
    InitiationStep,
    ReplicationError,
    ReplicationSnapshot,
    ReplicationState,
    StepStatus,
)

_SERIAL_TERMS = {"", "dumb", "vt100", "vt102", "vt220", "linux-serial"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def is_live_terminal(stream: TextIO) -> bool:
    """Redraw in place only on a real terminal that is not a serial line."""
    if not stream.isatty():
        return False
    if os.environ.get("TERM", "") in _SERIAL_TERMS:
        return False
    try:
        name = os.ttyname(stream.fileno())
    except OSError:
        return False
    return not name.startswith(("/dev/ttyS", "/dev/ttyAMA", "/dev/hvc", "/dev/ttyUSB"))


def format_disk(d: DiskProgress) -> str:
    pct = 100.0 * d.replicated_bytes / d.total_bytes if d.total_bytes else 100.0
    eta = (d.total_bytes - d.replicated_bytes) / d.rate_bps if d.rate_bps > 0 else None
    return (
        f"{d.device_name} -> {d.target}: {human_bytes(d.replicated_bytes)} / {human_bytes(d.total_bytes)} "
        f"({pct:5.1f}%)  {human_bytes(d.rate_bps)}/s  ETA {human_eta(eta if pct < 100 else 0)}"
        + (f"  backlog {human_bytes(d.backlogged_bytes)}" if d.backlogged_bytes else "")
    )


class ProgressDisplay:
    """A StateReporter that draws progress for the admin watching the console."""

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = is_live_terminal(self.stream) if live is None else live
        self.interval = 0.5 if self.live else interval
        self._last: float | None = None
        self._drawn = 0
        self._state = ""

    def _line(self, text: str) -> None:
        self._erase()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _erase(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def initiation_step(self, step: InitiationStep, status: StepStatus) -> None:
        if status is not StepStatus.IN_PROGRESS:
            self._line(f"[{status}] {step.replace('_', ' ').capitalize()}")

    def replication_state(self, state: ReplicationState) -> None:
        self._state = str(state)
        self._line(f"Replication state: {state}")

    def progress(self, snapshot: ReplicationSnapshot) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        lines = [f"{snapshot.state}: " + format_disk(d) for d in snapshot.disks]
        if snapshot.lag_seconds:
            lines.append(f"lag {snapshot.lag_seconds} s")
        if self.live:
            self._erase()
            self.stream.write("".join(x + "\n" for x in lines))
            self._drawn = len(lines)
        else:
            self.stream.write("".join(x + "\n" for x in lines))
        self.stream.flush()

    def error(self, error: ReplicationError, raw: str) -> None:
        self._line(f"Replication error {error}: {raw}")

    def error_cleared(self) -> None:
        self._line("Replication error cleared")

    def consistency_attained(self) -> None:
        self._line("All volumes verified and in continuous replication: ready for failback launch")

    def completed(self) -> None:
        self._line("Final sync done: every volume flushed and verified")
