"""The boot menus on real boots (QEMU, TCG; marked boot): a serial capture of the menus holds no
box-drawing (non-ASCII) bytes and a single copy of GRUB's menu, and "boot from first local disk"
boots a second disk, not the medium it was started from: from a CD and from a USB stick (the ISO
with El Torito patched out), BIOS and UEFI (Secure Boot too).

The ISO is the ISO stage's (same boot loaders, menus, hybrid MBR/GPT) with the local-disk entry as
default after 1 s; the second disk is tests/marker_disk.py's, which says on COM1 how it was booted.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from image.stages import bootloader
from image.stages.boot.iso import IsoInputs, assemble_iso
from image.stages.config import BootConfig, BootEntry, load_config
from image.vm import media, qemu
from tests import marker_disk

pytestmark = [pytest.mark.boot, pytest.mark.network]

EPOCH = 1_700_000_000
TIMEOUT = 150.0
WAYS = ("seabios-cd", "seabios-disk", "ovmf-cd", "ovmf-disk", "ovmf-secureboot-disk")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("menu-cache")


@pytest.fixture(scope="module")
def loaders(cache: Path) -> bootloader.BootLoaders:
    return bootloader.fetch_boot_loaders(cache, bootloader.AptSources.from_config(load_config()))


@pytest.fixture(scope="module")
def menu_iso(cache: Path, loaders: bootloader.BootLoaders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ISO with "boot from first local disk" as its default entry (its kernel is never run)."""
    d = tmp_path_factory.mktemp("menu-iso")
    for name in ("vmlinuz", "initrd.img", "00-base.squashfs"):
        (d / name).write_bytes(name.encode() * 1000)
    boot = BootConfig(
        timeout=1,
        default="disk",
        entries=(
            BootEntry(id="live", label="AWS DRS Failback Client", cmdline="console=ttyS0,115200n8"),
            BootEntry(id="disk", label="Boot from first local disk", local_disk=True),
        ),
    )
    cfg = dataclasses.replace(load_config(), boot=boot)
    inputs = IsoInputs(d / "vmlinuz", d / "initrd.img", (d / "00-base.squashfs",), {}, EPOCH)
    return assemble_iso(cfg, inputs, d / "menu.iso", cache, loaders).path


@pytest.fixture(scope="module")
def local_disk(loaders: bootloader.BootLoaders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return marker_disk.make_marker_disk(tmp_path_factory.mktemp("local-disk") / "local.img", loaders)


def boot_with_local_disk(way: qemu.BootWay, iso: Path, disk: Path, workdir: Path) -> tuple[qemu.BootResult, bytes]:
    """Boot `iso` the way `way` with `disk` attached after it in boot order, until the disk's marker."""
    image = media.disk_copy(iso, workdir / "usb.img") if way.medium == "disk" else iso
    firmware = vars_file = None
    if way.firmware == "uefi":
        firmware = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(), secure_boot=way.secure_boot)
        vars_file = qemu.copy_vars(firmware, workdir / "vars.fd")
    serial = workdir / "serial.log"
    qmp = qemu.short_socket_path(way.name)
    marker = marker_disk.UEFI_MARKER if way.firmware == "uefi" else marker_disk.BIOS_MARKER
    try:
        argv = qemu.iso_argv(
            way, image=image, serial_log=serial, qmp_socket=qmp, firmware=firmware, vars_file=vars_file
        ) + marker_disk.drive_argv(disk)
        result = qemu.watch_boot(
            argv, serial_log=serial, qmp_socket=qmp, pattern=re.compile(re.escape(marker)), timeout=TIMEOUT
        )
    finally:
        shutil.rmtree(qmp.parent, ignore_errors=True)
    return result, serial.read_bytes()


def non_ascii(data: bytes) -> dict[str, int]:
    """Bytes a plain serial console would show as stray characters, with their counts."""
    found: dict[str, int] = {}
    for b in data:
        if b > 0x7F:
            found[f"{b:#04x}"] = found.get(f"{b:#04x}", 0) + 1
    return found


@pytest.mark.parametrize("way_name", WAYS)
def test_menu_is_plain_on_serial_and_local_disk_entry_boots_the_other_disk(
    way_name: str, menu_iso: Path, local_disk: Path, tmp_path: Path
) -> None:
    way = qemu.boot_way(way_name)
    result, data = boot_with_local_disk(way, menu_iso, local_disk, tmp_path)
    console = qemu.clean_console(data)
    assert result.outcome == "matched", f"{way_name}: {result.outcome} {result.match}\n{result.tail(40)}"
    menu = data[: data.find(b"failback-marker-disk")]
    if way.firmware == "uefi":
        # GRUB's menu was drawn on serial, once (not a second time by the firmware console), in ASCII.
        assert console.count("GNU GRUB  version") == 1, result.tail(60)
        assert "+----------" in console and "Boot from first local disk" in console
        # It chose a partition of a disk that is not the medium, and chainloaded its boot loader.
        m = re.search(r"Booting \((hd\d+),\d+\)/EFI/BOOT/BOOTX64\.EFI", console)
        assert m, result.tail(40)
    else:
        assert "AWS DRS Failback Client" in console and "Boot from first local disk" in console
        assert "no local hard disk to boot" not in console
    assert non_ascii(menu) == {}, f"{way_name}: stray bytes on serial: {non_ascii(menu)}"
