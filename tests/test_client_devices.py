"""Local disk discovery: recorded sysfs/udev trees and real loop devices."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from failback_client.devices import discover, targets

from tests.test_client_helpers import BIOS_ROOT, GIB, UEFI_ROOT


def test_recorded_bios_tree() -> None:
    disks = {d.name: d for d in discover(BIOS_ROOT)}
    # loop, optical, zram and empty devices are not candidates
    assert sorted(disks) == ["sda", "sdb", "sdc"]
    sda, sdb, sdc = disks["sda"], disks["sdb"], disks["sdc"]
    assert sda.size_bytes == 20 * GIB and sdb.size_bytes == int(9.75 * GIB)
    assert sda.by_path == ["pci-0000:00:10.0-scsi-0:0:0:0"]  # the -part1 link belongs to the partition
    assert sda.by_id == ["scsi-0QEMU_QEMU_HARDDISK_drive-scsi0"]
    assert sda.by_uuid == ["0f2c7c4e-1d6b-4c43-9a58-2b6a1f0a7d11"]  # a partition's filesystem names its disk
    assert sda.partitions == ["sda1"] and sda.model == "QEMU HARDDISK"
    # the USB stick the LiveCD booted from: mounted at /run/live/medium and labelled DRSFAILBACK
    assert sdc.boot_medium and sdc.removable and not sda.boot_medium
    assert [d.name for d in targets(list(disks.values()))] == ["sda", "sdb"]


def test_recorded_uefi_tree_boot_medium_by_iso_volume_id() -> None:
    disks = {d.name: d for d in discover(UEFI_ROOT)}
    assert sorted(disks) == ["nvme0n1", "nvme1n1", "sdd"]
    assert disks["sdd"].boot_medium  # no udev label, no mount: the ISO9660 volume id says DRSFAILBACK
    assert disks["nvme1n1"].by_path == ["pci-0000:00:1f.0-nvme-1"] and disks["nvme1n1"].size_bytes == 100 * GIB


def test_boot_medium_by_mount_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(BIOS_ROOT, root, symlinks=True)
    (root / "dev/disk/by-label/DRSFAILBACK").unlink()
    assert {d.name for d in discover(str(root)) if d.boot_medium} == {"sdc"}  # still found through /proc/mounts
    (root / "proc/mounts").write_text("sysfs /sys sysfs rw 0 0\n")
    assert not any(d.boot_medium for d in discover(str(root)))


def test_seed_volume_is_never_a_target(tmp_path: Path) -> None:
    """A FAT seed stick labelled FBSEED (client/SEED.md) is read for settings, never offered as a target disk."""
    root = tmp_path / "root"
    shutil.copytree(BIOS_ROOT, root, symlinks=True)
    assert [d.name for d in targets(discover(str(root)))] == ["sda", "sdb"]
    (root / "dev/disk/by-label/FBSEED").symlink_to("../../sdb")
    assert [d.name for d in targets(discover(str(root)))] == ["sda"]


def test_missing_sysfs_gives_no_disks(tmp_path: Path) -> None:
    assert discover(str(tmp_path)) == []


def _losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def loop_devices(tmp_path: Path) -> Iterator[dict[str, tuple[str, int]]]:
    """Three real loop devices on sparse files: two disks and one carrying an ISO9660 DRSFAILBACK header."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    sizes = {"small": 64 * 2**20, "large": 3 * 64 * 2**20 + 512, "medium": 2 * 2**20}
    attached: dict[str, tuple[str, int]] = {}
    try:
        for name, size in sizes.items():
            image = tmp_path / f"{name}.img"
            with open(image, "wb") as f:
                f.truncate(size)
                if name == "medium":
                    f.seek(16 * 2048)
                    f.write(b"\x01CD001\x01\x00" + b" " * 32 + b"DRSFAILBACK".ljust(32))
            try:
                device = _losetup("--find", "--show", str(image))
            except subprocess.CalledProcessError as e:
                pytest.skip(f"losetup cannot attach here: {e.stderr.strip()}")
            attached[name] = (device, size)
        yield attached
    finally:
        for device, _ in attached.values():
            subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.root
def test_real_loop_devices(loop_devices: dict[str, tuple[str, int]]) -> None:
    names = {name: os.path.basename(device) for name, (device, _) in loop_devices.items()}
    default = {d.name for d in discover("/")}
    assert not default & set(names.values())  # loop devices are skipped unless asked for
    found = {d.name: d for d in discover("/", include_loop=True)}
    for name, (_, size) in loop_devices.items():
        disk = found[names[name]]
        assert disk.size_bytes == size, name  # exact bytes from the kernel
        assert disk.boot_medium == (name == "medium"), name
