"""The one function through which every subprocess of the build runs.

It logs the exact command (shell-quoted, so it can be pasted) and, on failure, raises
an error that carries the command, its exit status and the tail of its output. A tool listed in
image/core/tool_warnings.py (mmdebstrap) also fails when it prints a warning not known to be harmless.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from image.core.errors import ImageError
from image.core.tool_warnings import rule_for

log = logging.getLogger("image.core.run")


class CommandError(ImageError, RuntimeError):
    """A command exited non-zero (the base of the two below: callers that catch any failed command catch this)."""

    def __init__(self, cmd: Sequence[str], returncode: int, output: str = "") -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.output = output
        super().__init__(f"command failed with exit status {returncode}: {shlex.join(self.cmd)}" + _tail(output))

    def summary(self) -> str:
        """The failing command on one line; its output's tail is `output_tail()` (printed above it)."""
        return str(self).split("\n", 1)[0]

    def output_tail(self, lines: int = 20) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def _tail(output: str) -> str:
    tail = "\n".join(output.strip().splitlines()[-20:])
    return f"\n--- last lines of its output ---\n{tail}" if tail else ""


class ToolWarningError(CommandError):
    """A command printed a warning not known to be harmless (image/core/tool_warnings.py), whatever its exit status."""

    def __init__(self, cmd: Sequence[str], returncode: int, warnings: list[str], output: str = "") -> None:
        super().__init__(cmd, returncode, output)
        self.warnings = warnings
        self.args = (
            f"command printed a warning not known to be harmless (exit status {returncode}): "
            f"{shlex.join(self.cmd)}\n"
            + "\n".join(f"  {w}" for w in warnings)
            + "\nfind its cause; only once it is known to change nothing, list it in "
            "image/core/tool_warnings.py with why" + _tail(output),
        )

    def summary(self) -> str:
        return (
            f"{self.cmd[0]} printed a warning not known to be harmless: {'; '.join(self.warnings)} "
            "(find its cause; list it in image/core/tool_warnings.py only once it is known to change nothing)"
        )


def _tee_stderr(proc: subprocess.Popen[bytes], copy: list[bytes]) -> threading.Thread:
    """Pass the command's stderr on to ours line by line (long steps stay visible) and keep a copy."""

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            copy.append(line)
            sys.stderr.write(line.decode(errors="replace"))
            sys.stderr.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


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
    rule = rule_for(argv[0])
    teed: list[bytes] = []
    try:
        if rule is not None and not capture:
            # A tool whose warnings are checked: its stderr is read while it still goes to ours.
            proc = _run_teeing(argv, cwd, full_env, input, timeout, teed)
        else:
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
    if teed:
        stderr = b"".join(teed).decode(errors="replace")
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stdout + stderr)
    bad = rule.offending(stderr) if rule is not None else []
    if bad:
        raise ToolWarningError(argv, proc.returncode, bad, stdout + stderr)
    return result


def _run_teeing(
    argv: list[str],
    cwd: Path | None,
    env: Mapping[str, str] | None,
    input: bytes | None,
    timeout: float | None,
    teed: list[bytes],
) -> subprocess.CompletedProcess[bytes]:
    with subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else None, stderr=subprocess.PIPE
    ) as proc:
        pump = _tee_stderr(proc, teed)
        try:
            if input is not None:
                assert proc.stdin is not None
                proc.stdin.write(input)
                proc.stdin.close()
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pump.join()
            raise subprocess.TimeoutExpired(argv, timeout or 0, stderr=b"".join(teed)) from None
        pump.join()
    return subprocess.CompletedProcess(argv, returncode, None, None)
