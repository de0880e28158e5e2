"""Guide step 19: after the verified final sync, conversion (hook), the completion report, eject and reboot.

Order matters: the replication software has flushed and verified every volume; conversion (when wired in)
then adapts the restored system to this hardware; only then is consistency reported with finalSync=True,
which makes DRS mark the failback job's server LAUNCHED and the job COMPLETED (FAILBACK_COMPLETED). The
medium is ejected and the machine rebooted into the restored system, on the LiveCD only and unless
REBOOT=0 / --no-reboot.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from failback_client.console import Console
from failback_client.devices import LIVE_MEDIUM_MOUNT
from failback_client.errors import EXIT_CONVERT, EXIT_SERVICE, ClientError
from failback_client.replicate import iso
from failback_client.replication_api import ReplicationApi
from failback_client.settings import Settings

log = logging.getLogger(__name__)

SUCCESS_MESSAGE = "The failback completed successfully"
CDROMEJECT = 0x5309  # linux/cdrom.h
CDROM_LOCKDOOR = 0x5329
RB_AUTOBOOT = 0x01234567  # reboot(2): LINUX_REBOOT_CMD_RESTART


def after_final_sync(targets: list[Path], console: Console, settings: Settings) -> None:
    """Conversion (guide step 18, failback_client.convert) after the verified final sync and before the
    completion report. A failure raises a ClientError so that no completion is reported: conversion has put
    back every file it changed, the disks are as replicated, and running the client again re-runs it."""
    if not settings.convert:
        console.info("Conversion skipped (CONVERT=0 / --no-convert): the restored volumes are left as replicated")
        return
    from failback_client.convert import convert

    report = convert(targets, console)
    if not report.ok:
        raise ClientError(
            f"Conversion failed at step '{report.failed_step}': {report.error}. The disks are as "
            "replicated (changed files were put back); fix the cause and start the client again",
            exit_status=EXIT_CONVERT,
        )


def report_completion(rapi: ReplicationApi, console: Console) -> str | None:
    """NotifyConsistencyAttainedForDrs(finalSync=True): DRS completes the failback job."""
    state = rapi.consistency_attained(iso(datetime.now(UTC)), final_sync=True)
    if state != "FAILBACK_COMPLETED":
        raise ClientError(
            f"DRS did not mark the failback completed after the final sync (failback state {state}); "
            "check the recovery instance in the DRS console",
            exit_status=EXIT_SERVICE,
        )
    console.ok(f"DRS failback state: {state}")
    return state


def on_livecd(sysroot: str = "/") -> bool:
    """Booted as the LiveCD (boot=failback, or live-boot's boot=live) with its medium mounted: never true on
    a host running the client for a test, which must never be rebooted."""
    try:
        with open(os.path.join(sysroot, "proc/cmdline"), encoding="utf-8") as f:
            live = bool({"boot=failback", "boot=live"} & set(f.read().split()))
    except OSError:
        return False
    return live and os.path.ismount(os.path.join(sysroot, LIVE_MEDIUM_MOUNT.lstrip("/")))


def _medium_device(sysroot: str) -> str | None:
    try:
        with open(os.path.join(sysroot, "proc/mounts"), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1] == LIVE_MEDIUM_MOUNT and parts[0].startswith("/dev/"):
                    return parts[0]
    except OSError:
        pass
    return None


def eject_medium(console: Console, sysroot: str = "/") -> bool:
    """Open the tray of an optical boot medium (CDROMEJECT; the drive lock is released first). A USB stick or a
    virtual medium that cannot be ejected is left alone: the admin removes it or changes the boot order."""
    device = _medium_device(sysroot)
    if device is None:
        return False
    if not os.path.basename(device).startswith("sr"):
        console.info(f"The boot medium {device} is not an optical drive: remove it before the server starts again")
        return False
    try:
        fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        console.warn(f"Could not open {device} to eject it ({e.strerror}); remove the medium by hand")
        return False
    try:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, CDROM_LOCKDOOR, 0)
        fcntl.ioctl(fd, CDROMEJECT, 0)
    except OSError as e:
        console.warn(f"Could not eject {device} ({e.strerror}); remove the medium before the server starts again")
        return False
    finally:
        os.close(fd)
    console.info(f"Ejected {device}")
    return True


def _restart() -> None:
    """Restart now, without reading another file: once the medium is out, the live root (a squashfs on it)
    is gone, so `systemctl reboot` would fail with EIO. Nothing on the live system needs saving, and the
    restored volumes were flushed and verified by the replication software (and synced again here)."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)  # already mapped into this process: no file read
    if libc.reboot(RB_AUTOBOOT) != 0:
        # Without CAP_SYS_BOOT (not the LiveCD case): the magic SysRq trigger is in /proc, not on the medium.
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("b")


def finish(settings: Settings, console: Console) -> None:
    """Eject and reboot, or say why not."""
    if not settings.reboot:
        console.info("Not rebooting (REBOOT=0 / --no-reboot): restart the server into the restored system when ready")
        return
    if not on_livecd(settings.sysroot):
        console.info("Not running from the failback LiveCD: not ejecting or rebooting this machine")
        return
    console.info("Ejecting the medium and rebooting into the restored system...")
    os.sync()
    eject_medium(console, settings.sysroot)
    _restart()
