"""The credentials DRS issues the installed failback client (failback_client.drs_credentials and the control
plane's GetFailbackClientCredentialsForDrs): proof of identity with the certified key, scope, refresh through
botocore's RefreshableCredentials, backoff and recovery after a cut-off longer than the credentials live."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from drs_controlplane import errors
from drs_controlplane.policies import managed
from failback_client import drs_credentials
from failback_client.api import DrsApi
from failback_client.drs_credentials import DrsIssuedCredentials, proof_text, sign, switch_to_drs_credentials
from failback_client.errors import ClientError as FailbackError
from failback_client.pairing import create_key_and_csr, install_certificates, tls_paths
from failback_client.replication_api import ReplicationApi
from failback_client.settings import Settings

from tests import controlplane_fixture
from tests.controlplane_fixture import random_credential
from tests.test_controlplane import LOCAL_DISKS, WEB01

drs_controlplane = controlplane_fixture.drs_controlplane
drs_controlplane_factory = controlplane_fixture.drs_controlplane_factory
DB01 = "i-0a1b2c3d4e5f60002"
OPERATION = "GetFailbackClientCredentialsForDrs"


class Notices:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def ok(self, text: str) -> None:
        self.lines.append(("ok", text))

    def warn(self, text: str) -> None:
        self.lines.append(("warn", text))


def _installed(cp, installer, tmp_path: Path) -> tuple[str, Path]:  # type: ignore[no-untyped-def]
    """Associate and pair with the installation credentials, as the workflow does; returns (client ID, key)."""
    drs = cp.client(installer)
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
    tls = tmp_path / "tls"
    csr = create_key_and_csr(tls, client_id)
    issued = drs.issue_agent_certificate_for_drs(
        failbackClientID=client_id, recoveryInstanceID=WEB01, certificateSigningRequest=csr
    )
    install_certificates(tls, client_id, issued["certificate"], issued["caCertificate"])
    return client_id, tls_paths(tls).key


def _installer_settings(cp, installer) -> Settings:  # type: ignore[no-untyped-def]
    """The client's settings as the admin typed them in: the installation credentials."""
    return Settings(
        region=cp.region,
        endpoint=cp.url,
        access_key_id=installer.access_key,
        secret_access_key=installer.secret_key,
        session_token=installer.session_token,
    )


def _source(cp, client_id: str, key: Path, notices: Notices | None = None) -> DrsIssuedCredentials:  # type: ignore[no-untyped-def]
    return DrsIssuedCredentials(
        region=cp.region,
        endpoint_url=cp.url,
        client_id=client_id,
        recovery_instance_id=WEB01,
        key=key,
        notices=notices or Notices(),
    )


@pytest.fixture
def installer():  # type: ignore[no-untyped-def]
    return random_credential(
        policy=managed("installation"),
        session_token="installation-token",
        principal="arn:aws:sts::123456789012:assumed-role/FailbackInstaller/admin",
    )


