"""Finding the operating systems on the target disks: Linux roots (os-release + fstab), Windows (NTFS plus
its boot configuration or Windows/System32). Looks only; mounts read-only."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from failback_client.convert.disks import LINUX_FSTYPES
from failback_client.convert.model import Disk, LinuxSystem, Volume, WindowsSystem
from failback_client.convert.mounts import MountStack
from failback_client.convert.runner import CommandFailed, run

log = logging.getLogger(__name__)

NTFS_OEM_ID = b"NTFS    "
WINDOWS_CHECKS = (
    "Storage driver: the driver for this machine's disk controller (e.g. storahci for AHCI, or the RAID vendor's) "
    "must be installed and set to start at boot, or Windows stops with INACCESSIBLE_BOOT_DEVICE.",
    "Boot configuration (BCD): {bootmgr} and {default} must point at the restored partitions; if it does not "
    "boot, run `bcdboot C:\\Windows` from Windows recovery media.",
    "Boot mode: this machine boots {mode}; the instance's disk was made for {instance}. They must match.",
    "Cloud drivers and agents (AWS ENA/NVMe/PV drivers, EC2Launch, SSM Agent) are not needed here: remove them "
    "after the first boot.",
    "Network: the NIC is new hardware; set any static IP address again on it.",
    "Licensing/activation may need to be redone on this hardware.",
)


def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def describe_linux_root(mountpoint: Path, volume: Volume) -> LinuxSystem | None:
    """A LinuxSystem when `mountpoint` holds a root filesystem (os-release and fstab), else None."""
    rel = _read(mountpoint / "etc/os-release") or _read(mountpoint / "usr/lib/os-release")
    fstab = _read(mountpoint / "etc/fstab")
    if rel is None or fstab is None:
        return None
    info = parse_os_release(rel)
    system = LinuxSystem(
        root=volume,
        name=info.get("PRETTY_NAME", info.get("NAME", "Linux")),
        os_id=info.get("ID", ""),
        version=info.get("VERSION_ID", ""),
        fstab=fstab,
    )
    if (mountpoint / "usr/sbin/update-initramfs").exists() and (mountpoint / "etc/initramfs-tools").is_dir():
        system.initramfs_tool = "initramfs-tools"
    elif any((mountpoint / p / "dracut").exists() for p in ("usr/bin", "usr/sbin", "sbin")):
        system.initramfs_tool = "dracut"
    elif any((mountpoint / p / "mkinitrd").exists() for p in ("usr/bin", "usr/sbin", "sbin")):
        system.initramfs_tool = "mkinitrd"
    kinds = []
    for platform in ("i386-pc", "x86_64-efi"):
        if (mountpoint / "usr/lib/grub" / platform).is_dir():
            kinds.append(platform)
    if kinds:
        system.boot_loader = "GRUB 2 (" + ", ".join(kinds) + " installed)"
    elif (mountpoint / "usr/lib/grub2").is_dir() or (mountpoint / "boot/grub2").is_dir():
        system.boot_loader = "GRUB 2 (grub2 layout)"
    elif (mountpoint / "usr/lib/systemd/boot/efi").is_dir() or (mountpoint / "boot/loader/entries").is_dir():
        system.boot_loader = "systemd-boot"
    else:
        system.boot_loader = "none found"
    return system


def find_linux(volumes: list[Volume], work: Path, notes: list[str] | None = None) -> list[LinuxSystem]:
    """Mount each Linux filesystem read-only in turn and keep those that are a root filesystem. Filesystems
    that cannot be mounted are added to `notes` (for the report)."""
    found = []
    for i, vol in enumerate(v for v in volumes if v.fstype in LINUX_FSTYPES):
        where = work / f"probe-{i}"
        with MountStack() as mounts:
            # norecovery keeps a dirty XFS/ext4 log from being replayed by a read-only look.
            opts = "ro,norecovery" if vol.fstype in ("xfs", "ext4", "ext3") else "ro"
            try:
                mounts.mount(vol.node, where, options=opts, fstype=vol.fstype)
            except CommandFailed as exc:
                log.warning("cannot mount %s (%s) to look at it: %s", vol.node, vol.fstype, exc)
                if notes is not None:
                    notes.append(
                        f"{vol.node} ({vol.fstype}) could not be mounted to look for a system on it: "
                        f"{str(exc).splitlines()[0]}"
                    )
                continue
            system = describe_linux_root(where, vol)
            if system is None and vol.fstype == "btrfs" and (where / "@").is_dir():
                system = describe_linux_root(where / "@", vol)
            if system is not None:
                found.append(system)
        _rmdir_quietly(where)
    return found


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def has_ntfs_signature(disk: str, offset: int) -> bool:
    try:
        with open(disk, "rb") as f:
            f.seek(offset + 3)
            return f.read(8) == NTFS_OEM_ID
    except OSError:
        return False


def fat_has(disk: str, offset: int, path: str) -> bool:
    """Whether the FAT filesystem at byte `offset` of `disk` holds `path` (mtools: no mount, no root)."""
    proc = run(["mdir", "-b", "-i", f"{disk}@@{offset}", f"::{path}"], check=False, env={"MTOOLS_SKIP_CHECK": "1"})
    return proc.returncode == 0


def ntfs_has(node: str, path: str) -> bool | None:
    """Whether the NTFS at `node` holds `path` (ntfs-3g's ntfsls, no mount); None when it cannot be told."""
    if not shutil.which("ntfsls") or not os.path.exists(node):
        return None
    proc = run(["ntfsls", "--force", "-p", path, node], check=False)
    return proc.returncode == 0


def find_windows(disk: Disk, *, this_machine_mode: str) -> WindowsSystem | None:
    """Windows on `disk`: an NTFS partition plus a boot configuration store or a Windows/System32 directory."""
    ntfs = [p for p in disk.partitions if p.fstype == "ntfs" or has_ntfs_signature(disk.path, p.start)]
    if not ntfs:
        return None
    evidence = [f"NTFS on partition {p.number} ({p.node})" for p in ntfs]
    instance = "unknown boot mode"
    for p in disk.partitions:
        if p.fstype == "vfat" and fat_has(disk.path, p.start, "/EFI/Microsoft/Boot/BCD"):
            evidence.append(f"UEFI boot configuration EFI/Microsoft/Boot/BCD on partition {p.number}")
            instance = "UEFI"
    for p in ntfs:
        if ntfs_has(p.node, "/Windows/System32"):
            evidence.append(f"Windows/System32 on partition {p.number}")
        if ntfs_has(p.node, "/Boot/BCD"):
            evidence.append(f"BIOS boot configuration Boot/BCD on partition {p.number}")
            instance = "BIOS" if instance == "unknown boot mode" else "BIOS and UEFI"
    if len(evidence) == len(ntfs):
        # NTFS alone is a data volume as far as we can tell.
        return None
    checks = [c.replace("{mode}", this_machine_mode.upper()).replace("{instance}", instance) for c in WINDOWS_CHECKS]
    return WindowsSystem(disk=disk.path, evidence=evidence, checks=checks)


def instance_boot_mode(disk: Disk) -> str:
    """How the instance booted from `disk`, as far as the disk tells: BIOS (GRUB boot code with a BIOS boot
    partition or in the MBR), UEFI (an ESP with an EFI directory), both, or unknown."""
    try:
        with open(disk.path, "rb") as f:
            mbr = f.read(512)
    except OSError:
        mbr = b""
    bios = any(p.is_bios_boot for p in disk.partitions) or b"GRUB" in mbr[:440]
    uefi = any(p.is_esp and p.fstype == "vfat" and fat_has(disk.path, p.start, "/EFI") for p in disk.partitions)
    return {(True, True): "BIOS and UEFI", (True, False): "BIOS", (False, True): "UEFI"}.get((bios, uefi), "unknown")
