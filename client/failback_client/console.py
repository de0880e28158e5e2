"""What the admin sees: rich on a screen, plain lines on a serial console or a pipe; and console arbitration.

Arbitration: the LiveCD starts one client on tty1 and one on ttyS0, both with FAILBACK_CONSOLE_LOCK set to
the same file. Both print the summary and preflight. The one that receives the first user input (or, when
nothing needs prompting, the first to get going) takes an exclusive flock and writes its tty name into the
file; the other says where the client runs and waits until that one ends, then exits so that systemd starts
it afresh (waiting, not exiting at once, keeps systemd from restarting it in a tight loop).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import struct
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from typing import IO, TextIO

from failback_client.logs import REDACTOR, Redactor

log = logging.getLogger(__name__)

SERIAL_TTY_PREFIXES = ("ttyS", "ttyAMA", "ttyUSB", "hvc", "ttyPS", "ttymxc")


class ConsoleReleased(Exception):
    """The other console's client ended while this one waited: exit so systemd starts this one afresh."""


def size_serial_console(stream: IO[str], console: str | None) -> bool:
    """Gives a serial console that reports no size (0 x 0: IPMI SOL, BMC web consoles) the VT100
    size, 80 x 24, so that tables and progress lines wrap where the admin's terminal does. True when
    it did. (The launcher used to run `stty rows 24 cols 80`: a process fewer at boot.)"""
    if not console or not console.startswith(SERIAL_TTY_PREFIXES):
        return False
    try:
        fd = stream.fileno()
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
        if rows or cols:
            return False
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    except (OSError, ValueError, AttributeError):  # not a terminal (a pipe in tests), or a UART gone
        return False
    return True


def tty_name(stream: IO[str]) -> str | None:
    try:
        return os.ttyname(stream.fileno()) if stream.isatty() else None
    except (OSError, ValueError, AttributeError):
        return None


def wants_plain(stream: IO[str], env: dict[str, str] | os._Environ[str]) -> bool:
    """Plain lines unless `stream` is a terminal that is not a serial line (and TERM is not dumb)."""
    name = tty_name(stream)
    if name is None:
        return True
    # FAILBACK_CONSOLE is the LiveCD launcher's name for the console this instance runs on.
    if os.path.basename(name).startswith(SERIAL_TTY_PREFIXES) or env.get("FAILBACK_CONSOLE", "").startswith(
        SERIAL_TTY_PREFIXES
    ):
        return True
    return env.get("TERM", "dumb") in ("", "dumb")


