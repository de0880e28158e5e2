"""The one function through which every command of the conversion runs.

It logs the exact command (shell-quoted, pasteable) and raises CommandFailed carrying it, its exit status
and the tail of its output. Conversion commands never carry secrets (disk paths, chroot tools only).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


class CommandFailed(RuntimeError):
    """A command exited non-zero, timed out or could not be started."""

    def __init__(self, cmd: Sequence[str], returncode: int, output: str = "") -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-15:])
        msg = f"command failed with exit status {returncode}: {shlex.join(self.cmd)}"
        if tail:
            msg += f"\n--- last lines of its output ---\n{tail}"
        super().__init__(msg)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = 1800,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` (output captured as text), logging it first and its output after. `env` adds to os.environ."""
    argv = [os.fspath(c) for c in cmd]
    shown = shlex.join(argv)
    if env:
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shown
    log.info("$ %s", shown)
    try:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env={**os.environ, **env} if env else None,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]}: not found ({exc})") from None
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        raise CommandFailed(argv, -1, f"timed out after {timeout} s\n{text}") from None
    output = (proc.stdout or "") + (proc.stderr or "")
    if output.strip():
        log.debug("output of %s:\n%s", argv[0], output.rstrip())
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, output)
    return proc


def chroot(
    root: os.PathLike[str] | str, *cmd: str, check: bool = True, timeout: float | None = 1800
) -> subprocess.CompletedProcess[str]:
    """`cmd` run inside the target with its own tools (a clean PATH and no interactive frontends)."""
    return run(
        [
            "chroot",
            os.fspath(root),
            "/usr/bin/env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "DEBIAN_FRONTEND=noninteractive",
            *cmd,
        ],
        check=check,
        timeout=timeout,
    )
