"""Progress display of a publish (rich bars on a terminal, plain lines otherwise) and the final table."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID

from image.release.publish.plan import human_size


@dataclass
class RegionResult:
    region: str
    objects: int = 0  # objects of the plan that are in place and verified
    planned: int = 0
    written: int = 0  # objects actually uploaded / copied / put in this run
    bytes: int = 0  # bytes uploaded or copied in this run
    sent_bytes: int = 0  # of which uploaded from this host (the rest: server-side copies)
    seconds: float = 0.0
    verified: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.verified


class Reporter(Protocol):
    def region_started(self, region: str, total_bytes: int) -> None: ...
    def advance(self, region: str, nbytes: int) -> None: ...
    def object_done(self, region: str, action: str, bucket: str, key: str, size: int) -> None: ...
    def region_finished(self, result: RegionResult) -> None: ...
    def close(self) -> None: ...


class SilentReporter:
    def region_started(self, region: str, total_bytes: int) -> None:
        pass

    def advance(self, region: str, nbytes: int) -> None:
        pass

    def object_done(self, region: str, action: str, bucket: str, key: str, size: int) -> None:
        pass

    def region_finished(self, result: RegionResult) -> None:
        pass

    def close(self) -> None:
        pass


class PlainReporter(SilentReporter):
    """One line per event, safe from many threads: for logs, CI and pipes."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def _say(self, text: str) -> None:
        with self._lock:
            print(text, file=self._out, flush=True)

    def region_started(self, region: str, total_bytes: int) -> None:
        self._say(f"[{region}] start (up to {human_size(total_bytes)} to write)")

    def object_done(self, region: str, action: str, bucket: str, key: str, size: int) -> None:
        self._say(f"[{region}] {action:<9} s3://{bucket}/{key} ({human_size(size)})")

    def region_finished(self, result: RegionResult) -> None:
        state = "done" if result.ok else f"FAILED: {result.error}"
        self._say(
            f"[{result.region}] {state} ({result.written} written, {human_size(result.bytes)}, {result.seconds:.1f} s)"
        )


class RichReporter(SilentReporter):
    """A bar per region (bytes written), with the object being written as its description."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.fields[region]:<15}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(file=out),
        )
        self._tasks: dict[str, TaskID] = {}
        self._progress.start()

    def region_started(self, region: str, total_bytes: int) -> None:
        self._tasks[region] = self._progress.add_task("checking", total=max(total_bytes, 1), region=region)

    def advance(self, region: str, nbytes: int) -> None:
        self._progress.advance(self._tasks[region], nbytes)

    def object_done(self, region: str, action: str, bucket: str, key: str, size: int) -> None:
        self._progress.update(self._tasks[region], description=f"{action} {key}")

    def region_finished(self, result: RegionResult) -> None:
        task = self._tasks.get(result.region)
        if task is not None:
            text = "[green]done" if result.ok else f"[red]FAILED: {result.error}"
            self._progress.update(task, description=text, completed=self._progress.tasks[task].total)

    def close(self) -> None:
        self._progress.stop()


def make_reporter(mode: str, out: TextIO = sys.stdout) -> Reporter:
    """mode: auto (rich on a terminal, plain otherwise), rich, plain or none."""
    if mode == "auto":
        mode = "rich" if out.isatty() else "plain"
    if mode == "rich":
        return RichReporter(out)
    if mode == "plain":
        return PlainReporter(out)
    if mode == "none":
        return SilentReporter()
    raise ValueError(f"bad progress mode {mode!r}: use auto, rich, plain or none")


def render_table(results: list[RegionResult], rich_output: bool, out: TextIO = sys.stdout) -> None:
    """The final table: region, objects, bytes, seconds, verified (and the error, if any)."""
    headers = ("region", "objects", "written", "bytes", "seconds", "verified", "error")
    rows = [
        (
            r.region,
            f"{r.objects}/{r.planned}",
            str(r.written),
            human_size(r.bytes),
            f"{r.seconds:.1f}",
            "yes" if r.verified else "NO",
            r.error or "",
        )
        for r in results
    ]
    if rich_output:
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, title="publish")
        for row in rows:
            table.add_row(*row, style=None if row[5] == "yes" and not row[6] else "red")
        Console(file=out).print(table)
        return
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
