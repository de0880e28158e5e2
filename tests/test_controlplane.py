"""The local DRS control plane over HTTP on loopback, driven by real boto3 clients (make_drs_client)."""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from drs_controlplane.certs import CsrError
from drs_controlplane.errors import SIGNATURE_MISMATCH
from drs_controlplane.policies import managed

from tests import controlplane_fixture
from tests.controlplane_fixture import ControlPlaneHandle, random_credential

# Fixtures (until tests/conftest.py imports them for every module).
drs_controlplane = controlplane_fixture.drs_controlplane
drs_controlplane_factory = controlplane_fixture.drs_controlplane_factory

WEB01 = "i-0a1b2c3d4e5f60001"  # source s-1111111111111111a, MAC 52:54:00:12:34:56, 1 + 2 GiB
DB01 = "i-0a1b2c3d4e5f60002"
APP01 = "i-0a1b2c3d4e5f60003"  # private IP replication, 100 Mbps
WIN01_STOPPED = "i-0a1b2c3d4e5f60004"
GIB = 1024**3
LOCAL_DISKS = [
    {
        "deviceName": "/dev/sda",
        "bytes": 1 * GIB,
        "persistentNames": ["/dev/disk/by-path/pci-0000:00:10.0-scsi-0:0:0:0"],
    },
    {"deviceName": "/dev/sdb", "bytes": 2 * GIB},
    {"deviceName": "/dev/sdc", "bytes": 4 * GIB},
]


def _error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    response = exc.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"], response["Error"]["Message"]


