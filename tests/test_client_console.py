"""Console output modes and the tty1/ttyS0 arbitration of the LiveCD (FAILBACK_CONSOLE_LOCK)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pexpect
import pytest
from failback_client.console import Console, ConsoleLock, size_serial_console, wants_plain

from tests.test_client_helpers import BIOS_ROOT, client_command, run_subprocess, subprocess_env


def test_plain_table_and_redaction() -> None:
    from failback_client.logs import Redactor

    redactor = Redactor()
    redactor.add("s3cr3tvalue")
    out = io.StringIO()
    console = Console(stdin=io.StringIO(), stdout=out, plain=True, redactor=redactor)
    console.table(("A", "Longer"), [("1", "x s3cr3tvalue"), ("22", "y")], title="T")
    console.ok("done")
    assert out.getvalue().splitlines() == ["T", "A   Longer", "1   x ****", "22  y", "OK: done"]


def test_plain_unless_a_screen(tmp_path: Path) -> None:
    assert wants_plain(io.StringIO(), {"TERM": "xterm"})  # a pipe or file
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert not wants_plain(tty, {"TERM": "linux"})  # a screen (tty1 is "linux")
            assert wants_plain(tty, {"TERM": "dumb"})
            assert wants_plain(tty, {})
    finally:
        os.close(master)
        os.close(slave)


def test_lock_first_claim_wins(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "console.lock")
    a, b = ConsoleLock(path, "/dev/tty1"), ConsoleLock(path, "/dev/ttyS0")
    assert a.holder() is None and b.holder() is None
    assert a.try_claim()
    assert not b.try_claim()
    assert b.holder() == "/dev/tty1"
    assert Path(path).read_text() == "/dev/tty1\n"
    os.close(a.fd)  # the holder's process ends: the kernel drops the lock
    assert b.holder() is None and b.try_claim()


@pytest.mark.parametrize("typed_on", [0, 1])
def test_two_consoles_first_input_wins_the_other_waits(tmp_path: Path, typed_on: int) -> None:
    env = subprocess_env(
        {
            "FAILBACK_SYSROOT": BIOS_ROOT,
            "FAILBACK_CONSOLE_LOCK": str(tmp_path / "console.lock"),
            "FAILBACK_PLAIN": "1",
            "FAILBACK_FIX_CLOCK": "0",
        }
    )
    children = []
    for n in range(2):
        command = client_command("--log-file", str(tmp_path / f"client{n}.log"))
        child = pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=30)
        children.append(child)
    for child in children:  # both show the summary and preflight, then the first prompt
        child.expect(r"failback-client \S+ .*boot mode: BIOS .*secure boot: off")
        child.expect_exact("AWS Access Key ID: ")
    active, idle = children[typed_on], children[1 - typed_on]
    active.sendline("AKIAIOSFODNN7EXAMPLE")
    active.expect_exact("AWS Secret Access Key (not shown): ")
    idle.expect(r"The failback client is running on (/dev/pts/\d+); use that console")
    holder = idle.match.group(1)
    assert (tmp_path / "console.lock").read_text().strip() == holder
    # the idle one waits (it does not exit and get restarted in a loop) ...
    with pytest.raises(pexpect.TIMEOUT):
        idle.expect(pexpect.EOF, timeout=1.5)
    # ... until the active one ends; then it exits 0 so that systemd starts it afresh
    active.sendintr()
    active.expect(pexpect.EOF)
    active.close()
    assert active.exitstatus == 130
    idle.expect(pexpect.EOF, timeout=10)
    idle.close()
    assert idle.exitstatus == 0


def test_ctrl_c_reaches_the_client_when_the_suite_was_started_in_the_background() -> None:
    """`sh -c 'inv test &'` (how CI or nohup may start it) ignores SIGINT in everything it starts."""
    import subprocess
    import sys

    from image.core.paths import REPO

    nested = f"'{sys.executable}' -m pytest -q -p no:cacheprovider tests/test_client_console.py -k 'two_consoles and 0'"
    result = subprocess.run(
        ["sh", "-c", f"{nested} & wait $!"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


def test_on_the_livecd_consoles_a_finished_run_waits_for_enter(tmp_path: Path) -> None:
    """systemd restarts the client (Restart=always): a failed --no-prompt run must not become a restart loop."""
    env = subprocess_env(
        {
            "FAILBACK_SYSROOT": BIOS_ROOT,
            "FAILBACK_CONSOLE_LOCK": str(tmp_path / "console.lock"),
            "FAILBACK_PLAIN": "1",
            "NO_PROMPT": "1",
        }
    )
    command = client_command("--log-file", str(tmp_path / "client.log"))
    child = pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=30)
    child.expect_exact("give --aws-access-key-id or set AWS_ACCESS_KEY or AWS_ACCESS_KEY_ID")
    child.expect_exact(f"Press Enter to start the failback client again (log: {tmp_path / 'client.log'}).")
    with pytest.raises(pexpect.TIMEOUT):
        child.expect(pexpect.EOF, timeout=1)
    child.sendline("")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2


def test_console_script_and_closed_input(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    script = shutil.which("failback-client", path=str(Path(sys.executable).parent))
    assert script is not None, "the failback-client console script is not installed in this venv"
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("failback-client ")
    # no console to answer on (stdin closed) and no --no-prompt: one clear sentence, status 2
    result = run_subprocess({"FAILBACK_SYSROOT": BIOS_ROOT}, "--log-file", str(tmp_path / "c.log"))
    assert result.returncode == 2
    assert "The console input ended before all answers were given" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_serial_console_without_a_size_gets_80x24() -> None:
    import fcntl
    import struct
    import termios

    def size(fd: int) -> tuple[int, int]:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
        return rows, cols

    def set_size(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            set_size(secondary, 0, 0)  # what a UART reports
            assert not size_serial_console(tty, "tty1"), "a VGA console keeps its own size"
            assert size(secondary) == (0, 0)
            assert size_serial_console(tty, "ttyS0")
            assert size(secondary) == (24, 80)
            set_size(secondary, 50, 132)  # an admin's `stty` (or a terminal that reports) wins
            assert not size_serial_console(tty, "ttyS0") and size(secondary) == (50, 132)
        assert not size_serial_console(io.StringIO(), "ttyS0")  # not a terminal: nothing to size
    finally:
        os.close(primary)
        os.close(secondary)