def test_issued_credentials_are_the_failback_policy_scoped_to_the_instance(
    drs_controlplane_factory, installer, tmp_path
):
    cp = drs_controlplane_factory(extra_credentials=(installer,))
    client_id, key = _installed(cp, installer, tmp_path)
    meta = _source(cp, client_id, key).fetch()
    assert meta["access_key"].startswith("ASIA") and meta["token"]
    issued = cp.plane.credentials[meta["access_key"]]
    assert issued.policy == managed("failback") and issued.scope_instance == WEB01
    assert issued.principal.endswith(f":assumed-role/AWSElasticDisasterRecoveryFailbackRole/{client_id}")
    assert issued.expires_at is not None and issued.expires_at - datetime.now(UTC) > timedelta(minutes=59)
    drs = cp.client(issued, max_attempts=1)
    ids = {"failbackClientID": client_id, "recoveryInstanceID": WEB01}
    assert drs.get_failback_command_for_drs(**ids)["command"] == "CONTINUE"
    drs.update_failback_client_last_seen_for_drs(**ids)
    with pytest.raises(ClientError) as exc:
        drs.get_failback_command_for_drs(failbackClientID=client_id, recoveryInstanceID=DB01)
    assert exc.value.response["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(ClientError) as exc:  # not a console user
        drs.start_failback_launch(recoveryInstanceIDs=[WEB01])
    assert exc.value.response["Error"]["Code"] == "AccessDeniedException"
    # the secret never shows in what the plane keeps for tests, nor in the credential's repr
    assert meta["secret_key"] not in repr(issued) + repr(cp.plane.requests)


def _call(cp, **params):  # type: ignore[no-untyped-def]
    from failback_client.drs_model import make_drs_client

    return make_drs_client(
        region=cp.region, endpoint_url=cp.url, unsigned=True, max_attempts=1
    ).get_failback_client_credentials_for_drs(**params)


def test_the_proof_of_identity_is_checked(drs_controlplane_factory, installer, tmp_path):
    cp = drs_controlplane_factory(extra_credentials=(installer,))
    client_id, key = _installed(cp, installer, tmp_path)
    signed_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    nonce = "n" * 24
    good = sign(key, proof_text(client_id, WEB01, signed_at, nonce))
    params = {"failbackClientID": client_id, "recoveryInstanceID": WEB01, "signedAt": signed_at, "nonce": nonce}
    other_key = create_key_and_csr(tmp_path / "other", client_id) and tls_paths(tmp_path / "other").key
    cases = {
        "another key": {**params, "signature": sign(other_key, proof_text(client_id, WEB01, signed_at, nonce))},
        "another statement": {**params, "signature": sign(key, proof_text(client_id, DB01, signed_at, nonce))},
        "another instance": {**params, "recoveryInstanceID": DB01, "signature": good},
    }
    for what, request in cases.items():
        with pytest.raises(ClientError) as exc:
            _call(cp, **request)
        assert exc.value.response["Error"]["Code"] in ("AccessDeniedException", "ResourceNotFoundException"), what
    assert _call(cp, **params, signature=good)["accessKeyId"].startswith("ASIA")
    with pytest.raises(ClientError) as exc:  # replayed
        _call(cp, **params, signature=good)
    assert "already used" in exc.value.response["Error"]["Message"]
    old = (datetime.now(UTC) - timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(ClientError) as exc:  # stale: a clock far off, or a recorded request
        _call(
            cp,
            **{**params, "signedAt": old, "nonce": "m" * 24},
            signature=sign(key, proof_text(client_id, WEB01, old, "m" * 24)),
        )
    assert exc.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_refreshes_before_expiry_through_botocore(drs_controlplane_factory, installer, tmp_path):
    cp = drs_controlplane_factory(extra_credentials=(installer,), client_credentials_ttl=6)
    client_id, key = _installed(cp, installer, tmp_path)
    source = _source(cp, client_id, key)
    client = source.client()
    ids = {"failbackClientID": client_id, "recoveryInstanceID": WEB01}
    keys = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        client.get_failback_command_for_drs(**ids)
        keys.add(cp.plane.requests[-1].access_key)
        time.sleep(0.5)
    assert source.refreshes >= 2, source.issued  # 6 s credentials over 10 s of calls: refreshed at half life
    assert len(keys) >= 3
    calls = sum(1 for r in cp.plane.requests if r.operation == "GetFailbackCommandForDrs")
    assert source.issued <= 6 < calls, (source.issued, calls)  # refreshed near half life, not before every call
    assert all(r.status == 200 for r in cp.plane.requests if r.operation == "GetFailbackCommandForDrs")
    assert cp.plane.counts()["credential refreshes"] == source.refreshes


def test_a_client_cut_off_longer_than_its_credentials_live_recovers_without_the_admin(
    drs_controlplane_factory, installer, tmp_path, monkeypatch
):
    monkeypatch.setattr(drs_credentials, "BACKOFF_FIRST_S", 0.3)
    monkeypatch.setattr(drs_credentials, "BACKOFF_MAX_S", 1.0)
    cp = drs_controlplane_factory(extra_credentials=(installer,), client_credentials_ttl=4)
    client_id, key = _installed(cp, installer, tmp_path)
    settings = _installer_settings(cp, installer)
    api = DrsApi(settings)
    rapi = ReplicationApi(api, client_id, WEB01)
    notices = Notices()
    issued = switch_to_drs_credentials(api, notices, client_id, WEB01, key)
    assert rapi.client is api.client and api.installed
    cp.plane.set_credential_expiry(installer.access_key, datetime.now(UTC))  # the admin's credentials run out
    assert rapi.command()["command"] == "CONTINUE"

    handler = cp.plane.service.handlers[OPERATION]

    def cut_off(_params):  # type: ignore[no-untyped-def]
        raise errors.access_denied("the WAN is down")  # no retries by botocore: fails at once

    cp.plane.service.handlers[OPERATION] = cut_off
    failures = 0
    deadline = time.monotonic() + 7  # longer than the 4 s the credentials live
    while time.monotonic() < deadline:
        try:
            rapi.command()
        except FailbackError as e:
            failures += 1
            assert "retrieving credentials" in str(e).lower() or "credentials" in str(e)
        time.sleep(0.2)
    assert failures, "calls must fail once the credentials expired while DRS was unreachable"
    assert issued.failures >= 2
    assert any(kind == "warn" and "Could not refresh" in text for kind, text in notices.lines)

    failed_refreshes = issued.failures
    cp.plane.service.handlers[OPERATION] = handler  # back online
    deadline = time.monotonic() + 5
    while True:
        try:
            assert rapi.command()["command"] == "CONTINUE"
            break
        except FailbackError:
            assert time.monotonic() < deadline, "no new credentials after the link came back"
            time.sleep(0.2)
    assert any(kind == "ok" and "refreshed after" in text for kind, text in notices.lines)
    # the admin's credentials were never used again, and nothing was denied
    assert not [r for r in cp.plane.requests if r.access_key == installer.access_key and r.status != 200]
    assert issued.failures == 0
    assert cp.plane.counts()["access denied"] == failed_refreshes  # only the planted cut-off answers


def test_a_post_install_call_on_the_installation_credentials_is_denied(drs_controlplane_factory, installer, tmp_path):
    """Mutant of the switch: the installed client still on the admin's credentials gets AccessDenied."""
    cp = drs_controlplane_factory(extra_credentials=(installer,))
    client_id, _key = _installed(cp, installer, tmp_path)
    settings = _installer_settings(cp, installer)
    api = DrsApi(settings)
    api.installed = True  # as after the switch, but the client kept the installation credentials
    rapi = ReplicationApi(api, client_id, WEB01)
    with pytest.raises(FailbackError) as exc:
        rapi.command()
    assert "AccessDeniedException" in str(exc.value)
    assert cp.plane.requests[-1].error_code == "AccessDeniedException"


def test_access_denied_after_the_switch_blames_the_issued_credentials(drs_controlplane_factory, installer, tmp_path):
    """After the switch a refusal is about what DRS issued: no advice about the installation policy or STS."""
    cp = drs_controlplane_factory(extra_credentials=(installer,))
    client_id, key = _installed(cp, installer, tmp_path)
    settings = _installer_settings(cp, installer)
    api = DrsApi(settings)
    switch_to_drs_credentials(api, Notices(), client_id, WEB01, key)
    rapi = ReplicationApi(api, client_id, DB01)  # another instance: outside what DRS issued this client
    with pytest.raises(FailbackError) as exc:
        rapi.command()
    text = str(exc.value)
    assert cp.plane.requests[-1].error_code == "AccessDeniedException"
    assert "credentials it issued this failback client" in text and "AccessDeniedException" in text, text
    assert "InstallationPolicy" not in text and "STS" not in text, text
