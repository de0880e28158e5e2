"""Mounts and loop devices under a build tree: refuse to copy a tree with a live mount in it, and clear
what a killed run left behind.

Why: a chroot's /proc (or /dev) that stayed mounted under a tree gets copied into an image by `cp -a`
(a 2 GiB image filled up with /proc), and a plain `rm -rf` of such a tree deletes through a /dev bind
mount into the host's /dev. So every tree is checked before it is copied, packed or removed.
Read from /proc/self/mountinfo and /sys/block/loop*/loop/backing_file (no subprocess needed to look).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from image.core.errors import ImageError
from image.core.run import run

log = logging.getLogger("image.core.mounts")

MOUNTINFO = Path("/proc/self/mountinfo")
SYS_BLOCK = Path("/sys/block")


class LiveMountError(ImageError, RuntimeError):
    """A tree that is about to be copied, packed or removed has something mounted below it."""


@dataclass(frozen=True)
class Mount:
    target: Path  # the mount point
    source: str  # what is mounted there (device, "proc", "tmpfs", ...)
    fstype: str


@dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN
    backing_file: Path  # the image file it is attached to (as the kernel recorded it)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """Every mount this process sees, in mount order."""
    out = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 2:
            out.append(Mount(Path(_unescape(fields[4])), _unescape(rest[1]), rest[0]))
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def mounts_under(tree: Path, mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The mounts at or below `tree` (resolved), deepest first (the order to unmount them in)."""
    root = tree.resolve()
    found = [m for m in mounts(mountinfo) if _inside(m.target, root)]
    return sorted(found, key=lambda m: len(m.target.parts), reverse=True)


def loop_devices(sys_block: Path = SYS_BLOCK) -> list[LoopDevice]:
    """Every attached loop device and its backing file."""
    out = []
    for backing in sorted(sys_block.glob("loop*/loop/backing_file")):
        name = backing.parent.parent.name
        try:
            text = backing.read_text().rstrip("\n")
        except OSError:  # detached between the glob and the read
            continue
        out.append(LoopDevice(f"/dev/{name}", Path(text.removesuffix(" (deleted)"))))
    return out


def loop_devices_under(tree: Path, sys_block: Path = SYS_BLOCK) -> list[LoopDevice]:
    """The loop devices whose image file lies below `tree`."""
    root = tree.resolve()
    return [d for d in loop_devices(sys_block) if _inside(d.backing_file, root)]


def require_no_mounts(tree: Path, action: str, *, itself: bool = False) -> None:
    """Raise LiveMountError naming each mount below `tree` (and `tree` itself when `itself`) and how to
    free it, before `action` (e.g. "copy it into the image") reads the tree."""
    root = tree.resolve()
    found = [m for m in mounts_under(tree) if itself or m.target != root]
    if found:
        listed = "\n".join(f"  {m.target} ({m.fstype} {m.source})" for m in reversed(found))
        names = " ".join(str(t) for t in _tops(found))
        raise LiveMountError(
            f"{tree}: refusing to {action}: something is still mounted below it (a chroot's mount that a tool "
            f"failed to unmount?):\n{listed}\nfree it with `umount -R {names}` (if it says 'target is busy', "
            f"find the processes still using it with `fuser -vm {names}`, or detach it with `umount -R -l`), "
            f"then retry"
        )


def _tops(found: list[Mount]) -> list[Path]:
    """The mount points of `found` that are not below another of them."""
    return sorted({m.target for m in found if not any(_inside(m.target.parent, o.target) for o in found)})


def release(work: Path) -> None:
    """Unmount everything mounted at or below `work` (lazily when busy) and detach the loop devices attached
    to images below it, so that a failed or killed run leaves nothing attached. Keeps the files."""
    found = mounts_under(work)
    for top in _tops(found):
        # A slave first: unmounting the copy of a shared mount (an rbind /dev) must not unmount the host's.
        run(["mount", "--make-rslave", str(top)], check=False, capture=True)
    for m in found:
        log.warning("%s: unmounting %s (%s), left by a failed run", work, m.target, m.fstype)
        if run(["umount", str(m.target)], check=False, capture=True).returncode != 0:
            run(["umount", "--lazy", str(m.target)], check=False, capture=True)
    for d in loop_devices_under(work):
        log.warning("%s: detaching %s (%s), left by a failed run", work, d.device, d.backing_file)
        run(["losetup", "--detach", d.device], check=False, capture=True)


def clear_leftovers(work: Path) -> None:
    """Remove `work`, left behind by a run that failed or was killed half-way: release() it, then delete it.
    Never deletes through a mount: raises LiveMountError when one could not be unmounted."""
    if not work.exists():
        return
    release(work)
    require_no_mounts(work, "remove it", itself=True)
    left = loop_devices_under(work)
    if left:
        raise RuntimeError(
            f"{work}: loop devices still attached to images below it: "
            f"{', '.join(d.device for d in left)}; detach them (`losetup -d DEV`), then retry"
        )
    shutil.rmtree(work)
