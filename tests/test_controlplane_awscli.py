"""The real AWS CLI (awscli from PyPI, its own botocore and drs model; .venv-awscli from install-deps.sh) drives
the local control plane: the public failback operations work, StopFailback ends the LAUNCH job, and a call the
credential's policy does not allow is AccessDeniedException, as on a real account."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from drs_controlplane.policies import managed, policy_named
from failback_client.drs_model import drs_service_model

from tests import controlplane_fixture
from tests.controlplane_fixture import random_credential
from tests.test_controlplane import WEB01, _associate

drs_controlplane_factory = controlplane_fixture.drs_controlplane_factory
AWS = Path(__file__).resolve().parents[1] / ".venv-awscli" / "bin" / "aws"


def _aws(cp, credential, *args: str, home: Path) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "AWS_ACCESS_KEY_ID": credential.access_key,
        "AWS_SECRET_ACCESS_KEY": credential.secret_key,
        "AWS_DEFAULT_REGION": cp.region,
        "AWS_CONFIG_FILE": str(home / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_PAGER": "",
    }
    if credential.session_token:
        env["AWS_SESSION_TOKEN"] = credential.session_token
    return subprocess.run(
        [str(AWS), "drs", *args, "--endpoint-url", cp.url, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else {}


@pytest.mark.slow
def test_the_aws_cli_drives_the_control_plane(drs_controlplane_factory, tmp_path: Path):
    if not AWS.is_file():
        pytest.fail(f"{AWS} is missing: run ./install-deps.sh (it installs awscli in .venv-awscli)")
    version = subprocess.run([str(AWS), "--version"], capture_output=True, text=True, check=True)
    print(f"\n{(version.stdout or version.stderr).strip()}")
    operator = random_credential(
        policy=policy_named("operator", drs_service_model()),
        principal="arn:aws:iam::123456789012:user/console-operator",
    )
    installer = random_credential(
        policy=managed("installation"),
        session_token="FwoGZXIvYXdzEXAMPLE",
        principal="arn:aws:sts::123456789012:assumed-role/FailbackInstaller/admin",
    )
    cp = drs_controlplane_factory(extra_credentials=(operator, installer))

    items = _ok(_aws(cp, operator, "describe-recovery-instances", home=tmp_path))["items"]
    assert WEB01 in {i["recoveryInstanceID"] for i in items}
    servers = _ok(
        _aws(cp, operator, "describe-source-servers", "--filters", "hardwareId=52:54:00:12:34:56", home=tmp_path)
    )["items"]
    assert [s["sourceServerID"] for s in servers] == ["s-1111111111111111a"]
    config = _ok(
        _aws(cp, operator, "get-failback-replication-configuration", "--recovery-instance-id", WEB01, home=tmp_path)
    )
    assert config["recoveryInstanceID"] == WEB01
    _ok(
        _aws(
            cp,
            operator,
            "update-failback-replication-configuration",
            "--recovery-instance-id",
            WEB01,
            "--bandwidth-throttling",
            "50",
            home=tmp_path,
        )
    )
    assert cp.internal(WEB01)["replicationConfiguration"]["bandwidthThrottling"] == 50

    # a failback client replicated it to Ready (our private operations: boto3 with the merged model)
    client_id = _associate(cp)
    cp.client().notify_consistency_attained_for_drs(
        failbackClientID=client_id,
        recoveryInstanceID=WEB01,
        consistencyDateTime="2026-01-01T00:00:00Z",
        finalSync=False,
    )
    job = _ok(_aws(cp, operator, "start-failback-launch", "--recovery-instance-ids", WEB01, home=tmp_path))["job"]
    assert job["status"] == "STARTED" and job["type"] == "LAUNCH"
    _ok(_aws(cp, operator, "stop-failback", "--recovery-instance-id", WEB01, home=tmp_path))
    jobs = _ok(_aws(cp, operator, "describe-jobs", "--filters", f"jobIDs={job['jobID']}", home=tmp_path))["items"]
    assert jobs[0]["status"] == "COMPLETED"
    assert jobs[0]["participatingServers"][0]["launchStatus"] == "FAILED"
    state = _ok(
        _aws(cp, operator, "describe-recovery-instances", "--filters", f"recoveryInstanceIDs={WEB01}", home=tmp_path)
    )["items"][0]["failback"]["state"]
    assert state == "FAILBACK_NOT_STARTED"

    # the admin's installation credentials may look, not press Failback
    assert _ok(_aws(cp, installer, "describe-recovery-instances", home=tmp_path))["items"]
    denied = _aws(cp, installer, "start-failback-launch", "--recovery-instance-ids", WEB01, home=tmp_path)
    assert denied.returncode != 0
    assert (
        "An error occurred (AccessDeniedException) when calling the StartFailbackLaunch operation: User: "
        "arn:aws:sts::123456789012:assumed-role/FailbackInstaller/admin is not authorized to perform: "
        f"drs:StartFailbackLaunch on resource: arn:aws:drs:us-east-1:123456789012:recovery-instance/{WEB01}"
    ) in denied.stderr, denied.stderr
