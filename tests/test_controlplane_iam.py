"""The control plane decides like IAM: per-credential policies (the AWS managed failback policies as data, an
operator policy), session tokens, expiry, AccessDenied in AWS's message shape; `serve --credentials FILE`;
StopFailback ends the LAUNCH job; an empty body is a ValidationException where members are required."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from drs_controlplane.credentials_file import CredentialsFileError, load_credentials
from drs_controlplane.policies import managed, policy_named
from failback_client.drs_model import drs_service_model

from tests import controlplane_fixture
from tests.controlplane_fixture import random_credential
from tests.test_controlplane import LOCAL_DISKS, WEB01, _csr

drs_controlplane = controlplane_fixture.drs_controlplane
drs_controlplane_factory = controlplane_fixture.drs_controlplane_factory

DB01 = "i-0a1b2c3d4e5f60002"
DENIED = re.compile(
    r"^User: (?P<user>arn:aws:\S+) is not authorized to perform: drs:(?P<action>\w+) on resource: "
    r"(?P<resource>\S+)$"
)
INSTALLER_ARN = "arn:aws:sts::123456789012:assumed-role/FailbackInstaller/admin"


def _error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    r = exc.value.response
    return r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"], r["Error"]["Message"]


def _installer(**kw):  # type: ignore[no-untyped-def]
    return random_credential(
        policy=managed("installation"), session_token="FwoGZXIvYXdzEXAMPLETOKEN", principal=INSTALLER_ARN, **kw
    )


def _install(cp, cred) -> tuple[str, dict]:  # type: ignore[no-untyped-def]
    """Every installation call, with the installation policy's credential: all allowed."""
    drs = cp.client(cred)
    assert drs.describe_recovery_instances()["items"]
    client_id = drs.associate_failback_client_to_recovery_instance_for_drs(
        recoveryInstanceID=WEB01,
        failbackClientVersion="0.1.0",
        localDisks=LOCAL_DISKS,
        identification={
            "hostname": "web01",
            "macAddresses": ["52:54:00:12:34:56"],
            "bootMode": "BIOS",
            "secureBoot": False,
        },
    )["failbackClientID"]
    ids = {"failbackClientID": client_id, "recoveryInstanceID": WEB01}
    drs.get_suggested_failback_client_device_mapping_for_drs(**ids, localDisks=LOCAL_DISKS)
    drs.update_failback_client_device_mapping_for_drs(
        **ids,
        deviceMapping=[
            {"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "/dev/sda"},
            {"recoveryInstanceDeviceName": "/dev/nvme1n1", "failbackClientDeviceName": "/dev/sdb"},
        ],
    )
    drs.update_agent_replication_info_for_drs(
        **ids,
        dataReplicationState="INITIATING",
        initiationSteps=[{"name": "COMPLETE_VOLUME_MAPPING", "status": "SUCCEEDED"}],
    )
    drs.issue_agent_certificate_for_drs(**ids, certificateSigningRequest=_csr(client_id))
    drs.send_client_metrics_for_drs(**ids, metrics=[{"name": "replicatedBytes", "value": 1.0}])
    return client_id, ids


@pytest.mark.parametrize(
    "call",
    [
        "get_failback_command_for_drs",
        "update_failback_client_last_seen_for_drs",
        "get_failback_launch_requested_for_drs",
        "notify_agent_connected_for_drs",
        "update_agent_replication_process_state_for_drs",
    ],
)
def test_installation_credentials_only_install(drs_controlplane_factory, call):
    """The mutant: one post-install call made with the admin's installation credentials is refused."""
    installer = _installer()
    cp = drs_controlplane_factory(extra_credentials=(installer,))
    _client_id, ids = _install(cp, installer)
    with pytest.raises(ClientError) as exc:
        getattr(cp.client(installer, max_attempts=1), call)(**ids)
    status, code, message = _error(exc)
    assert (status, code) == (403, "AccessDeniedException")
    m = DENIED.match(message)
    assert m, message
    assert m["user"] == INSTALLER_ARN
    assert m["resource"] == f"arn:aws:drs:us-east-1:123456789012:recovery-instance/{WEB01}"
    assert cp.plane.requests[-1].error_code == "AccessDeniedException"
    assert cp.plane.requests[-1].principal == INSTALLER_ARN


def test_installation_policy_denies_console_and_configuration_calls(drs_controlplane_factory):
    installer = _installer()
    cp = drs_controlplane_factory(extra_credentials=(installer,))
    drs = cp.client(installer, max_attempts=1)
    for call, kwargs in (
        ("start_failback_launch", {"recoveryInstanceIDs": [WEB01]}),
        ("get_failback_replication_configuration", {"recoveryInstanceID": WEB01}),
        ("stop_failback", {"recoveryInstanceID": WEB01}),
    ):
        with pytest.raises(ClientError) as exc:
            getattr(drs, call)(**kwargs)
        assert _error(exc)[1] == "AccessDeniedException", call
        assert DENIED.match(_error(exc)[2])


def test_operator_presses_failback_but_is_not_the_failback_client(drs_controlplane_factory):
    cp = drs_controlplane_factory()
    operator = random_credential(policy=policy_named("operator", drs_service_model()))
    cp.plane.add_credential(operator)
    drs = cp.client(operator, max_attempts=1)
    assert drs.get_failback_replication_configuration(recoveryInstanceID=WEB01)["recoveryInstanceID"] == WEB01
    _client_id, ids = _install(cp, operator)  # one demo key installs too
    with pytest.raises(ClientError) as exc:
        drs.get_failback_command_for_drs(**ids)
    assert _error(exc)[1] == "AccessDeniedException"


def test_failback_policy_scoped_to_its_recovery_instance(drs_controlplane_factory):
    cp = drs_controlplane_factory()
    client_id, ids = _install(cp, cp.credential)
    scoped = random_credential(policy=managed("failback"), scope_instance=WEB01, session_token="tok")
    cp.plane.add_credential(scoped)
    drs = cp.client(scoped, max_attempts=1)
    assert drs.get_failback_command_for_drs(**ids)["command"] == "CONTINUE"
    assert drs.describe_recovery_instances()["items"]  # Resource "*" in the policy
    with pytest.raises(ClientError) as exc:
        drs.get_failback_command_for_drs(failbackClientID=client_id, recoveryInstanceID=DB01)
    m = DENIED.match(_error(exc)[2])
    assert m and m["resource"].endswith(f"recovery-instance/{DB01}") and m["action"] == "GetFailbackCommandForDrs"
    with pytest.raises(ClientError) as exc:  # in the installation policy only
        drs.update_agent_replication_info_for_drs(**ids, dataReplicationState="INITIATING")
    assert _error(exc)[1] == "AccessDeniedException"


def test_expiry_and_session_token(drs_controlplane_factory):
    cred = _installer(expires_at=datetime.now(UTC) + timedelta(hours=1))
    cp = drs_controlplane_factory(extra_credentials=(cred,))
    assert cp.client(cred).describe_recovery_instances()["items"]
    cp.plane.set_credential_expiry(cred.access_key, datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(ClientError) as exc:
        cp.client(cred, max_attempts=1).describe_recovery_instances()
    assert _error(exc) == (403, "ExpiredTokenException", "The security token included in the request is expired")
    with pytest.raises(ClientError) as exc:  # the token belongs to the key
        cp.client(cred, max_attempts=1, session_token=None).describe_recovery_instances()
    assert _error(exc)[1] == "UnrecognizedClientException"
    assert cp.plane.counts()["expired token"] == 1


def test_stop_failback_ends_the_launch_job(drs_controlplane_factory):
    cp = drs_controlplane_factory()
    _client_id, ids = _install(cp, cp.credential)
    drs = cp.client()
    drs.notify_consistency_attained_for_drs(**ids, consistencyDateTime="2026-01-01T00:00:00Z", finalSync=False)
    job = cp.press_failback(WEB01)
    assert drs.describe_jobs(filters={"jobIDs": [job["jobID"]]})["items"][0]["status"] == "STARTED"
    drs.stop_failback(recoveryInstanceID=WEB01)
    ended = drs.describe_jobs(filters={"jobIDs": [job["jobID"]]})["items"][0]
    assert ended["status"] == "COMPLETED" and "endDateTime" in ended
    assert ended["participatingServers"][0]["launchStatus"] == "FAILED"
    assert cp.recovery_instance(WEB01)["failback"]["state"] == "FAILBACK_NOT_STARTED"


def _signed_post(cp, operation: str, body: bytes) -> tuple[int, dict, dict]:  # type: ignore[no-untyped-def]
    url = f"{cp.url}/{operation}"
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(cp.access_key, cp.secret_key), "drs", cp.region).add_auth(request)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", parts.path, body=body, headers=dict(request.headers.items()))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        conn.close()


def test_empty_body_is_a_validation_error_where_members_are_required(drs_controlplane):
    status, headers, body = _signed_post(drs_controlplane, "StopFailback", b"")
    assert (status, headers["x-amzn-errortype"]) == (400, "ValidationException")
    assert "recoveryInstanceID" in body["message"]
    status, _, body = _signed_post(drs_controlplane, "DescribeRecoveryInstances", b"")  # nothing required
    assert status == 200 and body["items"]


def test_credentials_file_errors_name_the_entry(tmp_path: Path):
    model = drs_service_model()
    now = datetime.now(UTC)
    f = tmp_path / "creds.yaml"
    (tmp_path / "secret").write_text("s3cr3t-value\n")
    f.write_text(
        "credentials:\n  - {access_key: AKIAEXAMPLE000000001, secret_key_file: secret, policy: installation,"
        " session_token: tok, lifetime: 60}\n  - {access_key: AKIAEXAMPLE000000002, secret_key: x,"
        " policy: operator}\n"
    )
    first, second = load_credentials(f, model, now)
    assert first.secret_key == "s3cr3t-value" and first.session_token == "tok"
    assert first.expires_at == now + timedelta(seconds=60) and first.policy == managed("installation")
    assert second.policy is not None and second.policy.allows("StartFailbackLaunch", "*")
    for text, fragment in (
        ("credentials: []", "at least one entry"),
        ("credentials:\n  - {access_key: AKIAEXAMPLE000000001, secret_key: x, policy: root}", "policy must be"),
        ("credentials:\n  - {access_key: AKIAEXAMPLE000000001, policy: admin}", "credentials[0] (AKIAEXAMPLE"),
        ("credentials:\n  - {access_key: AKIAEXAMPLE000000001, secret_key: x, policy: admin, ttl: 5}", "ttl"),
        (
            "credentials:\n  - {access_key: AKIAEXAMPLE000000001, secret_key: x, policy: admin, lifetime: -1}",
            "lifetime",
        ),
    ):
        f.write_text(text)
        with pytest.raises(CredentialsFileError) as exc:
            load_credentials(f, model, now)
        assert fragment in str(exc.value)


def test_serve_with_a_credentials_file(tmp_path: Path):
    """`drs-controlplane serve --credentials FILE` as a process: the installer may install, not press Failback."""
    from failback_client.drs_model import make_drs_client

    f = tmp_path / "creds.yaml"
    f.write_text(
        "credentials:\n  - {access_key: ASIAEXAMPLE000000001, secret_key: install-secret, policy: "
        "installation, session_token: tok, principal: " + INSTALLER_ARN + "}\n"
    )
    seed = Path(__file__).resolve().parents[1] / "controlplane" / "examples" / "seed.yaml"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "drs_controlplane.cli",
            "serve",
            "--credentials",
            str(f),
            "--seed",
            str(seed),
            "--state",
            str(tmp_path / "state.db"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        drs = make_drs_client(
            region="us-east-1",
            endpoint_url=url,
            access_key="ASIAEXAMPLE000000001",
            secret_key="install-secret",
            session_token="tok",
            max_attempts=1,
        )
        assert drs.describe_recovery_instances()["items"]
        with pytest.raises(ClientError) as exc:
            drs.start_failback_launch(recoveryInstanceIDs=[WEB01])
        assert _error(exc)[2] == (
            f"User: {INSTALLER_ARN} is not authorized to perform: drs:StartFailbackLaunch on "
            f"resource: arn:aws:drs:us-east-1:123456789012:recovery-instance/{WEB01}"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
