"""Errors say why (issue 18 item 3): what identification tried, which mapping rule failed for which volume,
a region mismatch told from a wrong secret by the service's own answer, and redaction that masks secrets only.
Real client runs (in process) against the local DRS control plane over HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from failback_client.logs import MASK, Redactor

from tests.controlplane_fixture import ControlPlaneHandle, drs_controlplane_factory  # noqa: F401
from tests.test_client_helpers import BIOS_ROOT, SEED, UEFI_ROOT, client_env, run_in_process


@pytest.fixture
def cp(drs_controlplane_factory) -> ControlPlaneHandle:  # noqa: F811
    return drs_controlplane_factory(seed=SEED)


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ERROR:")]


def test_identification_failure_lists_what_was_tried(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    root = tmp_path / "uefi"
    shutil.copytree(UEFI_ROOT, root, symlinks=True)
    (root / "sys/class/dmi/id/board_asset_tag").write_text("i-0123456789abcdef0\n")  # as on EC2 (Nitro)
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, root=str(root)), "--no-prompt")
    assert run.status == 2, run.all
    [error] = errors(run.out)
    assert "the recovery instance could not be chosen automatically (tried " in error
    for tried in (
        "MAC address 0a:1b:2c:3d:4e:5f: no source server",
        "VMware UUID 564d1234-5678-9abc-def0-123456789abc: no source server",
        "VMware UUID 34124d56-7856-bc9a-def0-123456789abc: no source server",  # the other byte order
        "EC2 instance id i-0123456789abcdef0: no source server",
    ):
        assert tried in error, error
    # the source servers seen, with the ids they would have matched
    assert (
        "source servers in us-east-1: s-aaaaaaaaaaaaaaaaa orig01 (52:54:00:12:34:56, "
        "4210a1b2-c3d4-e5f6-0718-293a4b5c6d7e)" in error
    )
    assert "s-bbbbbbbbbbbbbbbbb other01 (00:50:56:00:00:01)" in error
    assert "give --recovery-instance-id" in error


def test_interactive_identification_says_why_before_the_list(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))  # the list prompt then meets end of input
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, root=UEFI_ROOT))
    assert (
        "This machine was not identified as a source server: tried MAC address 0a:1b:2c:3d:4e:5f: "
        "no source server" in run.out
    ), run.out


def test_mapping_failure_names_the_rule_and_the_volume(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    root = tmp_path / "bios"
    shutil.copytree(BIOS_ROOT, root, symlinks=True)
    (root / "sys/block/sdb/size").write_text(f"{2**30 // 512}\n")  # 1 GiB: too small for the 2 GiB volume
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, root=str(root)), "--no-prompt")
    assert run.status == 2, run.all
    [error] = [e for e in errors(run.out) if "could not be made automatically" in e]
    # DRS suggests nothing for the volume no local disk can take; the client says which and what to add
    assert (
        "the volume mapping could not be made automatically (DRS's suggestion (/dev/nvme0n1=/dev/sda) does "
        "not fit this machine: recovery device /dev/nvme1n1 has no local device: add /dev/nvme1n1=<local "
        "device> or /dev/nvme1n1=EXCLUDE)" in error
    ), error
    assert "give --device-mapping" in error


def test_suggested_disk_in_use_names_the_disk_and_its_use(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    root = tmp_path / "bios"
    shutil.copytree(BIOS_ROOT, root, symlinks=True)
    (root / "sys/block/sdb/holders").mkdir()
    (root / "sys/block/sdb/holders/md127").symlink_to("../../md127")
    (root / "sys/block/md127/md").mkdir(parents=True)
    (root / "sys/block/md127/md/level").write_text("raid1\n")
    (root / "sys/block/sdd").mkdir()  # a third, free disk: the instance still fits this machine
    (root / "sys/block/sdd/size").write_text(f"{4 * 2**30 // 512}\n")
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, root=str(root)), "--no-prompt")
    assert run.status == 2, run.all
    [error] = [e for e in errors(run.out) if "could not be made automatically" in e]
    assert (
        "local device '/dev/sdb' (for /dev/nvme1n1) is /dev/sdb, which is in use: sdb is a member of the "
        "active MD raid1 array /dev/md127; free it first (stop it: mdadm --stop /dev/md127)" in error
    ), error


def test_wrong_region_is_told_apart_from_a_wrong_secret(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, AWS_REGION="eu-west-1"), "--no-prompt")
    assert run.status == 3, run.all
    [error] = errors(run.out)
    assert f"The endpoint {cp.url} is not in region eu-west-1" in error
    assert "Credential should be scoped to a valid region" in error  # the service's own words
    assert "Secret Access Key" not in error and "clock" not in error

    run = run_in_process(
        monkeypatch, capsys, tmp_path, client_env(cp, AWS_SECRET_KEY=cp.secret_key[::-1]), "--no-prompt"
    )
    assert run.status == 3, run.all
    [error] = errors(run.out)
    assert "the AWS Secret Access Key does not match access key" in error
    assert "region" not in error and "clock" not in error


def test_a_secret_that_is_an_ordinary_word_masks_nothing_else(cp, monkeypatch, capsys, tmp_path: Path) -> None:
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, AWS_SECRET_KEY="request"), "--no-prompt")
    assert run.status == 3, run.all
    [error] = errors(run.out)
    assert "AWS refused the request signature" in error and MASK not in run.all


def test_redaction_masks_secrets_not_words() -> None:
    r = Redactor()
    r.add("wrong")  # shorter than any secret AWS issues: masking it would only mask the word
    assert r("or the clock is wrong") == "or the clock is wrong"
    r.add("s3cr3tval")  # 9 characters: masked as a whole token only
    assert r("key=s3cr3tval, 's3cr3tval' xs3cr3tvalx") == f"key={MASK}, '{MASK}' xs3cr3tvalx"
    long = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    r.add(long)  # a real secret's length: masked wherever it appears, even glued to other text
    assert r(f"a{long}b and {long[:-1]}") == f"a{MASK}b and {long[:-1]}"
    assert r("wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYEXAMPLEKEY") == MASK  # its URL-encoded form too
