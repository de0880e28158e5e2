"""A small "local disk" for boot tests: it announces on COM1 that it was booted, BIOS or UEFI.

- BIOS: its MBR code (below) writes BIOS_MARKER to COM1 and halts.
- UEFI: a GPT with one EFI System partition holding Debian's signed shim as \\EFI\\BOOT\\BOOTX64.EFI,
  Debian's signed GRUB next to it and a /boot/grub/grub.cfg that prints UEFI_MARKER (so it boots with
  Secure Boot enforced too). The FAT image is made with mtools (no vfat on the host kernel).
"""

from __future__ import annotations

from pathlib import Path

from image.core.run import run
from image.stages.boot import efi
from image.stages.bootloader import BootLoaders

BIOS_MARKER = "failback-marker-disk: BIOS MBR"
UEFI_MARKER = "failback-marker-disk: UEFI ESP"
# Its MBR disk id: anything but the ISO's.
DISK_ID = 0x4D4B5231

# cli; xor ax,ax; mov ds,ax; mov si,0x7c17; mov dx,0x3f8; cld
# 1: lodsb; test al,al; jz 2f; out dx,al; jmp 1b
# 2: hlt; jmp 2b        (the message follows at 0x7c17)
_MBR_CODE = bytes.fromhex("fa31c08ed8be177cbaf803fcac84c07403eeebf8f4ebfd")

MARKER_GRUB_CFG = f"""\
serial --unit=0 --speed=115200
terminal_output serial console
echo "{UEFI_MARKER}"
sleep 120
"""

_MIB = 1024 * 1024


def mbr_code() -> bytes:
    code = _MBR_CODE + BIOS_MARKER.encode() + b"\r\n\0"
    assert len(code) <= 440
    return code


def make_marker_disk(dest: Path, loaders: BootLoaders) -> Path:
    """Write the marker disk at `dest` (about 20 MiB) with the bootloader stage's signed EFI binaries."""
    binaries = loaders.files
    files: dict[str, Path | bytes] = {
        "EFI/BOOT/BOOTX64.EFI": binaries["EFI/BOOT/BOOTX64.EFI"],
        "EFI/BOOT/grubx64.efi": binaries["EFI/BOOT/grubx64.efi"],
        "boot/grub/grub.cfg": MARKER_GRUB_CFG.encode(),
    }
    fat = efi.make_fat_image(files, dest.with_name(dest.name + ".esp"), 0)
    fat_bytes = fat.read_bytes()
    fat.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as f:
        f.truncate(_MIB + len(fat_bytes) + _MIB)
    first = _MIB // 512
    run(
        ["sgdisk", "-n", f"1:{first}:{first + len(fat_bytes) // 512 - 1}", "-t", "1:ef00", "-c", "1:ESP", dest],
        capture=True,
    )
    with dest.open("r+b") as f:
        f.seek(_MIB)
        f.write(fat_bytes)
        f.seek(0)
        mbr = bytearray(f.read(512))
        code = mbr_code()
        mbr[: len(code)] = code
        mbr[440:444] = DISK_ID.to_bytes(4, "little")
        assert mbr[510:] == b"\x55\xaa"
        f.seek(0)
        f.write(mbr)
    return dest


def drive_argv(disk: Path) -> list[str]:
    """QEMU options attaching `disk` as a second SATA hard disk, after the boot medium in boot order."""
    return [
        "-drive", f"if=none,id=localdisk,file={disk},format=raw,media=disk,snapshot=on",
        "-device", "ide-hd,drive=localdisk,bus=ide.1,bootindex=1",
    ]  # fmt: skip
