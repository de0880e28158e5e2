"""The client workflow with real boto3 against the local DRS control plane over HTTP on loopback.

Guide steps covered here: 6-7 (credentials, region, endpoint from launcher variables; checked at once),
8 (automatic choice by MAC), 9 (--recovery-instance-id, wrong id), 10 (automatic mapping from DRS's
suggestion), 11 (--device-mapping in by-path, refusals), 12 (TCP to the recovery instance, DRS and S3;
initiation steps reported), and the clean stop before step 13.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from failback_client.workflow import STOP_MESSAGE

from tests.controlplane_fixture import ControlPlaneHandle, random_credential
from tests.test_client_helpers import (
    BIG_RI,
    OTHER_RI,
    SEED,
    UEFI_ROOT,
    agent_listener,
    client_env,
    closed_port,
    run_in_process,
)


@pytest.fixture
def cp(drs_controlplane_factory) -> ControlPlaneHandle:
    return drs_controlplane_factory(seed=SEED)


def steps_of(cp: ControlPlaneHandle, instance_id: str) -> dict[str, str]:
    doc = cp.recovery_instance(instance_id)
    return {s["name"]: s["status"] for s in doc["dataReplicationInfo"]["dataReplicationInitiation"]["steps"]}


def test_original_server_is_identified_and_mapped_automatically(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    with agent_listener() as port:
        run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, agent_port=port), "--no-prompt")
    assert run.status == 0, run.all
    assert run.out.splitlines()[0].startswith("failback-client ") and "boot mode: BIOS" in run.out
    assert "MAC address 52:54:00:12:34:56 belongs to source server s-aaaaaaaaaaaaaaaaa (orig01)" in run.out
    assert "Volumes mapped automatically" in run.out
    assert STOP_MESSAGE in run.out
    internal = cp.internal("i-0000000000000a001")
    assert internal["deviceMapping"] == [
        {"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "/dev/sda"},
        {"recoveryInstanceDeviceName": "/dev/nvme1n1", "failbackClientDeviceName": "/dev/sdb"},
    ]
    # the boot medium (sdc, labelled DRSFAILBACK) is not offered to DRS as a local disk
    assert [d["deviceName"] for d in internal["localDisks"]] == ["/dev/sda", "/dev/sdb"]
    assert internal["identification"]["macAddresses"] == ["52:54:00:12:34:56", "52:54:00:ab:cd:ef"]
    steps = steps_of(cp, "i-0000000000000a001")
    assert steps["LINK_FAILBACK_CLIENT_WITH_RECOVERY_INSTANCE"] == "SUCCEEDED"
    assert steps["COMPLETE_VOLUME_MAPPING"] == "SUCCEEDED"
    assert steps["ESTABLISH_RECOVERY_INSTANCE_COMMUNICATION"] == "SUCCEEDED"
    assert steps["DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT"] == "NOT_STARTED"


def test_given_instance_and_by_path_mapping(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    env = client_env(
        cp, root=UEFI_ROOT, RECOVERY_INSTANCE_ID=OTHER_RI, DEVICE_MAPPING="/dev/nvme0n1=pci-0000:00:1f.0-nvme-1"
    )
    with agent_listener() as port:
        env["FAILBACK_AGENT_PORT"] = str(port)
        run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt", "--dm-value-format", "by-path")
    assert run.status == 0, run.all
    assert "secure boot: on" in run.out and "Secure Boot is on" in run.out and "4 GiB" not in run.out
    assert cp.internal(OTHER_RI)["deviceMapping"] == [
        {"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "/dev/nvme1n1"}
    ]


def test_arguments_win_over_variables(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    env = client_env(cp, root=UEFI_ROOT, RECOVERY_INSTANCE_ID="i-00000000000ffff01", AWS_REGION="eu-west-1")
    with agent_listener() as port:
        env["FAILBACK_AGENT_PORT"] = str(port)
        run = run_in_process(
            monkeypatch,
            capsys,
            tmp_path,
            env,
            "--no-prompt",
            "--region",
            cp.region,
            "--recovery-instance-id",
            OTHER_RI,
            "--device-mapping",
            "/dev/nvme0n1=/dev/nvme0n1",
        )
    assert run.status == 0, run.all


def test_unknown_recovery_instance_id(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    env = client_env(cp, root=UEFI_ROOT, RECOVERY_INSTANCE_ID="i-0000000000000ffff")
    run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 4
    assert "recovery instance i-0000000000000ffff was not found in us-east-1" in run.out
    assert "Traceback" not in run.all


def test_recovery_instance_too_big(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    env = client_env(cp, root=UEFI_ROOT, RECOVERY_INSTANCE_ID=BIG_RI)
    run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 4
    assert "volume /dev/nvme0n1 (200 GiB) is too large for disk /dev/nvme1n1 (100 GiB)" in run.out


def test_no_prompt_names_argument_and_variable(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, root=UEFI_ROOT), "--no-prompt")
    assert run.status == 2
    assert "--recovery-instance-id" in run.out and "RECOVERY_INSTANCE_ID" in run.out
    env = client_env(cp, with_creds=False, AWS_REGION="us-east-1", NO_PROMPT="1")
    run = run_in_process(monkeypatch, capsys, tmp_path, env)
    assert run.status == 2
    assert "--aws-access-key-id" in run.out and "AWS_ACCESS_KEY" in run.out


def test_bad_device_mapping_is_refused_naming_the_token(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    env = client_env(cp, root=UEFI_ROOT, RECOVERY_INSTANCE_ID=OTHER_RI, DEVICE_MAPPING="/dev/nvme0n1=/dev/sdq")
    run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 5
    assert "'/dev/sdq'" in run.out
    assert steps_of(cp, OTHER_RI)["COMPLETE_VOLUME_MAPPING"] == "FAILED"


@pytest.mark.parametrize("case", ["secret", "key", "token", "expired"])
def test_bad_credentials_give_one_sentence(
    drs_controlplane_factory,
    monkeypatch,
    capsys,
    tmp_path: Path,
    case: str,
) -> None:
    if case in ("token", "expired"):
        expires = datetime.now(UTC) + (timedelta(hours=-1) if case == "expired" else timedelta(hours=1))
        cred = random_credential(session_token="FwoGZXIvYXdzE" + "x" * 60, expires_at=expires)
    else:
        cred = random_credential()
    cp = drs_controlplane_factory(seed=SEED, credential=cred)
    env = client_env(cp)
    if case == "secret":
        env["AWS_SECRET_KEY"] = cp.secret_key[:-4] + "abcd"
    elif case == "key":
        env["AWS_ACCESS_KEY"] = "AKIA" + "Z" * 16
    elif case == "token":
        env["AWS_SESSION_TOKEN"] = "FwoGZXIvYXdzE" + "y" * 60
    run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 3, run.all
    expected = {
        "secret": "Secret Access Key does not match",
        "key": "does not recognise the access key ID",
        "token": "or the AWS Session Token",
        "expired": "Session Token has expired",
    }[case]
    errors = [line for line in run.out.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and expected in errors[0], run.out
    assert "Traceback" not in run.all


def test_throttling_is_retried(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    cp.throttle_next(2, retry_after=0)
    with agent_listener() as port:
        run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, agent_port=port), "--no-prompt")
    assert run.status == 0, run.all


def test_clock_skew_is_reported_with_what_to_do(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    cp.set_clock_offset(3600)  # a hardware clock in local time, one zone east of UTC
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp), "--no-prompt")
    assert run.status == 3
    assert "s behind the endpoint's clock" in run.out and "date -u -s '" in run.out


def test_unreachable_recovery_instance_and_s3(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    port = closed_port()
    env = client_env(cp, agent_port=port, FAILBACK_S3_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 6
    assert f"127.0.0.1:{port}: connection refused" in run.out and "security group" in run.out
    assert "Cannot reach the regional S3 endpoint" in run.out
    assert steps_of(cp, "i-0000000000000a001")["ESTABLISH_RECOVERY_INSTANCE_COMMUNICATION"] == "FAILED"


def test_console_instance_prints_the_summary_line_first_and_once(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    """On a LiveCD console (FAILBACK_CONSOLE set by the launcher) the line comes before anything is loaded;
    the workflow must not print it a second time."""
    env = {**client_env(cp), "FAILBACK_CONSOLE": "ttyS0", "FAILBACK_SYSROOT": UEFI_ROOT}
    run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt", "--region", "mars-north-9")
    lines = run.out.splitlines()
    assert lines[0].startswith("failback-client ") and "boot mode: UEFI | secure boot: on" in lines[0], run.out
    assert sum(line.startswith("failback-client ") for line in lines) == 1, run.out
    assert run.status != 0  # the bad region still fails as before, after the line


def test_importing_the_command_line_loads_nothing_heavy() -> None:
    """What runs before the summary line: no YAML, HTTP, boto3 or rich (seconds under emulation)."""
    import subprocess
    import sys

    code = (
        "import sys, failback_client.cli; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('failback_client', 'yaml', 'boto3', 'botocore', 'rich', 'urllib3') or m == 'urllib.request')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(loaded) <= {"failback_client", "failback_client.cli", "failback_client.errors"}, loaded