def _csr(common_name: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _associate(cp: ControlPlaneHandle, instance: str = WEB01, macs: tuple[str, ...] = ("52:54:00:12:34:56",)) -> str:
    out = cp.client().associate_failback_client_to_recovery_instance_for_drs(
        recoveryInstanceID=instance,
        failbackClientVersion="0.1.0",
        localDisks=LOCAL_DISKS,
        identification={"hostname": "web01", "macAddresses": list(macs), "bootMode": "BIOS", "secureBoot": False},
    )
    return out["failbackClientID"]


# --- public operations ------------------------------------------------------------------------


def test_describe_recovery_instances_filters_and_pages(drs_controlplane):
    drs = drs_controlplane.client()
    everything = drs.describe_recovery_instances()["items"]
    assert [i["recoveryInstanceID"] for i in everything] == sorted(i["recoveryInstanceID"] for i in everything)
    assert len(everything) == 6
    web01 = next(i for i in everything if i["recoveryInstanceID"] == WEB01)
    assert web01["sourceServerID"] == "s-1111111111111111a"
    assert web01["failback"]["state"] == "FAILBACK_NOT_STARTED"
    assert [d["bytes"] for d in web01["recoveryInstanceProperties"]["disks"]] == [GIB, 2 * GIB]
    assert "203.0.113.21" in web01["recoveryInstanceProperties"]["networkInterfaces"][0]["ips"]

    only = drs.describe_recovery_instances(filters={"recoveryInstanceIDs": [DB01, APP01]})["items"]
    assert {i["recoveryInstanceID"] for i in only} == {DB01, APP01}
    by_source = drs.describe_recovery_instances(filters={"sourceServerIDs": ["s-3333333333333333c"]})["items"]
    assert [i["recoveryInstanceID"] for i in by_source] == [APP01]

    pages = list(drs.get_paginator("describe_recovery_instances").paginate(PaginationConfig={"PageSize": 4}))
    assert [len(p["items"]) for p in pages] == [4, 2]
    assert [i for p in pages for i in p["items"]] == everything
    with pytest.raises(ClientError) as exc:
        drs.describe_recovery_instances(nextToken="bm90LWEtdG9rZW4=")
    assert _error(exc)[:2] == (400, "ValidationException")


@pytest.mark.parametrize(
    ("hardware_id", "expected"),
    [
        ("52:54:00:12:34:56", ["s-1111111111111111a"]),
        ("52-54-00-12-34-57", ["s-1111111111111111a"]),  # second NIC, other separator
        ("52:54:00:12:34:58", []),
        ("564D9F2E-1A2B-3C4D-5E6F-708192A3B4C5", ["s-3333333333333333c"]),  # VMware UUID, any case
        ("i-0fedcba9876543210", ["s-6666666666666666f"]),  # EC2 instance id hint
    ],
)
def test_describe_source_servers_by_hardware_id(drs_controlplane, hardware_id, expected):
    items = drs_controlplane.client().describe_source_servers(filters={"hardwareId": hardware_id})["items"]
    assert [s["sourceServerID"] for s in items] == expected
    for server in items:
        assert server["recoveryInstanceId"].startswith("i-0a1b2c3d4e5f6000")


def test_failback_replication_configuration_round_trip(drs_controlplane):
    drs = drs_controlplane.client()
    config = drs.get_failback_replication_configuration(recoveryInstanceID=APP01)
    assert (config["usePrivateIP"], config["bandwidthThrottling"], config["internetProtocol"]) == (True, 100, "IPV4")
    drs.update_failback_replication_configuration(
        recoveryInstanceID=APP01, usePrivateIP=False, bandwidthThrottling=0, name="fast"
    )
    config = drs.get_failback_replication_configuration(recoveryInstanceID=APP01)
    assert (config["usePrivateIP"], config["bandwidthThrottling"], config["name"]) == (False, 0, "fast")
    with pytest.raises(ClientError) as exc:
        drs.get_failback_replication_configuration(recoveryInstanceID="i-00000000deadbeef")
    assert _error(exc)[:2] == (404, "ResourceNotFoundException")
    assert exc.value.response["resourceId"] == "i-00000000deadbeef"


# --- the whole failback as the client and the console drive it ----------------------------------


def test_failback_lifecycle(drs_controlplane):
    cp = drs_controlplane
    drs = cp.client()
    ids = {"recoveryInstanceID": WEB01}

    out = drs.associate_failback_client_to_recovery_instance_for_drs(
        recoveryInstanceID=WEB01, localDisks=LOCAL_DISKS, identification={"macAddresses": ["52:54:00:12:34:56"]}
    )
    client_id = out["failbackClientID"]
    ids["failbackClientID"] = client_id
    assert out["failbackToOriginalServer"] is True
    assert out["replicationEndpoint"] == {
        "privateIP": "10.0.1.21",
        "publicIP": "203.0.113.21",
        "port": 1500,
        "usePrivateIP": False,
        "internetProtocol": "IPV4",
    }
    ri = cp.recovery_instance(WEB01)
    assert ri["failback"]["failbackClientID"] == client_id
    assert ri["failback"]["state"] == "FAILBACK_IN_PROGRESS"
    assert ri["dataReplicationInfo"]["dataReplicationState"] == "INITIATING"

    suggested = drs.get_suggested_failback_client_device_mapping_for_drs(**ids, localDisks=LOCAL_DISKS)
    mapping = [
        {"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "/dev/sda"},
        {"recoveryInstanceDeviceName": "/dev/nvme1n1", "failbackClientDeviceName": "/dev/sdb"},
    ]
    assert suggested["deviceMapping"] == mapping
    stored = drs.update_failback_client_device_mapping_for_drs(**ids, deviceMapping=mapping)
    assert [d["totalStorageBytes"] for d in stored["replicatedDisks"]] == [GIB, 2 * GIB]

    issued = drs.issue_agent_certificate_for_drs(**ids, certificateSigningRequest=_csr(client_id))
    ca = x509.load_pem_x509_certificate(issued["caCertificate"].encode())
    cert = x509.load_pem_x509_certificate(issued["certificate"].encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == client_id
    assert issued["agentCommonName"] == f"agent.{WEB01}.drs.local"

    agent = cp.issue_agent_certificate(WEB01, _csr(issued["agentCommonName"]))
    agent_cert = x509.load_pem_x509_certificate(agent.certificate_pem.encode())
    agent_cert.verify_directly_issued_by(ca)  # one CA: each side can verify the other
    sans = agent_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.0.1.21", "203.0.113.21", "127.0.0.1"}
    with pytest.raises(CsrError, match="subject CN must be"):
        cp.issue_agent_certificate(WEB01, _csr("agent.i-00000000deadbeef.drs.local"))

    steps = [
        {"name": "LINK_FAILBACK_CLIENT_WITH_RECOVERY_INSTANCE", "status": "SUCCEEDED"},
        {"name": "COMPLETE_VOLUME_MAPPING", "status": "SUCCEEDED"},
        {"name": "ESTABLISH_RECOVERY_INSTANCE_COMMUNICATION", "status": "IN_PROGRESS"},
    ]
    state = drs.update_agent_replication_info_for_drs(**ids, initiationSteps=steps)["failbackState"]
    assert state == "FAILBACK_IN_PROGRESS"
    shown = {
        s["name"]: s["status"]
        for s in cp.recovery_instance(WEB01)["dataReplicationInfo"]["dataReplicationInitiation"]["steps"]
    }
    assert shown["COMPLETE_VOLUME_MAPPING"] == "SUCCEEDED"
    assert shown["PAIR_AGENT_WITH_REPLICATION_SOFTWARE"] == "NOT_STARTED"

    assert drs.update_failback_client_last_seen_for_drs(**ids)["lastSeenDateTime"].endswith("Z")
    drs.notify_agent_connected_for_drs(**ids, agentVersion="1.0")
    drs.notify_agent_replication_progress_for_drs(
        **ids,
        replicatedDisks=[{"deviceName": "/dev/nvme0n1", "replicatedStorageBytes": GIB // 2}],
        lagSeconds=30,
        throughputBytesPerSecond=10_000_000,
    )
    ri = cp.recovery_instance(WEB01)
    assert ri["dataReplicationInfo"]["dataReplicationState"] == "INITIAL_SYNC"
    assert ri["dataReplicationInfo"]["replicatedDisks"][0]["replicatedStorageBytes"] == GIB // 2
    assert "firstByteDateTime" in ri["failback"]
    assert cp.internal(WEB01)["lagSeconds"] == 30

    drs.notify_agent_disconnected_for_drs(**ids, error="UNSTABLE_NETWORK", message="connection reset")
    ri = cp.recovery_instance(WEB01)
    assert ri["dataReplicationInfo"]["dataReplicationState"] == "DISCONNECTED"
    assert ri["failback"]["state"] == "FAILBACK_ERROR"
    drs.notify_agent_connected_for_drs(**ids)
    drs.update_agent_replication_info_for_drs(**ids, dataReplicationError={})

    assert drs.get_failback_command_for_drs(**ids)["command"] == "CONTINUE"
    with pytest.raises(ClientError) as exc:
        cp.press_failback(WEB01)
    assert _error(exc)[:2] == (409, "ConflictException")

    assert drs.notify_consistency_attained_for_drs(**ids)["failbackState"] == "FAILBACK_READY_FOR_LAUNCH"
    assert drs.get_failback_launch_requested_for_drs(**ids)["launchRequested"] is False

    job = cp.press_failback(WEB01)  # the console's Failback button
    assert (job["type"], job["initiatedBy"], job["status"]) == ("LAUNCH", "FAILBACK", "STARTED")
    command = drs.get_failback_command_for_drs(**ids)
    assert (command["command"], command["failbackJobID"]) == ("FINAL_SYNC", job["jobID"])
    assert drs.get_failback_launch_requested_for_drs(**ids)["launchRequested"] is True

    state = drs.notify_consistency_attained_for_drs(**ids, finalSync=True)["failbackState"]
    assert state == "FAILBACK_COMPLETED"
    assert drs.get_failback_command_for_drs(**ids)["command"] == "COMPLETE"
    jobs = drs.describe_jobs(filters={"jobIDs": [job["jobID"]]})["items"]
    assert [(j["status"], j["participatingServers"][0]["launchStatus"]) for j in jobs] == [("COMPLETED", "LAUNCHED")]

    drs.send_client_logs_for_drs(
        **ids, logEvents=[{"timestamp": "2026-11-25T20:00:00.000Z", "level": "INFO", "message": "mapping done"}]
    )
    drs.send_client_metrics_for_drs(
        failbackClientID=client_id, metrics=[{"name": "replication.bytes", "value": 1.5e9, "unit": "Bytes"}]
    )
    assert cp.client_logs()[0]["message"] == "mapping done"
    assert cp.client_metrics()[0]["value"] == 1.5e9


def test_reassociation_and_stop_tell_the_old_client_to_stop(drs_controlplane):
    drs = drs_controlplane.client()
    first = _associate(drs_controlplane)
    second = _associate(drs_controlplane)
    assert first != second
    command = drs.get_failback_command_for_drs(failbackClientID=first, recoveryInstanceID=WEB01)
    assert command["command"] == "STOP"
    with pytest.raises(ClientError) as exc:
        drs.update_failback_client_last_seen_for_drs(failbackClientID=first, recoveryInstanceID=WEB01)
    assert _error(exc)[:2] == (409, "ConflictException")
    drs.stop_failback(recoveryInstanceID=WEB01)
    assert drs.get_failback_command_for_drs(failbackClientID=second, recoveryInstanceID=WEB01)["command"] == "STOP"
    assert drs_controlplane.recovery_instance(WEB01)["failback"]["state"] == "FAILBACK_NOT_STARTED"


def test_not_original_server_gets_no_suggestion(drs_controlplane):
    drs = drs_controlplane.client()
    client_id = _associate(drs_controlplane, macs=("52:54:00:99:99:99",))
    out = drs.get_suggested_failback_client_device_mapping_for_drs(
        failbackClientID=client_id, recoveryInstanceID=WEB01, localDisks=LOCAL_DISKS
    )
    assert out["failbackToOriginalServer"] is False
    assert out["deviceMapping"] == []


@pytest.mark.parametrize(
    ("mapping", "complaint"),
    [
        ([("/dev/nvme0n1", "/dev/sda")], "/dev/nvme1n1 has no target"),
        ([("/dev/nvme0n1", "/dev/sda"), ("/dev/nvme1n1", "/dev/sda")], "/dev/sda is already the target"),
        (
            [("/dev/nvme0n1", "/dev/sda"), ("/dev/nvme9n1", "/dev/sdb"), ("/dev/nvme1n1", "/dev/sdc")],
            "/dev/nvme9n1 is not a volume",
        ),
        ([("/dev/nvme0n1", "/dev/sdz"), ("/dev/nvme1n1", "/dev/sdb")], "/dev/sdz is not a disk the failback client"),
        ([("/dev/nvme0n1", "/dev/sda"), ("/dev/nvme1n1", "/dev/sda")], "already the target"),
        ([("/dev/nvme0n1", "EXCLUDE"), ("/dev/nvme1n1", "EXCLUDE")], "every volume is EXCLUDEd"),
        ([("/dev/nvme0n1", "/dev/sdb"), ("/dev/nvme1n1", "/dev/sda")], "/dev/sda .* is smaller than /dev/nvme1n1"),
    ],
)
def test_device_mapping_is_checked(drs_controlplane, mapping, complaint):
    drs = drs_controlplane.client()
    client_id = _associate(drs_controlplane)
    with pytest.raises(ClientError) as exc:
        drs.update_failback_client_device_mapping_for_drs(
            failbackClientID=client_id,
            recoveryInstanceID=WEB01,
            deviceMapping=[{"recoveryInstanceDeviceName": r, "failbackClientDeviceName": f} for r, f in mapping],
        )
    status, code, message = _error(exc)
    assert (status, code) == (400, "ValidationException")
    assert exc.value.response["fieldList"]
    assert re.search(complaint, message), message


def test_excluding_a_volume_and_persistent_names_are_accepted(drs_controlplane):
    drs = drs_controlplane.client()
    client_id = _associate(drs_controlplane)
    by_path = LOCAL_DISKS[0]["persistentNames"][0]
    out = drs.update_failback_client_device_mapping_for_drs(
        failbackClientID=client_id,
        recoveryInstanceID=WEB01,
        deviceMapping=[
            {"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": by_path},
            {"recoveryInstanceDeviceName": "/dev/nvme1n1", "failbackClientDeviceName": "EXCLUDE"},
        ],
    )
    assert [d["deviceName"] for d in out["replicatedDisks"]] == ["/dev/nvme0n1"]


def test_certificate_request_is_checked(drs_controlplane):
    drs = drs_controlplane.client()
    client_id = _associate(drs_controlplane)
    ids = {"failbackClientID": client_id, "recoveryInstanceID": WEB01}
    with pytest.raises(ClientError) as exc:
        drs.issue_agent_certificate_for_drs(**ids, certificateSigningRequest=_csr("someone-else"))
    assert _error(exc)[1] == "ValidationException"
    assert "subject CN must be" in _error(exc)[2]
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ClientError) as exc:
        drs.issue_agent_certificate_for_drs(**ids, certificateSigningRequest=_csr(client_id, weak))
    assert "1024 bits" in _error(exc)[2]
    with pytest.raises(ClientError) as exc:
        drs.issue_agent_certificate_for_drs(**ids, certificateSigningRequest="-----BEGIN CERTIFICATE REQUEST-----\nxx")
    assert "not a PEM certificate request" in _error(exc)[2]


def test_conflicts_and_missing_resources(drs_controlplane):
    drs = drs_controlplane.client()
    with pytest.raises(ClientError) as exc:
        _associate(drs_controlplane, instance=WIN01_STOPPED)
    assert _error(exc)[:2] == (409, "ConflictException")
    assert "not running" in _error(exc)[2]
    with pytest.raises(ClientError) as exc:
        _associate(drs_controlplane, instance="i-00000000deadbeef")
    assert _error(exc)[:2] == (404, "ResourceNotFoundException")
    with pytest.raises(ClientError) as exc:
        drs.start_failback_launch(recoveryInstanceIDs=["i-00000000deadbeef"])
    assert _error(exc)[:2] == (400, "ValidationException")


# --- requests the model refuses -----------------------------------------------------------------


def test_bad_id_pattern_is_a_validation_exception(drs_controlplane):
    drs = drs_controlplane.client()
    with pytest.raises(ClientError) as exc:  # right length for botocore, wrong pattern for the service
        drs.stop_failback(recoveryInstanceID="x-0123456789abcdef0")
    status, code, message = _error(exc)
    assert (status, code) == (400, "ValidationException")
    assert message.startswith("1 validation error detected: Value 'x-0123456789abcdef0' at 'recoveryInstanceID'")
    assert exc.value.response["fieldList"][0]["name"] == "recoveryInstanceID"
    assert exc.value.response["reason"] == "fieldValidationFailed"


def test_enum_and_pattern_of_our_shapes_are_enforced(drs_controlplane):
    drs = drs_controlplane.client()
    client_id = _associate(drs_controlplane)
    with pytest.raises(ClientError) as exc:
        drs.update_failback_client_device_mapping_for_drs(
            failbackClientID=client_id,
            recoveryInstanceID=WEB01,
            deviceMapping=[{"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "sda"}],
        )
    assert "deviceMapping.1.failbackClientDeviceName" in _error(exc)[2]
    with pytest.raises(ClientError) as exc:
        drs.update_agent_replication_info_for_drs(
            failbackClientID=client_id, recoveryInstanceID=WEB01, dataReplicationState="SYNCING"
        )
    assert "enum value set" in _error(exc)[2]


def _raw_post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_uninitialized_account(drs_controlplane):
    drs_controlplane.set_account_initialized(False)
    with pytest.raises(ClientError) as exc:
        drs_controlplane.client().describe_recovery_instances()
    assert _error(exc) == (400, "UninitializedAccountException", "Account not initialized")
    drs_controlplane.set_account_initialized(True)
    assert drs_controlplane.client().describe_recovery_instances()["items"]


def test_unimplemented_public_operation_says_so(drs_controlplane):
    with pytest.raises(ClientError) as exc:
        drs_controlplane.client(max_attempts=1).describe_launch_configuration_templates()
    status, code, message = _error(exc)
    assert (status, code) == (501, "NotImplemented")
    assert message == "DescribeLaunchConfigurationTemplates is not implemented by the local DRS control plane"


def test_unsigned_request_is_refused(drs_controlplane):
    status, headers, body = _raw_post(
        drs_controlplane.url, "/DescribeRecoveryInstances", b"{}", {"Content-Type": "application/json"}
    )
    assert status == 403
    assert headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
    assert b"Missing Authentication Token" in body


# --- authentication -----------------------------------------------------------------------------


def test_wrong_secret_gets_the_aws_signature_error(drs_controlplane):
    cp = drs_controlplane
    bad = cp.client(secret_key=cp.secret_key[:-1] + ("x" if cp.secret_key[-1] != "x" else "y"))
    with pytest.raises(ClientError) as exc:
        bad.describe_recovery_instances()
    assert _error(exc) == (403, "InvalidSignatureException", SIGNATURE_MISMATCH)
    assert exc.value.response["Error"]["Message"].startswith(
        "The request signature we calculated does not match the signature you provided."
    )
    assert cp.secret_key not in str(exc.value)


def test_unknown_key_and_bad_tokens(drs_controlplane_factory):
    temporary = random_credential(session_token="FwoGZXIvYXdzEXAMPLETOKEN")
    expired = random_credential(
        session_token="FwoGZXIvYXdzEXPIRED", expires_at=datetime.now(UTC) - timedelta(minutes=1)
    )
    cp = drs_controlplane_factory(extra_credentials=(temporary, expired))
    with pytest.raises(ClientError) as exc:
        cp.client(access_key="AKIAUNKNOWN000000000").describe_recovery_instances()
    assert _error(exc) == (403, "UnrecognizedClientException", "The security token included in the request is invalid.")
    assert cp.client(temporary).describe_recovery_instances()["items"]
    with pytest.raises(ClientError) as exc:
        cp.client(temporary, session_token="wrong-token").describe_recovery_instances()
    assert _error(exc)[1] == "UnrecognizedClientException"
    with pytest.raises(ClientError) as exc:
        cp.client(temporary, session_token=None).describe_recovery_instances()
    assert _error(exc)[1] == "UnrecognizedClientException"
    with pytest.raises(ClientError) as exc:
        cp.client(expired).describe_recovery_instances()
    assert _error(exc) == (403, "ExpiredTokenException", "The security token included in the request is expired")


def test_wrong_region_and_clock_skew(drs_controlplane):
    cp = drs_controlplane
    with pytest.raises(ClientError) as exc:
        cp.client(region="eu-west-1").describe_recovery_instances()
    assert _error(exc)[:2] == (403, "InvalidSignatureException")
    assert "scoped to a valid region, not 'eu-west-1'" in _error(exc)[2]

    cp.set_clock_offset(3600)  # the server is an hour ahead: like a client whose hardware clock is local time
    with pytest.raises(ClientError) as exc:
        cp.client(max_attempts=1).describe_recovery_instances()
    assert _error(exc)[:2] == (403, "InvalidSignatureException")
    assert _error(exc)[2].startswith("Signature expired:")
    date = parsedate_to_datetime(exc.value.response["ResponseMetadata"]["HTTPHeaders"]["date"])
    assert abs((date - datetime.now(UTC)).total_seconds() - 3600) < 60
    cp.set_clock_offset(120)  # within AWS's 5 minutes
    assert cp.client().describe_recovery_instances()["items"]


def test_restricted_credential_gets_access_denied(drs_controlplane_factory):
    installer = random_credential(policy=managed("installation"))
    cp = drs_controlplane_factory(extra_credentials=(installer,))
    assert cp.client(installer).describe_recovery_instances()["items"]
    with pytest.raises(ClientError) as exc:
        cp.client(installer).start_failback_launch(recoveryInstanceIDs=[WEB01])
    status, code, message = _error(exc)
    assert (status, code) == (403, "AccessDeniedException")
    assert "not authorized to perform: drs:StartFailbackLaunch" in message


# --- throttling and retries ---------------------------------------------------------------------


def test_throttling_is_retried_by_botocore(drs_controlplane):
    cp = drs_controlplane
    cp.throttle_next(2)
    response = cp.client().describe_recovery_instances()
    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    assert [r.status for r in cp.plane.requests[-3:]] == [429, 429, 200]
    assert {r.error_code for r in cp.plane.requests[-3:-1]} == {"ThrottlingException"}


def test_throttling_surfaces_when_retries_run_out(drs_controlplane):
    cp = drs_controlplane
    cp.throttle_next(5, retry_after=7)
    with pytest.raises(ClientError) as exc:
        cp.client(max_attempts=1).get_failback_replication_configuration(recoveryInstanceID=WEB01)
    status, code, _ = _error(exc)
    assert (status, code) == (429, "ThrottlingException")
    assert exc.value.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "7"


# --- persistence --------------------------------------------------------------------------------


def test_state_survives_a_restart(drs_controlplane):
    cp = drs_controlplane
    client_id = _associate(cp)
    cp.client().update_failback_replication_configuration(recoveryInstanceID=WEB01, bandwidthThrottling=42)
    cp.restart()  # same state file, a new process-level listener
    drs = cp.client()
    ri = drs.describe_recovery_instances(filters={"recoveryInstanceIDs": [WEB01]})["items"][0]
    assert ri["failback"]["failbackClientID"] == client_id
    assert drs.get_failback_replication_configuration(recoveryInstanceID=WEB01)["bandwidthThrottling"] == 42
    assert (
        drs.get_failback_command_for_drs(failbackClientID=client_id, recoveryInstanceID=WEB01)["command"] == "CONTINUE"
    )


# --- the issued certificates work for mutual TLS --------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_issued_certificates_make_a_mutual_tls_connection(drs_controlplane, tmp_path):
    cp = drs_controlplane
    client_id = _associate(cp)
    client_key, agent_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issued = cp.client().issue_agent_certificate_for_drs(
        failbackClientID=client_id, recoveryInstanceID=WEB01, certificateSigningRequest=_csr(client_id, client_key)
    )
    agent = cp.issue_agent_certificate(WEB01, _csr(issued["agentCommonName"], agent_key))
    files = {}
    for name, data in {
        "ca.pem": issued["caCertificate"].encode(),
        "client.pem": issued["certificate"].encode(),
        "client.key": _key_pem(client_key),
        "agent.pem": agent.certificate_pem.encode(),
        "agent.key": _key_pem(agent_key),
    }.items():
        files[name] = tmp_path / name
        files[name].write_bytes(data)
        files[name].chmod(0o600)

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files["agent.pem"], files["agent.key"])
    server_ctx.load_verify_locations(files["ca.pem"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["peer"] = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
            tls.sendall(tls.recv(5))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(files["ca.pem"]))
    client_ctx.load_cert_chain(files["client.pem"], files["client.key"])
    with (
        socket.create_connection(listener.getsockname(), timeout=10) as raw,
        client_ctx.wrap_socket(raw, server_hostname=issued["agentCommonName"]) as tls,
    ):
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
    thread.join(timeout=10)
    listener.close()
    assert seen["peer"] == client_id
