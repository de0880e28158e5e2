"""Device references by kernel name (/dev/nvme0n1p1, /dev/xvda1, /dev/sda2...) in fstab, crypttab and the
kernel command line: names depend on the controller and probe order, so on this machine they point nowhere
(or at the wrong disk). They are replaced with UUID= (PARTUUID= when a volume has no filesystem UUID).

Which volume an old name meant: the old disk holding the root filesystem is the target disk where the root
was found (the root's own reference tells its old disk name); partition numbers are kept by replication. An
old disk name seen only elsewhere is matched to the one target disk whose partition of that number has the
filesystem type the entry names. What cannot be resolved is reported and left as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from failback_client.convert.model import Volume

KERNEL_NAME_RE = re.compile(
    r"/dev/(?P<disk>nvme\d+n\d+|xvd[a-z]+|sd[a-z]+|vd[a-z]+|hd[a-z]+)(?:p?(?P<part>\d+))?(?![\w/-])"
)
KERNEL_ARG_RE = re.compile(r"(?P<key>\b(?:root|resume))=(?P<dev>/dev/[\w/-]+)")


def split_kernel_name(dev: str) -> tuple[str, int | None] | None:
    """('nvme0n1', 1) for /dev/nvme0n1p1; None when `dev` is not a kernel disk name."""
    m = KERNEL_NAME_RE.fullmatch(dev)
    if not m:
        return None
    disk, part = m.group("disk"), m.group("part")
    if disk.startswith("nvme") and part is not None and f"p{part}" not in dev:
        return None
    return disk, int(part) if part else None


@dataclass
class Replacement:
    old: str
    new: str
    where: str  # e.g. "/ in /etc/fstab"


@dataclass
class DeviceResolver:
    volumes: list[Volume]
    root: Volume
    old_disks: dict[str, str] = field(default_factory=dict)  # old kernel disk name -> target disk path

    def learn_root(self, dev: str) -> None:
        """`dev` is how the instance named its root filesystem: its disk is the root's target disk."""
        split = split_kernel_name(dev)
        if split and split[1] == self.root.partition:
            self.old_disks.setdefault(split[0], self.root.disk)

    def resolve(self, dev: str, fstype: str = "") -> Volume | None:
        split = split_kernel_name(dev)
        if split is None:
            return None
        old_disk, number = split
        if old_disk in self.old_disks:
            target = self.old_disks[old_disk]
            for v in self.volumes:
                if v.disk == target and v.partition == number:
                    return v
            return None
        taken = set(self.old_disks.values())
        candidates = [
            v
            for v in self.volumes
            if v.disk not in taken
            and v.partition == number
            and (not fstype or fstype in ("auto", "none") or _same_type(fstype, v.fstype))
        ]
        if len({v.disk for v in candidates}) == 1:
            self.old_disks[old_disk] = candidates[0].disk
            return candidates[0]
        return None


def _same_type(fstab_type: str, probed: str) -> bool:
    if fstab_type == probed:
        return True
    return {fstab_type, probed} <= {"ext2", "ext3", "ext4"} or {fstab_type, probed} <= {"vfat", "msdos", "fat"}


def stable_name(vol: Volume) -> str:
    if vol.uuid:
        return f"UUID={vol.uuid}"
    if vol.partuuid:
        return f"PARTUUID={vol.partuuid}"
    return ""


def fstab_entries(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def root_reference(fstab: str) -> str | None:
    for fields in fstab_entries(fstab):
        if len(fields) >= 2 and fields[1] == "/":
            return fields[0]
    return None


def rewrite_table(
    text: str, resolver: DeviceResolver, *, source_field: int, type_field: int | None, name: str
) -> tuple[str, list[Replacement], list[str]]:
    """fstab (source field 0) or crypttab (source field 1): kernel names in the source field replaced.
    Comments and spacing are kept. Returns (text, replacements, unresolved names)."""
    out, done, unresolved = [], [], []
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) <= source_field:
            out.append(line)
            continue
        dev = fields[source_field]
        if split_kernel_name(dev) is None:
            out.append(line)
            continue
        fstype = fields[type_field] if type_field is not None and len(fields) > type_field else ""
        vol = resolver.resolve(dev, fstype)
        new = stable_name(vol) if vol else ""
        if not new:
            unresolved.append(dev)
            out.append(line)
            continue
        # Replace the field in place (the n-th whitespace-separated token), keeping the rest of the line.
        spans = [m.span() for m in re.finditer(r"\S+", line)]
        start, end = spans[source_field]
        out.append(line[:start] + new + line[end:])
        label = fields[1] if name.endswith("fstab") else fields[0]
        done.append(Replacement(dev, new, f"{label} in {name}"))
    return "".join(out), done, unresolved


def rewrite_kernel_args(text: str, resolver: DeviceResolver, name: str) -> tuple[str, list[Replacement], list[str]]:
    """root=/dev/... and resume=/dev/... anywhere in a boot loader configuration text."""
    done: list[Replacement] = []
    unresolved: list[str] = []

    def sub(m: re.Match[str]) -> str:
        dev = m.group("dev")
        if split_kernel_name(dev) is None:
            return m.group(0)
        vol = resolver.resolve(dev)
        new = stable_name(vol) if vol else ""
        if not new:
            unresolved.append(dev)
            return m.group(0)
        done.append(Replacement(dev, new, f"{m.group('key')}= in {name}"))
        return f"{m.group('key')}={new}"

    return KERNEL_ARG_RE.sub(sub, text), done, unresolved


def kernel_arg_roots(text: str) -> list[str]:
    return [m.group("dev") for m in KERNEL_ARG_RE.finditer(text) if m.group("key") == "root"]