class ConsoleLock:
    """The flock-based arbitration between the tty1 and ttyS0 instances."""

    def __init__(self, path: str, me: str) -> None:
        self.path = path
        self.me = me
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.held = False

    def holder(self) -> str | None:
        """The tty of the instance holding the lock, or None when nobody holds it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._content() or "another console"
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return None

    def _content(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return ""

    def try_claim(self) -> bool:
        """Take the lock if it is free. Retries briefly: the other side's holder() probe holds it for microseconds."""
        if self.held:
            return True
        for _ in range(40):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if self._content() and self.holder() is not None:
                    return False
                time.sleep(0.025)
                continue
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (self.me + "\n").encode(), 0)
            self.held = True
            log.info("console lock %s taken by %s", self.path, self.me)
            return True
        return False

    def wait_for_release(self) -> None:
        """Block until the holder ends (the kernel drops its flock when its process exits)."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class Console:
    """Output and input for the workflow. All text passes through the secret redactor."""

    def __init__(
        self,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        plain: bool | None = None,
        lock_path: str | None = None,
        redactor: Redactor = REDACTOR,
    ) -> None:
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.redact = redactor
        self.plain = wants_plain(self.stdout, os.environ) if plain is None else plain
        self.tty = tty_name(self.stdin)
        self._rich = None
        if not self.plain:
            from rich.console import Console as RichConsole

            self._rich = RichConsole(file=self.stdout, highlight=False, soft_wrap=True)
        me = self.tty or f"stdin of pid {os.getpid()}"
        self.lock = ConsoleLock(lock_path, me) if lock_path else None
        # Set by the command line when it printed the summary line before loading the workflow.
        self.summary_shown = False

    # ---- output -------------------------------------------------------------------------------
    def _text(self, text: str) -> str:
        """Redacted; ASCII punctuation on plain consoles (serial terminals often lack UTF-8 glyphs)."""
        text = self.redact(text)
        return text.replace("…", "...").replace("—", "-") if self.plain else text

    def raw(self, text: str) -> None:
        """One line exactly as given (the summary line the smoke tests grep), never styled or wrapped."""
        self.stdout.write(self.redact(text) + "\n")
        self.stdout.flush()

    def line(self, text: str = "", style: str | None = None) -> None:
        text = self._text(text)
        if text:
            log.info("%s", text)
        if self._rich is not None:
            self._rich.print(text, style=style, markup=False)
        else:
            self.stdout.write(text + "\n")
        self.stdout.flush()

    def info(self, text: str) -> None:
        self.line(text)

    def ok(self, text: str) -> None:
        self.line(f"OK: {text}" if self.plain else f"✔ {text}", style="green")

    def warn(self, text: str) -> None:
        self.line(f"WARNING: {text}", style="yellow")

    def error(self, text: str) -> None:
        self.line(f"ERROR: {text}", style="bold red")

    def heading(self, text: str) -> None:
        if self.plain:
            self.line(f"== {text} ==")
        else:
            self.line("")
            self.line(text, style="bold cyan")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
        cells = [[self._text(str(c)) for c in row] for row in rows]
        if title:
            log.info("%s", self._text(title))
        for row in cells:
            log.info("%s", " | ".join(row))
        if self._rich is not None:
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for h in headers:
                t.add_column(h)
            for row in cells:
                t.add_row(*row)
            self._rich.print(t)
            self.stdout.flush()
            return
        if title:
            self.stdout.write(title + "\n")
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        self.stdout.write(fmt.format(*headers).rstrip() + "\n")
        for row in cells:
            self.stdout.write(fmt.format(*row).rstrip() + "\n")
        self.stdout.flush()

    # ---- input --------------------------------------------------------------------------------
    def ask(self, prompt: str, *, secret: bool = False) -> str:
        """Show `prompt` and read one line. Secrets are read with echo off and never shown."""
        self.stdout.write(self._text(prompt))
        self.stdout.flush()
        with self._no_echo(secret):
            self._await_input()
            answer = self.stdin.readline()
        if secret and self.stdin.isatty():
            self.stdout.write("\n")
            self.stdout.flush()
        if answer == "":
            raise EOFError("no more input on the console")
        answer = answer.rstrip("\r\n")
        log.info("%s%s", prompt, MASK_ANSWER if secret else self.redact(answer))
        return answer

    @contextlib.contextmanager
    def _no_echo(self, secret: bool) -> Iterator[None]:
        if not (secret and self.stdin.isatty()):
            yield
            return
        fd = self.stdin.fileno()
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSADRAIN, new)
        try:
            yield
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)

    def _await_input(self) -> None:
        """With arbitration: wait for input here or for the other console to take over."""
        if self.lock is None or self.lock.held:
            return
        fd = self.stdin.fileno()
        while True:
            holder = self.lock.holder()
            if holder is not None and holder != self.lock.me:
                self._wait_other(holder)
            readable, _, _ = select.select([fd], [], [], 0.5)
            if readable:
                if self.lock.try_claim():
                    return
                self._wait_other(self.lock.holder() or "another console")

    def claim_or_wait(self) -> None:
        """Before the workflow acts without asking anything: the first instance to get here goes on."""
        if self.lock is None or self.lock.held:
            return
        if not self.lock.try_claim():
            self._wait_other(self.lock.holder() or "another console")

    def hold(self, log_path: str | None) -> None:
        """On the LiveCD consoles systemd restarts the client as soon as it exits: wait for the admin first,
        so that a finished or failed run stays readable and never becomes a restart loop."""
        where = f" (log: {log_path})" if log_path else ""
        if not self.stdin.isatty():
            time.sleep(30)
            return
        try:
            self.ask(f"Press Enter to start the failback client again{where}. ")
        except EOFError:
            time.sleep(30)

    def _wait_other(self, holder: str) -> None:
        self.stdout.write("\n")
        self.line(
            f"The failback client is running on {holder}; use that console. "
            "This one waits and starts again when that one ends."
        )
        assert self.lock is not None
        self.lock.wait_for_release()
        raise ConsoleReleased(holder)


MASK_ANSWER = "(hidden)"
