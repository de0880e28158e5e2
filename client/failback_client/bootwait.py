"""Waits, after the summary line is out, for the parts of the LiveCD's boot the workflow needs.

The client's unit starts it as early as systemd can (its summary line first, and Python's seconds of
loading overlap the rest of the boot) and names in FAILBACK_WAIT_UNITS the units the workflow needs
before it reads the seed or the disks: the file systems, tmpfiles (/run/failback-client), udev's
coldplug (drivers for disk controllers that are not in the initrd). `systemctl start` on a unit whose
start job is queued or running joins that job and returns when it is done, and returns at once for an
active unit: one process waits for all of them, no polling. It runs beside the imports that follow the
summary line, and the workflow joins it before its first step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping

ENV_WAIT_UNITS = "FAILBACK_WAIT_UNITS"
TIMEOUT_S = 120.0  # a boot that has not reached them by then has a failed unit: go on and say so

Popen = Callable[..., "subprocess.Popen[str]"]


def wait_command(units: list[str]) -> list[str]:
    return ["systemctl", "start", "--no-ask-password", *units]


class BootWait:
    """One `systemctl start UNITS` started now and joined by `wait()`; never raises: a client that
    cannot tell whether the boot finished still runs (and logs why it could not tell)."""

    def __init__(self, units: list[str], popen: Popen = subprocess.Popen) -> None:
        self.units = units
        self.argv = wait_command(units)
        self.started = time.monotonic()
        self.proc: subprocess.Popen[str] | None = None
        self.error: str | None = None
        try:
            # Its own process group: a timeout kills whatever it started too (their open pipe would
            # keep communicate() waiting).
            self.proc = popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        except OSError as e:
            self.error = f"cannot run {self.argv[0]}: {e.strerror or e}"

    def wait(self, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
        """(True, what) when every unit is up, else (False, why: the command and its output). Returns
        the message instead of logging it: the wait ends before the client's log is set up."""
        if self.proc is None:
            return False, f"not waiting for {' '.join(self.units)}: {self.error}"
        try:
            out, _ = self.proc.communicate(timeout=max(0.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
            return False, f"{' '.join(self.argv)}: not done after {timeout:.0f} s; going on without it"
        waited = time.monotonic() - self.started
        if self.proc.returncode != 0:
            detail = " ".join((out or "").split()) or "no output"
            return False, f"{' '.join(self.argv)} failed (exit {self.proc.returncode}) after {waited:.1f} s: {detail}"
        return True, f"boot units up {waited:.1f} s after the summary line: {' '.join(self.units)}"


def start_from_env(environ: Mapping[str, str] = os.environ, popen: Popen = subprocess.Popen) -> BootWait | None:
    """The wait the unit asked for (FAILBACK_WAIT_UNITS, space-separated), or None."""
    units = environ.get(ENV_WAIT_UNITS, "").split()
    return BootWait(units, popen) if units else None
