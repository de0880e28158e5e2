"""Windows detection on a real NTFS disk (made with mkntfs, filled through ntfs-3g): reported with the checks
an admin must make, and the disk left byte-for-byte as it was. Needs root (loop device, FUSE mount)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from failback_client.console import Console
from failback_client.convert import ConversionOptions, convert
from failback_client.convert import windows as windows_mod
from failback_client.convert.runner import CommandFailed

from image.vm.convert_fixture import loop_device
from image.vm.windows_fixture import (
    build_hive,
    esp_files,
    make_dirty,
    make_windows_disk,
    mounted_windows,
    reglookup,
    system_reg,
)

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
    subprocess.run(
        ["sfdisk", "-q", str(img)],
        check=True,
        text=True,
        capture_output=True,
        input="label: dos\nsize=40M, type=7, bootable\ntype=7\n",
    )
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
        report = convert(
            [Path(dev)],
            Console(stdin=io.StringIO(""), stdout=out, plain=True),
            ConversionOptions(boot_mode="uefi", work_dir=tmp_path / "work"),
        )
    text = out.getvalue()
    print(text)
    assert report.ok and report.changes == [] and report.linux == []
    [win] = report.windows
    assert set(win.evidence[2:]) == {
        "Windows/System32 on partition 2",
        "BIOS boot configuration Boot/BCD on partition 1",
    }
    assert any("this machine boots UEFI; the instance's disk was made for BIOS" in c for c in win.checks)
    assert "was NOT changed. An administrator must check:" in text and "INACCESSIBLE_BOOT_DEVICE" in text
    assert _sha(windows_disk) == before


# ---- conversion on real NTFS images (image/vm/windows_fixture.py), checked with reglookup -------------------

HIVE = "Windows/System32/config/SYSTEM"
CONTROLLERS = ("ahci", "nvme", "hv_storvsc")


def _tools() -> None:
    for tool in ("mkntfs", "ntfs-3g", "hivexregedit", "reglookup", "mcopy", "mkfs.vfat"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (./install-deps.sh)")


@pytest.fixture()
def system_hive(tmp_path: Path) -> bytes:
    _tools()
    return build_hive(tmp_path / "SYSTEM.src", system_reg()).read_bytes()


def _run(img: Path, tmp_path: Path, mode: str, **opts) -> tuple:
    out = io.StringIO()
    (tmp_path / "sys").mkdir(exist_ok=True)  # an empty /sys: only --controllers count
    with loop_device(img) as dev:
        report = convert(
            [Path(dev)],
            Console(stdin=io.StringIO(""), stdout=out, plain=True),
            ConversionOptions(
                boot_mode=mode,
                work_dir=tmp_path / "work",
                sys_root=tmp_path / "sys",
                windows_controllers=opts.pop("controllers", CONTROLLERS),
                **opts,
            ),
        )
    print(out.getvalue())
    return report, out.getvalue()


def _hive_after(img: Path, layout: str) -> tuple[dict, bytes, list[str]]:
    with mounted_windows(img, layout) as c:
        config = c / "Windows/System32/config"
        return reglookup(config / "SYSTEM"), (config / "SYSTEM").read_bytes(), sorted(os.listdir(config))


@pytest.mark.parametrize("layout", ["uefi", "bios"])
def test_windows_converted_then_second_run_changes_nothing(layout: str, system_hive: bytes, tmp_path: Path) -> None:
    img = make_windows_disk(tmp_path / f"win-{layout}.img", layout, system_hive)
    mbr = img.read_bytes()[:512]
    report, text = _run(img, tmp_path, layout)
    assert report.ok, report.error
    values, _hive, names = _hive_after(img, layout)
    cs = "/ControlSet001/Services"
    for svc in ("storahci", "msahci", "stornvme", "storvsc", "vmbus"):
        assert values[f"{cs}/{svc}/Start"] == ("DWORD", "0x00000000"), svc
    assert not any("/StartOverride" in k for k in values)
    for svc in ("ena", "AmazonSSMAgent", "EC2Launch"):
        assert values[f"{cs}/{svc}/Start"] == ("DWORD", "0x00000004"), svc
    assert values[f"{cs}/LSI_SAS/Start"] == ("DWORD", "0x00000003")  # not asked for
    assert "SYSTEM.failback-bak" in names
    with mounted_windows(img, layout) as c:
        assert (c / "Windows/System32/config/SYSTEM.failback-bak").read_bytes() == system_hive
    details = [c.detail for c in report.changes]
    assert any("storahci: Start 3 (demand) -> 0 (boot)" in d for d in details)
    assert any("storahci\\StartOverride removed (0=3)" in d for d in details)
    assert "Changes made on the target" in text and "was converted; after its first boot check" in text
    if layout == "uefi":
        assert "/EFI/Boot/bootx64.efi" in esp_files(img)
        assert any(c.path.endswith(":/EFI/Boot/bootx64.efi") for c in report.changes)
    else:
        assert img.read_bytes()[:512] == mbr  # the MBR and its active flag stay as replicated
        assert "MBR and active partition are left as replicated" in text
    # Second run: nothing to change, nothing mounted read-write, not a byte of the disk changes.
    digest = _sha(img)
    again, _ = _run(img, tmp_path, layout)
    assert again.ok and again.changes == []
    assert _sha(img) == digest


def test_dry_run_lists_and_writes_nothing(system_hive: bytes, tmp_path: Path) -> None:
    img = make_windows_disk(tmp_path / "win.img", "uefi", system_hive)
    digest = _sha(img)
    report, text = _run(img, tmp_path, "uefi", dry_run=True)
    assert report.ok and report.changes and all(c.action.startswith("would ") for c in report.changes)
    assert "dry run: nothing written" in text
    assert _sha(img) == digest


def test_dirty_hive_is_refused_before_any_write(system_hive: bytes, tmp_path: Path) -> None:
    img = make_windows_disk(tmp_path / "win.img", "bios", make_dirty(system_hive), logs=True)
    digest = _sha(img)
    report, _ = _run(img, tmp_path, "bios")
    assert not report.ok and report.failed_step == windows_mod.STEP_REFUSE
    assert "pending transaction logs (SYSTEM.LOG1, SYSTEM.LOG2" in report.error
    assert "Nothing was written" in report.error
    assert report.changes == [] and _sha(img) == digest


def test_hibernated_volume_is_refused_without_consent(system_hive: bytes, tmp_path: Path) -> None:
    img = make_windows_disk(tmp_path / "win.img", "bios", system_hive, hiberfil=True)
    digest = _sha(img)
    report, _ = _run(img, tmp_path, "bios")
    assert not report.ok and "hibernated or with Fast Startup" in report.error and "powercfg /h off" in report.error
    assert _sha(img) == digest
    # With the admin's consent the hibernation file is removed and the conversion goes on.
    consented, _ = _run(img, tmp_path, "bios", remove_hiberfile=True)
    assert consented.ok, consented.error
    values, _hive, _names = _hive_after(img, "bios")
    assert values["/ControlSet001/Services/storahci/Start"] == ("DWORD", "0x00000000")


def test_hibernated_volume_with_nothing_to_change_is_only_a_note(tmp_path: Path) -> None:
    _tools()
    hive = build_hive(tmp_path / "SYSTEM.src", system_reg(storage=("storahci",), cloud=False)).read_bytes()
    img = make_windows_disk(tmp_path / "win.img", "bios", hive, hiberfil=True)
    digest = _sha(img)
    report, _ = _run(img, tmp_path, "bios", controllers=())
    assert report.ok and report.changes == []
    assert any("hibernated or has Fast Startup on" in w and "not written" in w for w in report.warnings)
    assert _sha(img) == digest


def test_read_only_fallback_of_ntfs3g_is_caught(
    system_hive: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past our own hiberfil.sys look, ntfs-3g itself falls back to read-only on such a volume: caught too."""
    img = make_windows_disk(tmp_path / "win.img", "bios", system_hive, hiberfil=True)
    digest = _sha(img)
    monkeypatch.setattr(windows_mod, "is_hibernated", lambda root: False)
    report, _ = _run(img, tmp_path, "bios")
    assert not report.ok and "ntfs-3g mounted it read-only" in report.error and "--remove-hiberfile" in report.error
    assert report.changes == [] and _sha(img) == digest


