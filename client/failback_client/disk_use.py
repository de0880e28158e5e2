"""What keeps a local disk from being a failback target: mounted (itself or a partition), active swap, a
holder (LVM, MD RAID, dm-crypt, multipath), the client's boot medium, the seed volume.

Read under a root path like devices.py (recorded trees in tests): /proc/self/mountinfo (or /proc/mounts),
/proc/swaps and /sys/block/*/holders. Each use says what it is and how the admin frees the disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from failback_client.machine import _read, _under

FAT_LABELS = ((0x47, b"FAT32   ", 0x52), (0x2B, b"FAT", 0x36))  # label offset, fs-type text, its offset


@dataclass(frozen=True)
class DiskUse:
    what: str  # e.g. "sda1 is mounted at /boot"
    free: str  # e.g. "umount /boot"


def _unescape(field: str) -> str:
    """Mount tables write space, tab, newline and backslash as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _dev_numbers(root: str, disk: str, members: Iterable[str]) -> dict[str, str]:
    """ "major:minor" -> kernel name, for the disk and its partitions (absent in recorded trees: {})."""
    numbers = {}
    for name in members:
        path = f"/sys/block/{disk}/dev" if name == disk else f"/sys/block/{disk}/{name}/dev"
        number = _read(_under(root, path))
        if re.fullmatch(r"\d+:\d+", number):
            numbers[number] = name
    return numbers


def mounts(root: str) -> list[tuple[str, str, str]]:
    """(major:minor or "", source, mount point) of every mount: /proc/self/mountinfo, else /proc/mounts."""
    info = _read(_under(root, "/proc/self/mountinfo"))
    result = []
    if info:
        for line in info.splitlines():
            fields = line.split()
            if "-" not in fields[6:] or len(fields) < 10:
                continue
            dash = fields.index("-", 6)
            if dash + 2 < len(fields):
                result.append((fields[2], _unescape(fields[dash + 2]), _unescape(fields[4])))
        return result
    for line in _read(_under(root, "/proc/mounts")).splitlines():
        fields = line.split()
        if len(fields) >= 2:
            result.append(("", _unescape(fields[0]), _unescape(fields[1])))
    return result


def swaps(root: str) -> list[str]:
    """The active swap areas' file names (/dev/sdb2, /swapfile) from /proc/swaps."""
    lines = _read(_under(root, "/proc/swaps")).splitlines()[1:]
    return [_unescape(line.split()[0]) for line in lines if line.split()]


def _holder_use(root: str, member: str, holder: str) -> DiskUse:
    base = _under(root, f"/sys/block/{holder}")
    if holder.startswith("md"):
        level = _read(os.path.join(base, "md", "level")) or "RAID"
        return DiskUse(
            f"{member} is a member of the active MD {level} array /dev/{holder}", f"stop it: mdadm --stop /dev/{holder}"
        )
    name = _read(os.path.join(base, "dm", "name")) or holder
    uuid = _read(os.path.join(base, "dm", "uuid"))
    if uuid.startswith("LVM-"):
        vg = name.split("-", 1)[0].replace("--", "-") if "-" in name else name
        return DiskUse(
            f"{member} holds the active LVM logical volume {name} (/dev/{holder})", f"deactivate it: vgchange -an {vg}"
        )
    if uuid.startswith("CRYPT-"):
        return DiskUse(
            f"{member} is open as the dm-crypt mapping {name} (/dev/{holder})", f"close it: cryptsetup close {name}"
        )
    return DiskUse(
        f"{member} is used by the device-mapper device {name} (/dev/{holder})", f"remove it: dmsetup remove {name}"
    )


def holders(root: str, disk: str, members: Iterable[str]) -> list[DiskUse]:
    """Active stacked devices on the disk or a partition: /sys/block/<disk>[/<part>]/holders/*."""
    uses: list[DiskUse] = []
    for member in members:
        path = f"/sys/block/{disk}/holders" if member == disk else f"/sys/block/{disk}/{member}/holders"
        try:
            names = sorted(os.listdir(_under(root, path)))
        except OSError:
            continue
        uses.extend(_holder_use(root, member, holder) for holder in names)
    return uses


def fat_label(root: str, name: str) -> str:
    """The volume label of a FAT file system on /dev/<name> ("" if none): udev's by-label link may be
    missing (no udev in a container, or not yet made at boot), the boot sector never is."""
    try:
        with open(_under(root, f"/dev/{name}"), "rb") as f:
            sector = f.read(512)
    except OSError:
        return ""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return ""
    for label_at, fs_type, type_at in FAT_LABELS:
        if sector[type_at : type_at + len(fs_type)] == fs_type:
            return sector[label_at : label_at + 11].decode("ascii", "replace").strip()
    return ""


def uses(root: str, disk: str, members: list[str]) -> list[DiskUse]:
    """Every reason the disk `disk` (with partitions `members[1:]`) must not be written."""
    found: list[DiskUse] = []
    numbers = _dev_numbers(root, disk, members)
    names = set(members)
    for number, source, mountpoint in mounts(root):
        member = numbers.get(number) or (os.path.basename(source) if source.startswith("/dev/") else "")
        if member in names:
            found.append(DiskUse(f"{member} is mounted at {mountpoint}", f"unmount it: umount {mountpoint}"))
    for area in swaps(root):
        if area.startswith("/dev/") and os.path.basename(area) in names:
            found.append(DiskUse(f"{os.path.basename(area)} is active swap", f"turn it off: swapoff {area}"))
    found.extend(holders(root, disk, members))
    return found


def describe(found: list[DiskUse]) -> str:
    """ "sda1 is mounted at /boot; free it first (unmount it: umount /boot)"."""
    what = "; ".join(dict.fromkeys(u.what for u in found))
    free = "; ".join(dict.fromkeys(u.free for u in found))
    return f"{what}; free it first ({free}) or choose another disk"
