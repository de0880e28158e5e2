"""The client's wait for the boot units it needs (bootwait.py): the exact command, and every way it ends.

The command runs for real: a `systemctl` script on PATH stands in for systemd (records its arguments,
sleeps, exits as told), so the pipes, the timeout and the kill are the real ones."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from failback_client.bootwait import BootWait, start_from_env, wait_command

from tests.test_client_helpers import SEED, agent_listener, client_env, run_in_process


@pytest.fixture
def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`systemctl` on PATH: appends its argv to calls.txt, sleeps $FAKE_SLEEP, prints $FAKE_OUT, exits $FAKE_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(
        '#!/bin/sh\necho "$*" >> "$FAKE_CALLS"\nsleep "${FAKE_SLEEP:-0}"\n'
        'printf "%s" "${FAKE_OUT:-}"\nexit "${FAKE_RC:-0}"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.txt"))
    return tmp_path / "calls.txt"


def test_the_command_joins_the_units_start_jobs() -> None:
    assert wait_command(["local-fs.target", "systemd-udev-trigger.service"]) == [
        "systemctl",
        "start",
        "--no-ask-password",
        "local-fs.target",
        "systemd-udev-trigger.service",
    ]


def test_units_up(fake_systemctl: Path) -> None:
    ok, message = BootWait(["local-fs.target", "systemd-tmpfiles-setup.service"]).wait()
    assert ok, message
    assert message.startswith("boot units up ") and message.endswith("local-fs.target systemd-tmpfiles-setup.service")
    assert fake_systemctl.read_text() == "start --no-ask-password local-fs.target systemd-tmpfiles-setup.service\n"


def test_runs_in_the_background_until_joined(fake_systemctl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    started = time.monotonic()
    wait = BootWait(["local-fs.target"])
    assert time.monotonic() - started < 0.4  # starting it does not wait
    ok, _ = wait.wait()
    assert ok and time.monotonic() - started >= 0.5


def test_a_failed_unit_is_reported_in_systemctl_s_words(fake_systemctl: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_RC", "1")
    monkeypatch.setenv("FAKE_OUT", "Job for systemd-udev-trigger.service failed.\nSee 'journalctl -xe'.\n")
    ok, message = BootWait(["systemd-udev-trigger.service"]).wait()
    assert not ok
    assert "systemctl start --no-ask-password systemd-udev-trigger.service failed (exit 1)" in message
    assert "Job for systemd-udev-trigger.service failed. See 'journalctl -xe'." in message


def test_a_wait_that_does_not_end_is_cut_at_the_timeout(fake_systemctl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SLEEP", "30")
    wait = BootWait(["local-fs.target"])
    started = time.monotonic()
    ok, message = wait.wait(timeout=0.5)
    assert not ok and message.endswith("not done after 0 s; going on without it"), message
    assert time.monotonic() - started < 10
    assert wait.proc is not None and wait.proc.returncode is not None  # killed and reaped, not left behind


def test_no_systemctl_is_said_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    ok, message = BootWait(["local-fs.target"]).wait()
    assert not ok and message.startswith("not waiting for local-fs.target: cannot run systemctl")


def test_only_when_the_unit_asks(fake_systemctl: Path) -> None:
    assert start_from_env({}) is None
    assert start_from_env({"FAILBACK_WAIT_UNITS": "  "}) is None
    wait = start_from_env({"FAILBACK_WAIT_UNITS": "local-fs.target  systemd-udev-trigger.service"})
    assert wait is not None and wait.units == ["local-fs.target", "systemd-udev-trigger.service"]
    assert wait.wait()[0]


def test_the_client_waits_after_its_summary_line_and_logs_it(
    fake_systemctl: Path, monkeypatch, capsys, tmp_path: Path, drs_controlplane_factory
) -> None:
    cp = drs_controlplane_factory(seed=SEED)
    env = {**client_env(cp), "FAILBACK_CONSOLE": "ttyS0", "FAILBACK_WAIT_UNITS": "local-fs.target"}
    with agent_listener() as port:
        env["FAILBACK_AGENT_PORT"] = str(port)
        run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 0, run.all
    assert run.out.splitlines()[0].startswith("failback-client "), run.out
    assert fake_systemctl.read_text() == "start --no-ask-password local-fs.target\n"
    assert "boot units up " in run.log and "s after the summary line: local-fs.target" in run.log


def test_a_failed_wait_is_a_warning_and_the_client_goes_on(
    fake_systemctl: Path, monkeypatch, capsys, tmp_path: Path, drs_controlplane_factory
) -> None:
    monkeypatch.setenv("FAKE_RC", "1")
    cp = drs_controlplane_factory(seed=SEED)
    env = {**client_env(cp), "FAILBACK_CONSOLE": "ttyS0", "FAILBACK_WAIT_UNITS": "local-fs.target"}
    with agent_listener() as port:
        env["FAILBACK_AGENT_PORT"] = str(port)
        run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert "WARNING" in run.log and "failed (exit 1)" in run.log, run.log
    assert run.status == 0, run.all  # the workflow ran on to its end (check-only)


def test_subprocess_module_is_the_real_one() -> None:
    # BootWait's default spawner is subprocess.Popen: what the LiveCD runs.
    assert BootWait.__init__.__defaults__ == (subprocess.Popen,)