def test_failure_after_the_hive_write_puts_it_back(
    system_hive: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = make_windows_disk(tmp_path / "win.img", "uefi", system_hive)
    written = []

    def fail(self, tx, esp) -> None:
        written.append(Path(tx.host("/" + HIVE)).read_bytes())  # the hive as committed
        raise CommandFailed(["mcopy", "injected"], 1, "injected failure after the hive write")

    monkeypatch.setattr(windows_mod.WindowsConversion, "_copy_loader", fail)
    report, text = _run(img, tmp_path, "uefi")
    assert not report.ok and report.failed_step == windows_mod.STEP_ESP
    assert written and written[0] != system_hive  # the hive had been written
    _values, hive, names = _hive_after(img, "uefi")
    assert hive == system_hive  # byte for byte
    assert "SYSTEM.failback-bak" not in names
    assert any(HIVE in r for r in report.rolled_back) and "Put back as replicated" in text
    assert "/EFI/Boot/bootx64.efi" not in esp_files(img)


def test_boot_mode_mismatch_is_refused_before_any_write(system_hive: bytes, tmp_path: Path) -> None:
    img = make_windows_disk(tmp_path / "win.img", "uefi", system_hive)
    digest = _sha(img)
    report, _ = _run(img, tmp_path, "bios")
    assert not report.ok and report.failed_step == windows_mod.STEP_BOOT_MODE
    assert "reboot this ISO in UEFI mode" in report.error
    assert _sha(img) == digest


def test_controller_without_inbox_driver_is_reported(tmp_path: Path) -> None:
    _tools()
    hive = build_hive(tmp_path / "SYSTEM.src", system_reg(storage=("storahci",))).read_bytes()
    img = make_windows_disk(tmp_path / "win.img", "bios", hive)
    report, _ = _run(img, tmp_path, "bios", controllers=("ahci", "virtio_scsi"))
    assert report.ok
    assert any("virtio_scsi" in w and "needs the vendor's driver" in w and "vioscsi" in w for w in report.warnings)
    values, _hive, _names = _hive_after(img, "bios")
    assert "/ControlSet001/Services/vioscsi" not in values
