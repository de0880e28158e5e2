"""GRUB for the boot mode this machine uses: kernel-name devices in its defaults replaced, its configuration
regenerated, and the boot loader installed (BIOS: boot code on the disk; UEFI: into the ESP, plus the
removable-media path EFI/BOOT/BOOTX64.EFI that firmware without a boot entry falls back to)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from failback_client.convert.devrefs import DeviceResolver, rewrite_kernel_args
from failback_client.convert.files import BACKUP_SUFFIX, Transaction
from failback_client.convert.model import ConversionError, Disk
from failback_client.convert.runner import CommandFailed, chroot

log = logging.getLogger(__name__)

STEP_CONFIG = "boot loader configuration"
STEP_INSTALL = "boot loader installation"
MIB = 1024 * 1024


def grub_tools(root: Path) -> tuple[str, str, list[str]]:
    """(grub-install command, grub.cfg path, command regenerating grub.cfg) of the target."""

    def has(name: str) -> bool:
        return any((root / d / name).exists() for d in ("usr/sbin", "usr/bin", "sbin", "bin"))

    if has("grub-install"):
        cfg = "/boot/grub/grub.cfg"
        return "grub-install", cfg, ["update-grub"] if has("update-grub") else ["grub-mkconfig", "-o", cfg]
    if has("grub2-install"):
        cfg = "/boot/grub2/grub.cfg"
        return "grub2-install", cfg, ["grub2-mkconfig", "-o", cfg]
    raise ConversionError(STEP_CONFIG, "no GRUB 2 found in the target (only GRUB 2 boot loaders are converted)")


def rewrite_defaults(tx: Transaction, resolver: DeviceResolver) -> list[str]:
    """/etc/default/grub and /etc/default/grub.d/*.cfg; returns names that could not be resolved."""
    unresolved: list[str] = []
    files = ["/etc/default/grub"]
    d = tx.host("/etc/default/grub.d")
    if d.is_dir():
        files += sorted(f"/etc/default/grub.d/{p.name}" for p in d.glob("*.cfg"))
    for rel in files:
        text = tx.read(rel)
        if text is None:
            continue
        new, done, missing = rewrite_kernel_args(text, resolver, rel)
        unresolved += missing
        if done:
            tx.write(rel, new, "; ".join(f"{r.old} -> {r.new}" for r in done))
    return unresolved


def regenerate_config(tx: Transaction) -> None:
    _install, cfg, mkconfig = grub_tools(tx.root)
    backup = tx.backup_binary(cfg) if tx.host(cfg).exists() else ""
    try:
        chroot(tx.root, *mkconfig)
    except CommandFailed as exc:
        raise ConversionError(STEP_CONFIG, str(exc)) from None
    tx.record(cfg, "regenerated", " ".join(mkconfig), backup)


def _save_region(tx: Transaction, disk: str, offset: int, size: int, what: str) -> None:
    with open(disk, "rb") as f:
        f.seek(offset)
        data = f.read(size)

    def undo() -> None:
        with open(disk, "r+b") as f:
            f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    tx.on_rollback(what, undo)


def install_bios(tx: Transaction, disk: Disk) -> None:
    install, _cfg, _mk = grub_tools(tx.root)
    platform = "i386-pc"
    if not any((tx.root / d / platform).is_dir() for d in ("usr/lib/grub", "usr/lib/grub2")):
        raise ConversionError(
            STEP_INSTALL,
            f"this machine boots BIOS but the target has no GRUB {platform} modules "
            "(install grub-pc-bin / grub2-pc-modules in it, or boot this machine UEFI)",
        )
    bios_part = next((p for p in disk.partitions if p.is_bios_boot), None)
    if disk.table == "gpt" and bios_part is None:
        raise ConversionError(
            STEP_INSTALL,
            f"{disk.path} has a GPT partition table without a BIOS boot partition: "
            "GRUB cannot be installed for BIOS booting on it",
        )
    # What grub-install overwrites: the boot code before the partition table, the gap after the MBR (MBR
    # disks) and the BIOS boot partition (GPT). Kept to put back if this step fails.
    _save_region(tx, disk.path, 0, MIB, f"{disk.path} first MiB")
    if bios_part is not None:
        _save_region(tx, disk.path, bios_part.start, bios_part.size, f"{disk.path} BIOS boot partition")
    try:
        chroot(tx.root, install, f"--target={platform}", disk.path)
    except CommandFailed as exc:
        raise ConversionError(STEP_INSTALL, str(exc)) from None
    where = f"MBR + BIOS boot partition {bios_part.number}" if bios_part else "MBR + post-MBR gap"
    tx.record(disk.path, "installed", f"GRUB {platform} boot code ({where})")


def _esp_files(esp: Path) -> dict[str, bytes]:
    out = {}
    for p in (esp / "EFI").rglob("*") if (esp / "EFI").is_dir() else []:
        if p.is_file() and not p.name.endswith(BACKUP_SUFFIX):
            out[str(p)] = p.read_bytes()
    return out


def install_uefi(tx: Transaction, esp_mountpoint: str | None, bootloader_id: str, *, removable: bool) -> None:
    install, _cfg, _mk = grub_tools(tx.root)
    if esp_mountpoint is None:
        raise ConversionError(
            STEP_INSTALL,
            "this machine boots UEFI but no EFI system partition is mounted from the "
            "target's fstab (/boot/efi or /efi)",
        )
    if not any((tx.root / d / "x86_64-efi").is_dir() for d in ("usr/lib/grub", "usr/lib/grub2")):
        raise ConversionError(
            STEP_INSTALL,
            "this machine boots UEFI but the target has no GRUB x86_64-efi modules "
            "(install grub-efi-amd64-bin in it, or boot this machine BIOS)",
        )
    esp = tx.host(esp_mountpoint)
    before = _esp_files(esp)
    for path in before:
        tx.backup_binary("/" + os.path.relpath(path, tx.root))
    nvram = (tx.root / "sys/firmware/efi/efivars").is_dir() and any((tx.root / "sys/firmware/efi/efivars").iterdir())
    base = [install, "--target=x86_64-efi", f"--efi-directory={esp_mountpoint}", f"--bootloader-id={bootloader_id}"]
    try:
        chroot(tx.root, *base, *([] if nvram else ["--no-nvram"]))
        if removable:
            chroot(tx.root, *base, "--removable", "--no-nvram")
    except CommandFailed as exc:
        raise ConversionError(STEP_INSTALL, str(exc)) from None
    after = _esp_files(esp)
    for path, data in sorted(after.items()):
        if before.get(path) != data:
            rel = "/" + os.path.relpath(path, tx.root)
            tx.record(
                rel,
                "installed",
                "GRUB x86_64-efi" + (" (firmware boot entry added)" if nvram else ""),
                rel + BACKUP_SUFFIX if path in before else "",
            )
