"""Windows detection on a real NTFS disk (made with mkntfs, filled through ntfs-3g): reported with the checks
an admin must make, and the disk left byte-for-byte as it was. Needs root (loop device, FUSE mount)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from failback_client.console import Console
from failback_client.convert import ConversionOptions, convert

from image.convert_fixture import loop_device

pytestmark = pytest.mark.root
MIB = 1024 * 1024


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def windows_disk(tmp_path: Path) -> Path:
    """MBR disk as BIOS Windows has it: partition 1 "System Reserved" (Boot/BCD), partition 2 C: (Windows)."""
    for tool in ("mkntfs", "ntfs-3g", "ntfsls"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (ntfs-3g; ./install-deps.sh)")
    img = tmp_path / "windows-bios.img"
    with img.open("wb") as f:
        f.truncate(120 * MIB)
    subprocess.run(["sfdisk", "-q", str(img)], check=True, text=True, capture_output=True,
                   input="label: dos\nsize=40M, type=7, bootable\ntype=7\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(img) as dev:
        for part, label, tree in ((1, "System Reserved", "Boot"), (2, "Windows", "Windows/System32")):
            subprocess.run(["mkntfs", "-Q", "-F", "-L", label, f"{dev}p{part}"], check=True, capture_output=True)
            subprocess.run(["ntfs-3g", f"{dev}p{part}", str(mnt)], check=True)
            try:
                (mnt / tree).mkdir(parents=True)
                (mnt / tree / ("BCD" if tree == "Boot" else "ntoskrnl.exe")).write_bytes(b"stand-in content")
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
    return img


def test_windows_is_detected_reported_and_not_changed(windows_disk: Path, tmp_path: Path) -> None:
    before = _sha(windows_disk)
    out = io.StringIO()
    with loop_device(windows_disk) as dev:
        report = convert([Path(dev)], Console(stdin=io.StringIO(""), stdout=out, plain=True),
                         ConversionOptions(boot_mode="uefi", work_dir=tmp_path / "work"))
    text = out.getvalue()
    print(text)
    assert report.ok and report.changes == [] and report.linux == []
    [win] = report.windows
    assert set(win.evidence[2:]) == {"Windows/System32 on partition 2",
                                     "BIOS boot configuration Boot/BCD on partition 1"}
    assert any("this machine boots UEFI; the instance's disk was made for BIOS" in c for c in win.checks)
    assert "was NOT changed. An administrator must check:" in text and "INACCESSIBLE_BOOT_DEVICE" in text
    assert _sha(windows_disk) == before
