"""`failback-client convert DISK...` (client/failback_client/convert_cli.py): bad arguments are refused before
anything is opened; --dry-run lists what would change and leaves every byte of the disk as it was; a real run
converts and a second one changes nothing."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from failback_client.cli import main

from image.vm.convert_fixture import loop_device
from image.vm.windows_fixture import build_hive, make_windows_disk, mounted_windows, reglookup, system_reg


def test_unknown_controller_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--controllers", "ahci,e1000e", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert "--controllers: unknown controller driver(s) e1000e; known: ahci" in err


def test_not_a_block_device_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    assert main(["convert", str(img), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"{img} is not a block device (attach an image with `losetup" in err
    assert f"{tmp_path / 'missing'}: No such file or directory" in err


def test_help_lists_the_controller_drivers() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "failback_client", "convert", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--dry-run" in out and "hv_storvsc" in out and "megaraid_sas" in out and "exit status" in out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.root
def test_dry_run_then_real_run_through_the_subcommand(tmp_path: Path) -> None:
    for tool in ("mkntfs", "ntfs-3g", "hivexregedit", "reglookup", "mcopy"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (./install-deps.sh)")
    hive = build_hive(tmp_path / "SYSTEM.src", system_reg()).read_bytes()
    img = make_windows_disk(tmp_path / "win.img", "uefi", hive)
    digest = _sha(img)
    base = [
        sys.executable,
        "-m",
        "failback_client",
        "convert",
        "--boot-mode",
        "uefi",
        "--controllers",
        "vmw_pvscsi,megaraid_sas",
        "--log-file",
        str(tmp_path / "convert.log"),
    ]
    with loop_device(img) as dev:
        dry = subprocess.run(
            [*base, "--dry-run", dev],
            capture_output=True,
            text=True,
            env={"FAILBACK_PLAIN": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    print(dry.stdout, dry.stderr)
    assert dry.returncode == 0
    assert "dry run: nothing written" in dry.stdout and "would edit" in dry.stdout and "pvscsi" in dry.stdout
    assert _sha(img) == digest
    with loop_device(img) as dev:
        real = subprocess.run(
            [*base, dev],
            capture_output=True,
            text=True,
            env={"FAILBACK_PLAIN": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    print(real.stdout, real.stderr)
    assert real.returncode == 0 and "Changes made on the target" in real.stdout
    with mounted_windows(img, "uefi") as c:
        values = reglookup(c / "Windows/System32/config/SYSTEM")
    for svc in ("pvscsi", "megasas", "megasas2i", "megasas35i"):
        assert values[f"/ControlSet001/Services/{svc}/Start"] == ("DWORD", "0x00000000"), svc
