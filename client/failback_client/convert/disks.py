"""Reading the target disks without changing them: partition tables (sfdisk --json), filesystems (blkid's
low-level probe, which needs no udev) and LVM volumes (lvm2 tools)."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time

from failback_client.convert.model import Disk, Partition, Volume
from failback_client.convert.runner import CommandFailed, run

log = logging.getLogger(__name__)

SECTOR = 512
LINUX_FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")


def parse_export(text: str) -> dict[str, str]:
    """blkid -o export output as a mapping."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def probe(path: str, offset: int | None = None, size: int | None = None) -> dict[str, str]:
    """What blkid's low-level probe finds at `path` (optionally a byte range of it); {} for nothing."""
    cmd = ["blkid", "-p", "-o", "export"]
    if offset is not None:
        cmd += ["-O", str(offset)]
    if size is not None:
        cmd += ["-S", str(size)]
    proc = run([*cmd, path], check=False)
    if proc.returncode == 2:  # nothing recognised
        return {}
    if proc.returncode != 0:
        raise CommandFailed([*cmd, path], proc.returncode, proc.stdout + proc.stderr)
    return parse_export(proc.stdout)


def partition_number(node: str) -> int:
    m = re.search(r"(\d+)$", node)
    if not m:
        raise ValueError(f"cannot tell the partition number of {node}")
    return int(m.group(1))


def parse_sfdisk(data: dict) -> tuple[str, list[Partition]]:
    """(label, partitions) from sfdisk --json output."""
    table = data["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    parts = [
        Partition(
            number=partition_number(p["node"]),
            node=p["node"],
            start=int(p["start"]) * sector,
            size=int(p["size"]) * sector,
            type_code=str(p.get("type", "")),
            partuuid=str(p.get("uuid", "")),
        )
        for p in table.get("partitions", [])
    ]
    return table.get("label", ""), parts


def inspect_disk(path: str) -> Disk:
    """The layout of one target disk. A disk it cannot interpret gets `problem` set (and is left alone)."""
    disk = Disk(path=path)
    if not os.path.exists(path):
        disk.problem = "no such device"
        return disk
    proc = run(["sfdisk", "--json", path], check=False)
    if proc.returncode == 0 and proc.stdout.strip():
        disk.table, disk.partitions = parse_sfdisk(json.loads(proc.stdout))
        for p in disk.partitions:
            found = probe(path, p.start, p.size)
            p.fstype, p.uuid, p.label = found.get("TYPE", ""), found.get("UUID", ""), found.get("LABEL", "")
        if not disk.partitions:
            disk.problem = f"{disk.table} partition table without partitions"
        return disk
    whole = probe(path)
    if whole.get("TYPE"):
        disk.whole_fstype, disk.whole_uuid = whole["TYPE"], whole.get("UUID", "")
        return disk
    disk.problem = "no partition table and no filesystem recognised"
    return disk


def is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def ensure_partition_nodes(disk: Disk) -> None:
    """Make sure the kernel has device nodes for the disk's partitions (without udev, e.g. right after a
    loop device is attached, they can be missing): partx only updates the kernel's view, never the disk."""
    if not is_block(disk.path) or all(is_block(p.node) for p in disk.partitions):
        return
    run(["partx", "--add", disk.path], check=False)
    run(["partx", "--update", disk.path], check=False)
    for _ in range(50):
        if all(is_block(p.node) for p in disk.partitions):
            return
        time.sleep(0.1)
    missing = [p.node for p in disk.partitions if not is_block(p.node)]
    raise CommandFailed(["partx", "--add", disk.path], 1, f"no device nodes for {', '.join(missing)}")


def volumes(disks: list[Disk], *, lvm: bool = True) -> tuple[list[Volume], list[str]]:
    """Every filesystem on the disks (partitions, whole disks, LVM logical volumes), plus notes for the report."""
    found: list[Volume] = []
    notes: list[str] = []
    pvs: list[tuple[Disk, Partition]] = []
    for disk in disks:
        if disk.problem:
            continue
        if disk.whole_fstype:
            found.append(Volume(disk.path, disk.whole_fstype, disk.whole_uuid, "", disk.path))
        for p in disk.partitions:
            if p.fstype == "LVM2_member":
                pvs.append((disk, p))
            elif p.fstype:
                found.append(Volume(p.node, p.fstype, p.uuid, p.label, disk.path, p.number, p.partuuid))
            if p.fstype in ("linux_raid_member", "crypto_LUKS"):
                notes.append(f"{p.node}: {p.fstype} is not opened by conversion (assemble/open it and re-run)")
    if pvs and lvm:
        found += lvm_volumes(pvs, notes)
    elif pvs:
        notes.append("LVM physical volumes found but LVM is not used here")
    return found, notes


def lvm_volumes(pvs: list[tuple[Disk, Partition]], notes: list[str]) -> list[Volume]:
    """Activate the volume groups on the given physical volumes and list their logical volumes."""
    nodes = [p.node for _d, p in pvs]
    try:
        report = json.loads(run(["pvs", "--reportformat", "json", "-o", "pv_name,vg_name", *nodes]).stdout)
    except (CommandFailed, ValueError) as exc:
        notes.append(f"LVM physical volumes {', '.join(nodes)} could not be read (is lvm2 installed?): {exc}")
        return []
    vg_of = {r["pv_name"]: r["vg_name"] for r in report["report"][0]["pv"] if r.get("vg_name")}
    disk_of_vg: dict[str, str] = {}
    for disk, p in pvs:
        if p.node in vg_of:
            disk_of_vg.setdefault(vg_of[p.node], disk.path)
    out: list[Volume] = []
    for vg, vg_disk in sorted(disk_of_vg.items()):
        # No udev on some systems: --sysinit + no udev sync keeps vgchange from waiting for it.
        run(["vgchange", "--activate", "y", "--sysinit", vg])
        lvs = json.loads(run(["lvs", "--reportformat", "json", "-o", "lv_path,lv_name", vg]).stdout)
        for lv in lvs["report"][0]["lv"]:
            path = lv["lv_path"]
            info = probe(path)
            if info.get("TYPE"):
                out.append(Volume(path, info["TYPE"], info.get("UUID", ""), info.get("LABEL", ""), vg_disk))
    return out
