"""Local disks of this machine, from /sys/block and udev's /dev/disk/by-* links, read under a root path.

The root parameter lets tests use recorded sysfs/udev trees (tests/data/sysroots/...). Skipped: loop, ram,
zram, optical, floppy, device-mapper and md devices, and the boot medium itself (the disk holding the
LiveCD: mounted at /run/live/medium, or labelled DRSFAILBACK) and the seed volume (FBSEED), which are
flagged. Each disk carries what uses it now (disk_use.py): an in-use disk is never a target.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from failback_client.disk_use import DiskUse, fat_label, uses
from failback_client.machine import _read, _under

log = logging.getLogger(__name__)

SECTOR = 512
BOOT_LABEL = "DRSFAILBACK"
SEED_LABEL = "FBSEED"  # the unattended seed volume (client/SEED.md): read, never a failback target
LIVE_MEDIUM_MOUNT = "/run/live/medium"
SKIP_PREFIXES = ("loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd")
PERSISTENT_KINDS = ("by-path", "by-id", "by-uuid")
ISO9660_VOLUME_ID = (16 * 2048 + 40, 32)  # offset, length of the primary volume descriptor's volume id


@dataclass
class LocalDisk:
    name: str  # kernel name, e.g. sda
    size_bytes: int
    by_path: list[str] = field(default_factory=list)
    by_id: list[str] = field(default_factory=list)
    by_uuid: list[str] = field(default_factory=list)  # of the disk or any of its partitions
    model: str = ""
    removable: bool = False
    boot_medium: bool = False  # the LiveCD's medium or the seed volume: never listed, never a target
    partitions: list[str] = field(default_factory=list)
    in_use: list[DiskUse] = field(default_factory=list)  # why it must not be written now (empty: free)

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    def names(self, kind: str) -> list[str]:
        """The names this disk has in one --dm-value-format (dev-name, by-path, by-id, by-uuid)."""
        if kind == "dev-name":
            return [self.path]
        return list(getattr(self, kind.replace("-", "_")))


def _partitions(root: str, disk: str) -> list[str]:
    base = _under(root, f"/sys/block/{disk}")
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    return [e for e in entries if e.startswith(disk) and os.path.exists(os.path.join(base, e, "partition"))]


def _persistent_links(root: str, kind: str) -> dict[str, list[str]]:
    """kernel name (disk or partition) -> names in /dev/disk/<kind>."""
    result: dict[str, list[str]] = {}
    directory = _under(root, f"/dev/disk/{kind}")
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return result
    for entry in entries:
        target = os.readlink(os.path.join(directory, entry)) if os.path.islink(os.path.join(directory, entry)) else ""
        if target:
            result.setdefault(os.path.basename(target), []).append(entry)
    return result


def _mounted_devices(root: str, mountpoint: str) -> set[str]:
    names = set()
    for line in _read(_under(root, "/proc/mounts")).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == mountpoint and parts[0].startswith("/dev/"):
            names.add(os.path.basename(parts[0]))
    return names


def _iso_volume_id(root: str, name: str) -> str:
    offset, length = ISO9660_VOLUME_ID
    try:
        with open(_under(root, f"/dev/{name}"), "rb") as f:
            f.seek(offset - 40)
            header = f.read(40 + length)
    except OSError:
        return ""
    if len(header) < 40 + length or header[1:6] != b"CD001":
        return ""
    return header[40:].decode("ascii", "replace").strip()


def discover(root: str = "/", *, include_loop: bool = False) -> list[LocalDisk]:
    """All local disks a recovery volume could be written to (plus the boot medium, flagged), sorted by name."""
    block = _under(root, "/sys/block")
    try:
        names = sorted(os.listdir(block))
    except OSError:
        log.warning("cannot list %s: no local disks found", block)
        return []
    links = {kind: _persistent_links(root, kind) for kind in (*PERSISTENT_KINDS, "by-label")}
    live = _mounted_devices(root, LIVE_MEDIUM_MOUNT)
    disks: list[LocalDisk] = []
    for name in names:
        if name.startswith(SKIP_PREFIXES) and not (include_loop and name.startswith("loop")):
            continue
        size_text = _read(os.path.join(block, name, "size"))
        if not size_text.isdigit() or int(size_text) == 0:
            continue  # empty card readers, unloaded loop devices
        parts = _partitions(root, name)
        disk = LocalDisk(
            name=name,
            size_bytes=int(size_text) * SECTOR,
            by_path=[n for n in links["by-path"].get(name, []) if "-part" not in n],
            by_id=[n for n in links["by-id"].get(name, []) if "-part" not in n],
            by_uuid=sorted(u for member in (name, *parts) for u in links["by-uuid"].get(member, [])),
            model=_read(os.path.join(block, name, "device", "model")),
            removable=_read(os.path.join(block, name, "removable")) == "1",
            partitions=parts,
        )
        members = {name, *parts}
        labels = {label for member in members for label in links["by-label"].get(member, [])}
        labels |= {_iso_volume_id(root, name)} | {fat_label(root, m) for m in (name, *parts)}
        disk.in_use = uses(root, name, [name, *parts])
        if members & live or BOOT_LABEL in labels:
            disk.in_use.insert(
                0, DiskUse("it is the failback client's boot medium", "start the client from another medium")
            )
        if SEED_LABEL in labels:
            disk.in_use.insert(
                0,
                DiskUse(
                    f"it is the seed volume (label {SEED_LABEL}) the client reads its settings from",
                    "take the seed volume out or relabel it, then start the client again",
                ),
            )
        disk.boot_medium = bool(members & live or labels & {BOOT_LABEL, SEED_LABEL})
        disks.append(disk)
    return disks


def targets(disks: list[LocalDisk]) -> list[LocalDisk]:
    """The disks that may receive a recovery volume (never the boot medium)."""
    return [d for d in disks if not d.boot_medium]


def free_targets(disks: list[LocalDisk]) -> list[LocalDisk]:
    """The disks that may receive a recovery volume now: not the boot medium, and used by nothing."""
    return [d for d in disks if not d.boot_medium and not d.in_use]


def human_size(size: int) -> str:
    gib = size / 2**30
    if gib >= 1:
        return f"{gib:.2f} GiB".replace(".00 GiB", " GiB")
    return f"{size / 2**20:.1f} MiB"
