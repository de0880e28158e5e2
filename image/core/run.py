"""The one function through which every subprocess of the build runs.

It logs the exact command (shell-quoted, so it can be pasted) and, on failure, raises
an error that carries the command, its exit status and the tail of its output.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from image.core.errors import ImageError

log = logging.getLogger("image.core.run")


class CommandError(ImageError, RuntimeError):
    """A command exited non-zero (the base of the two below: callers that catch any failed command catch this)."""

    def __init__(self, cmd: Sequence[str], returncode: int, output: str = "") -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-20:])
        msg = f"command failed with exit status {returncode}: {shlex.join(self.cmd)}"
        if tail:
            msg += f"\n--- last lines of its output ---\n{tail}"
        super().__init__(msg)

    def summary(self) -> str:
        """The failing command on one line; its output's tail is `output_tail()` (printed above it)."""
        return str(self).split("\n", 1)[0]

    def output_tail(self, lines: int = 20) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


class CommandTimeout(CommandError):
    """A command ran longer than its timeout and was killed (returncode -1)."""

    def __init__(self, cmd: Sequence[str], timeout: float | None, output: str = "") -> None:
        self.timeout = timeout
        super().__init__(cmd, -1, f"timed out after {timeout} s\n" + output)

    def summary(self) -> str:
        return f"command timed out after {self.timeout} s and was killed: {shlex.join(self.cmd)}"


class ToolNotFound(CommandError):
    """The program to run is not installed (returncode 127, as a shell reports it)."""

    def __init__(self, cmd: Sequence[str], reason: str) -> None:
        super().__init__(cmd, 127, f"{cmd[0]}: not found ({reason}); run ./install-deps.sh")

    def summary(self) -> str:
        return f"{self.cmd[0]}: not installed (needed for: {shlex.join(self.cmd)}); run ./install-deps.sh"


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    check: bool = True,
    input: bytes | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, logging it first. `env` is added to (not replacing) the current environment.

    With capture=False the command's output goes to our stdout/stderr (long steps stay
    visible); with capture=True it is returned in .stdout/.stderr as text.
    """
    argv = [os.fspath(c) for c in cmd]
    shown = shlex.join(argv)
    if env:
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shown
    if cwd:
        shown = f"(cd {shlex.quote(str(cwd))} && {shown})"
    log.info("$ %s", shown)
    full_env = {**os.environ, **env} if env else None
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=full_env,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise ToolNotFound(argv, str(exc)) from None
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        raise CommandTimeout(argv, timeout, out.decode(errors="replace")) from None
    stdout = proc.stdout.decode(errors="replace") if capture and proc.stdout is not None else ""
    stderr = proc.stderr.decode(errors="replace") if capture and proc.stderr is not None else ""
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stdout + stderr)
    return result
