"""Secrets never reach stdout, stderr, the log file or a traceback; the log file is created 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from failback_client.logs import Redactor, open_private

from tests.controlplane_fixture import ControlPlaneHandle, drs_controlplane_factory, random_credential  # noqa: F401
from tests.test_client_helpers import SEED, agent_listener, client_env, run_subprocess, subprocess_env

TOKEN = "IQoJb3JpZ2luX2VjEXAMPLETOKEN" + "Zz9" * 30


@pytest.fixture
def cp(drs_controlplane_factory) -> ControlPlaneHandle:  # noqa: F811
    cred = random_credential(session_token=TOKEN, expires_at=datetime.now(UTC) + timedelta(hours=1))
    return drs_controlplane_factory(seed=SEED, credential=cred)


def assert_clean(texts: list[str], *secrets: str) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text
            assert secret[:16] not in text  # not even a prefix


@pytest.mark.parametrize("how", ["variables", "arguments"])
def test_successful_run_shows_no_secret(cp: ControlPlaneHandle, tmp_path: Path, how: str) -> None:
    log = tmp_path / "client.log"
    with agent_listener() as port:
        env = client_env(cp, agent_port=port)
        args = ["--no-prompt", "--log-console", "--log-file", str(log)]
        if how == "arguments":
            for name in ("AWS_SECRET_KEY", "AWS_SESSION_TOKEN"):
                env.pop(name)
            args += ["--aws-secret-access-key", cp.secret_key, "--aws-session-token", TOKEN]
        result = run_subprocess(env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the failback client stops here" in result.stdout  # it ran the whole workflow (--check-only)
    assert "Volumes mapped automatically" in result.stderr  # --log-console: the log is on stderr
    assert_clean([result.stdout, result.stderr, log.read_text()], cp.secret_key, TOKEN)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_failing_runs_show_no_secret(cp: ControlPlaneHandle, tmp_path: Path) -> None:
    log = tmp_path / "client.log"
    wrong_secret = cp.secret_key[::-1]
    env = client_env(cp, AWS_SECRET_KEY=wrong_secret)
    result = run_subprocess(env, "--no-prompt", "--log-console", "--log-file", str(log))
    assert result.returncode == 3
    assert_clean([result.stdout, result.stderr, log.read_text()], wrong_secret, TOKEN, cp.secret_key)


def test_traceback_is_redacted(tmp_path: Path) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    code = (
        "from failback_client.logs import REDACTOR, install_excepthook, setup_logging\n"
        f"setup_logging(log_file={str(tmp_path / 'x.log')!r}, log_console=False)\n"
        f"install_excepthook(); REDACTOR.add({secret!r})\n"
        f"raise RuntimeError('boom with ' + {secret!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env({}), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "RuntimeError: boom with ****" in result.stderr
    assert_clean([result.stdout, result.stderr, (tmp_path / "x.log").read_text()], secret)


def test_redactor_and_private_file(tmp_path: Path) -> None:
    r = Redactor()
    r.add("abc/def+ghi=jkl", None, "")
    assert r("x abc/def+ghi=jkl y abc%2Fdef%2Bghi%3Djkl") == "x **** y ****"
    path = tmp_path / "existing.log"
    path.write_text("")
    os.chmod(path, 0o644)
    os.close(open_private(str(path)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
