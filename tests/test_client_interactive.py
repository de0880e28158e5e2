"""The console dialogue through a pseudo-terminal (pexpect): what an admin types at the LiveCD prompt.

Guide steps: 6 (credentials; secret and token not echoed), 7 (endpoint, Enter or custom), 8 (automatic
choice on the original server), 9 (pick from the list by number or ID; bad answers re-asked; instances that
do not fit are not listed), 10 (automatic mapping), 11 (per-volume prompts, EXCLUDE, ALL="…"), 12, and the stop.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pexpect
import pytest

from tests.controlplane_fixture import ControlPlaneHandle, drs_controlplane_factory  # noqa: F401
from tests.test_client_helpers import (
    BIG_RI,
    ORIGINAL_RI,
    OTHER_RI,
    SEED,
    UEFI_ROOT,
    agent_listener,
    client_command,
    client_env,
    subprocess_env,
)

SUMMARY = re.compile(r"failback-client \S+ .*boot mode: (BIOS|UEFI) .*secure boot: (on|off)")
STOP = "the failback client stops here"  # --check-only (client_env sets FAILBACK_CHECK_ONLY=1)


@pytest.fixture
def cp(drs_controlplane_factory) -> ControlPlaneHandle:  # noqa: F811
    return drs_controlplane_factory(seed=SEED)


def spawn(env: dict[str, str], tmp_path: Path, *args: str) -> tuple[pexpect.spawn, io.StringIO]:
    command = client_command("--log-file", str(tmp_path / "client.log"), *args)
    child = pexpect.spawn(
        command[0], command[1:], env=subprocess_env(env), encoding="utf-8", timeout=60, dimensions=(50, 200)
    )
    transcript = io.StringIO()
    child.logfile_read = transcript
    return child, transcript


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_original_server_dialogue(cp: ControlPlaneHandle, tmp_path: Path) -> None:
    with agent_listener() as port:
        env = client_env(cp, agent_port=port, with_creds=False, TERM="xterm-256color")  # rich output
        child, transcript = spawn(env, tmp_path)
        child.expect(SUMMARY)
        assert child.match.group(1) == "BIOS" and child.match.group(2) == "off"
        child.expect_exact("AWS Access Key ID: ")
        child.sendline("short")
        child.expect_exact("16-128 letters and digits")
        child.expect_exact("AWS Access Key ID: ")
        child.sendline(cp.access_key)
        child.expect_exact("AWS Secret Access Key (not shown): ")
        child.sendline(cp.secret_key)
        child.expect_exact("AWS Session Token")
        child.sendline("")
        child.expect_exact("AWS Region (e.g. us-east-1): ")
        child.sendline("us-est-1")
        child.expect_exact("did you mean us-east-1 or us-west-1?")
        child.expect_exact("AWS Region (e.g. us-east-1): ")
        child.sendline("us-east-1")
        child.expect_exact("press Enter for the default https://drs.us-east-1.amazonaws.com")
        child.sendline("ftp://drs.example")
        child.expect_exact("must start with https://")
        child.expect_exact("Custom endpoint")
        child.sendline(cp.url)
        child.expect_exact("belongs to source server s-aaaaaaaaaaaaaaaaa (orig01)")
        child.expect_exact("Volumes mapped automatically")
        child.expect_exact(STOP)
        assert finish(child) == 0
    assert cp.secret_key not in transcript.getvalue()  # typed with echo off, never printed
    assert cp.internal(ORIGINAL_RI)["deviceMapping"][0]["failbackClientDeviceName"] == "/dev/sda"


def test_pick_from_list_by_id_and_map_per_volume(cp: ControlPlaneHandle, tmp_path: Path) -> None:
    with agent_listener() as port:
        env = client_env(cp, root=UEFI_ROOT, agent_port=port, FAILBACK_PLAIN="1", TERM="vt220")
        child, transcript = spawn(env, tmp_path)
        child.expect(SUMMARY)
        assert child.match.group(1) == "UEFI" and child.match.group(2) == "on"
        child.expect_exact("Recovery instances that fit this machine")
        child.expect(r"Choose the recovery instance to fail back from \(1-2 or its ID\): ")
        listing = transcript.getvalue()
        assert ORIGINAL_RI in listing and OTHER_RI in listing
        assert "Not listed (2)" in listing
        assert f"{BIG_RI}: volume /dev/nvme0n1 (200 GiB) is too large for disk /dev/nvme1n1 (100 GiB)" in listing
        assert "it has 3 volumes but this machine has only 2 disk(s)" in listing
        child.sendline("7")
        child.expect_exact("is neither a number from 1 to 2 nor a listed recovery instance ID")
        child.sendline(BIG_RI)
        child.expect_exact("too large for disk /dev/nvme1n1")
        child.sendline(OTHER_RI)
        child.expect_exact(f"Recovery instance {OTHER_RI}: chosen from the list by ID")
        child.expect_exact("Local disk for /dev/nvme0n1 (10 GiB): ")
        child.sendline("/dev/sdz")
        child.expect_exact("'/dev/sdz' (for /dev/nvme0n1) is not a disk of this machine")
        child.expect_exact("Local disk for /dev/nvme0n1 (10 GiB): ")
        child.sendline("/dev/sdd")  # the boot medium (ISO9660 volume id DRSFAILBACK)
        child.expect_exact("the failback client's boot medium")
        child.sendline('ALL="/dev/nvme0n1=/dev/nope"')
        child.expect_exact("'/dev/nope'")
        child.sendline("EXCLUDE")
        # everything EXCLUDEd is refused as a whole, and the mapping starts again
        child.expect_exact("every recovery volume is EXCLUDE")
        child.expect_exact("Local disk for /dev/nvme0n1 (10 GiB): ")
        child.sendline("/dev/nvme1n1")
        child.expect_exact(STOP)
        assert finish(child) == 0
    assert "\x1b[" not in transcript.getvalue()  # plain lines: no escape sequences
    assert cp.internal(OTHER_RI)["deviceMapping"] == [
        {"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "/dev/nvme1n1"}
    ]


def test_pick_by_number_and_whole_mapping_as_json(cp: ControlPlaneHandle, tmp_path: Path) -> None:
    with agent_listener() as port:
        env = client_env(cp, root=UEFI_ROOT, agent_port=port, FAILBACK_PLAIN="1")
        child, transcript = spawn(env, tmp_path, "--dm-value-format", "by-id")
        child.expect(r"Choose the recovery instance to fail back from \(1-2 or its ID\): ")
        row = next(line for line in transcript.getvalue().splitlines() if ORIGINAL_RI in line)
        child.sendline(row.split()[0])
        child.expect_exact("Local disk for /dev/nvme0n1 (1 GiB): ")
        child.sendline(
            'ALL=\'{"/dev/nvme0n1": "nvme-Amazon_Elastic_Block_Store_vol0fedcba9876543210", '
            '"/dev/nvme1n1": "EXCLUDE"}\''
        )
        child.expect_exact(STOP)
        assert finish(child) == 0
    assert cp.internal(ORIGINAL_RI)["deviceMapping"] == [
        {"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "/dev/nvme1n1"},
        {"recoveryInstanceDeviceName": "/dev/nvme1n1", "failbackClientDeviceName": "EXCLUDE"},
    ]


def test_refused_credentials_are_asked_again(cp: ControlPlaneHandle, tmp_path: Path) -> None:
    with agent_listener() as port:
        env = client_env(
            cp, agent_port=port, with_creds=False, AWS_REGION=cp.region, AWS_DRS_ENDPOINT=cp.url, FAILBACK_PLAIN="1"
        )
        child, transcript = spawn(env, tmp_path)
        child.expect_exact("AWS Access Key ID: ")
        child.sendline(cp.access_key)
        child.expect_exact("AWS Secret Access Key (not shown): ")
        child.sendline(cp.secret_key[::-1])
        child.expect_exact("AWS Session Token")
        child.sendline("")
        child.expect_exact("the AWS Secret Access Key does not match access key")
        child.expect_exact("Please enter them again.")
        child.expect_exact("AWS Access Key ID: ")
        child.sendline(cp.access_key)
        child.expect_exact("AWS Secret Access Key (not shown): ")
        child.sendline(cp.secret_key)
        child.expect_exact("AWS Session Token")
        child.sendline("")
        child.expect_exact("Credentials accepted")
        child.expect_exact(STOP)
        assert finish(child) == 0
    assert cp.secret_key not in transcript.getvalue() and cp.secret_key[::-1] not in transcript.getvalue()
