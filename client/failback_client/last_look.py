"""The last look before the first write: each target disk with what is on it now, and the recovery volume
that will overwrite it. An interactive run goes on only when the admin types OVERWRITE; a --no-prompt run
with an explicit mapping, or a mapping from the seed, counts as consent and puts the same table into the log.

What is on a disk is read from the disk itself, with the conversion's reader (convert/disks.py: sfdisk for
the partition table, blkid's low-level probe at each partition's offset) and debugfs for an ext file
system's /etc/os-release: no mount, nothing written, no udev needed (partition nodes may not exist yet).
Under FAILBACK_SYSROOT the disks are the files of the recorded tree, never this machine's devices.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from failback_client.console import Console
from failback_client.convert.disks import inspect_disk
from failback_client.convert.runner import CommandFailed, run
from failback_client.devices import LocalDisk, discover, human_size
from failback_client.errors import EXIT_MAPPING, ClientError
from failback_client.machine import _read, _under
from failback_client.mapping import MappedVolume, MappingError, refuse_in_use
from failback_client.settings import Settings

log = logging.getLogger(__name__)

CONFIRM_WORD = "OVERWRITE"
EXT_TYPES = ("ext2", "ext3", "ext4")


class NotConfirmed(ClientError):
    """The admin did not confirm the overwrite (or --no-prompt had no explicit mapping): nothing written."""

    exit_status = EXIT_MAPPING


def _os_release(device: str, offset: int, fs_type: str) -> str:
    """PRETTY_NAME of /etc/os-release on an ext file system, read without mounting (debugfs opens read-only)."""
    if fs_type not in EXT_TYPES or not shutil.which("debugfs"):
        return ""
    target = f"{device}?offset={offset}" if offset else device
    proc = run(["debugfs", "-R", "cat /etc/os-release", target], check=False, timeout=30)
    match = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', proc.stdout, re.M)
    return match.group(1).strip() if match else ""


def on_disk(device: str) -> str:
    """One line: the partition table, each partition's file system, label and size, an OS found on it."""
    if not os.path.exists(device):
        return "cannot be read (no device node)"
    try:
        disk = inspect_disk(device)
    except CommandFailed as e:
        return f"cannot be read ({e.output.strip().splitlines()[-1] if e.output.strip() else e})"
    if disk.whole_fstype:
        found = _os_release(device, 0, disk.whole_fstype)
        return f"no partition table; {disk.whole_fstype} on the whole disk" + (f" [{found}]" if found else "")
    if not disk.table:
        return "empty (no partition table, no file system found)"
    parts = []
    for p in disk.partitions:
        found = _os_release(device, p.start, p.fstype)
        what = " ".join(
            x
            for x in (
                f"p{p.number}",
                p.fstype or "no file system",
                f"'{p.label}'" if p.label else "",
                human_size(p.size),
            )
            if x
        )
        parts.append(what + (f" [{found}]" if found else ""))
    return f"{disk.table} partition table: " + (", ".join(parts) or "no partitions")


def _identity(root: str, disk: LocalDisk) -> str:
    base = _under(root, f"/sys/block/{disk.name}/device")
    serial = _read(os.path.join(base, "serial"))
    ident = f"serial {serial}" if serial else (f"by-id {disk.by_id[0]}" if disk.by_id else "")
    return ", ".join(x for x in (disk.model, ident) if x) or "-"


def rows(root: str, volumes: list[MappedVolume]) -> list[tuple[str, ...]]:
    result: list[tuple[str, ...]] = []
    for v in volumes:
        if v.local is None:
            continue
        result.append(
            (
                v.local.path,
                human_size(v.local.size_bytes),
                _identity(root, v.local),
                on_disk(_under(root, v.local.path)),
                f"{v.recovery.name} ({human_size(v.recovery.size_bytes)})",
            )
        )
    return result


def still_free(settings: Settings, volumes: list[MappedVolume]) -> None:
    """The disks are read again: one mounted (or swapped on, or assembled) since the mapping is refused now."""
    now = {d.path: d for d in discover(settings.sysroot, include_loop=settings.include_loop)}
    for v in volumes:
        if v.local is None:
            continue
        disk = now.get(v.local.path)
        if disk is None:
            raise NotConfirmed(
                f"{v.local.path}, mapped to {v.recovery.name}, is gone: nothing was written; "
                "check the disks and start the client again"
            )
        try:
            refuse_in_use(disk, v.local.path, v.recovery.name)
        except MappingError as e:
            raise NotConfirmed(f"{e}. It came into use after the mapping: nothing was written") from None


def confirm_overwrite(settings: Settings, console: Console, volumes: list[MappedVolume], instance_id: str) -> None:
    """The last look: show what each target holds now; go on only with consent (else NotConfirmed)."""
    still_free(settings, volumes)
    table = rows(settings.sysroot, volumes)
    disks = ", ".join(r[0] for r in table)
    console.heading(f"Last look: these local disks will be OVERWRITTEN with {instance_id}'s volumes")
    if console.plain:  # a serial console is often 80 columns: one block per disk, not a wide table
        for path, size, ident, now, by in table:
            console.info(f"{path}  {size}  {ident}")
            console.info(f"    on it now:      {now}")
            console.info(f"    overwritten by: {by}")
    else:
        console.table(("Local disk", "Size", "Model / serial", "On it now", "Overwritten by"), table)
    origin = settings.origin.get("device_mapping", "the arguments")
    if settings.no_prompt or (settings.device_mapping and origin.startswith("seed")):
        if not settings.device_mapping:
            raise NotConfirmed(
                f"--no-prompt without an explicit volume mapping: nothing is overwritten without consent. Nothing "
                f"was written. Give the mapping shown above with --device-mapping (or DEVICE_MAPPING, or the "
                f"seed) to overwrite {disks}"
            )
        how = "--no-prompt with the volume mapping" if settings.no_prompt else "The volume mapping"
        console.info(f"{how} from {origin}: taken as consent to overwrite {disks}.")
        return
    console.info(f"Everything now on {disks} will be lost. Anything but {CONFIRM_WORD} stops here, writing nothing.")
    answer = console.ask(f"Type {CONFIRM_WORD} to overwrite {disks}: ").strip()
    if answer.upper() != CONFIRM_WORD:
        raise NotConfirmed(
            f"Not confirmed ({answer!r} typed): nothing was written to {disks}. Start the client again to fail back."
        )
    console.ok(f"Confirmed: {disks} will be overwritten")
