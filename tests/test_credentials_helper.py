"""`failback-client credentials` against moto's IAM and STS server over HTTP (a moto_server process on
127.0.0.1 with IAM access control on and the AWS managed policies loaded), with real boto3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.request import urlopen

import boto3
import pytest
from failback_client import seed as seedmod
from failback_client.cli import main as client_main
from failback_client.credentials_helper import INSTALLATION_POLICY_ARN

ADMIN_POLICY = "arn:aws:iam::aws:policy/AdministratorAccess"
SETUP_CALLS = 6  # unauthenticated calls moto allows before enforcing IAM: the users below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_iam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, str]]]:
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS), "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}
    server = Path(sys.executable).with_name("moto_server")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        users = {}
        iam.create_user(UserName="admin")
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        iam.attach_user_policy(UserName="admin", PolicyArn=ADMIN_POLICY)
        users["admin"] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        iam.create_user(UserName="viewer")
        key = iam.create_access_key(UserName="viewer")["AccessKey"]
        iam.put_user_policy(
            UserName="viewer",
            PolicyName="no-create",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Resource": "*",
                            "Action": [
                                "sts:GetCallerIdentity",
                                "sts:AssumeRole",
                                "iam:GetRole",
                                "iam:ListAttachedRolePolicies",
                                "iam:ListRolePolicies",
                            ],
                        }
                    ],
                }
            ),
        )
        users["viewer"] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        yield {name: {**creds, "AWS_ENDPOINT_URL": url} for name, creds in users.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _as(monkeypatch: pytest.MonkeyPatch, creds: dict[str, str], tmp_path: Path) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_IAM", "AWS_ENDPOINT_URL_STS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for name, value in creds.items():
        monkeypatch.setenv(name, value)


def _iam(creds: dict[str, str]):  # type: ignore[no-untyped-def]
    return boto3.client(
        "iam",
        endpoint_url=creds["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
    )


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = client_main(["credentials", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def _policies(iam, role: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"])


def test_role_created_once_and_credentials_for_the_launcher(moto_iam, monkeypatch, tmp_path, capsys):
    admin = moto_iam["admin"]
    _as(monkeypatch, admin, tmp_path)
    iam = _iam(admin)
    status, out, err = _run(capsys, "--role-name", "FbInstall1")
    assert status == 0, err
    assert "(created)" in err
    lines = dict(line.split("=", 1) for line in out.splitlines())
    assert lines["AWS_REGION"] == "eu-west-1" and lines["AWS_ACCESS_KEY"]
    assert lines["AWS_SECRET_KEY"] == "****" and lines["AWS_SESSION_TOKEN"] == "****"
    role = iam.get_role(RoleName="FbInstall1")["Role"]
    assert _policies(iam, "FbInstall1") == [INSTALLATION_POLICY_ARN]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"]["AWS"] == [
        "arn:aws:iam::123456789012:root",
        "arn:aws:iam::123456789012:user/admin",
    ]
    assert iam.list_role_policies(RoleName="FbInstall1")["PolicyNames"] == []

    status, out, err = _run(capsys, "--role-name", "FbInstall1", "--show")  # a second run changes nothing
    assert status == 0 and "(unchanged)" in err
    assert iam.get_role(RoleName="FbInstall1")["Role"] == role
    shown = dict(line.split("=", 1) for line in out.splitlines())
    assert shown["AWS_SECRET_KEY"] != "****" and len(shown["AWS_SESSION_TOKEN"]) > 20


def test_duration_longer_than_the_role_allows(moto_iam, monkeypatch, tmp_path, capsys):
    admin = moto_iam["admin"]
    _as(monkeypatch, admin, tmp_path)
    iam = _iam(admin)
    assert _run(capsys, "--role-name", "FbInstall2")[0] == 0
    status, out, err = _run(capsys, "--role-name", "FbInstall2", "--duration", "7200")
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "allows sessions of at most 3600 s, not --duration 7200" in err and "--update" in err
    assert iam.get_role(RoleName="FbInstall2")["Role"]["MaxSessionDuration"] == 3600
    status, out, err = _run(capsys, "--role-name", "FbInstall2", "--duration", "7200", "--update")
    assert status == 0, err
    assert iam.get_role(RoleName="FbInstall2")["Role"]["MaxSessionDuration"] == 7200
    expires = datetime.fromisoformat(err.rsplit("expire ", 1)[1].strip())
    assert abs((expires - datetime.now(UTC)).total_seconds() - 7200) < 120
    status, _, err = _run(capsys, "--duration", "60")  # below STS's 900 s: refused before any call
    assert status == 1 and "900 to 43200" in err


def test_role_with_other_policies_is_named_and_fixed_only_with_update(moto_iam, monkeypatch, tmp_path, capsys):
    admin = moto_iam["admin"]
    _as(monkeypatch, admin, tmp_path)
    iam = _iam(admin)
    assert _run(capsys, "--role-name", "FbInstall3")[0] == 0
    iam.attach_role_policy(RoleName="FbInstall3", PolicyArn="arn:aws:iam::aws:policy/ReadOnlyAccess")
    iam.put_role_policy(
        RoleName="FbInstall3",
        PolicyName="extra",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    status, out, err = _run(capsys, "--role-name", "FbInstall3")
    assert status == 1 and out == ""
    assert "has other policies: ReadOnlyAccess, extra (inline)" in err and "--update" in err
    assert len(_policies(iam, "FbInstall3")) == 2  # nothing changed
    status, _, err = _run(capsys, "--role-name", "FbInstall3", "--update")
    assert status == 0, err
    assert _policies(iam, "FbInstall3") == [INSTALLATION_POLICY_ARN]
    assert iam.list_role_policies(RoleName="FbInstall3")["PolicyNames"] == []


def test_no_permission_to_create_the_role(moto_iam, monkeypatch, tmp_path, capsys):
    _as(monkeypatch, moto_iam["viewer"], tmp_path)
    status, out, err = _run(capsys, "--role-name", "FbInstallDenied")
    assert status == 1 and out == ""
    assert "may not call iam:CreateRole" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(Exception, match=r"NoSuchEntity|cannot be found"):
        _iam(moto_iam["admin"]).get_role(RoleName="FbInstallDenied")


def test_seed_file_is_private_and_reads_back(moto_iam, monkeypatch, tmp_path, capsys):
    _as(monkeypatch, moto_iam["admin"], tmp_path)
    seed = tmp_path / "out" / "failback-seed.env"
    status, out, err = _run(capsys, "--role-name", "FbInstall4", "--seed-file", str(seed), "--region", "us-west-2")
    assert status == 0, err
    assert (seed.stat().st_mode & 0o777) == 0o600
    values = seedmod.parse_env(seed.read_text(), str(seed)).env()  # the client's own seed reader
    assert values["AWS_REGION"] == "us-west-2"
    assert set(values) == {"AWS_REGION", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN"}
    assert values["AWS_SECRET_KEY"] not in out + err and "****" not in values.values()
