"""`failback-client convert DISK...`: the conversion on its own (guide step 18), for an admin who re-runs it
after exit 9 or after fixing what it reported, or who prepares a disk for other hardware (--controllers).
It changes only the disks named on its command line."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from failback_client.errors import EXIT_CONVERT, EXIT_USAGE
from failback_client.logs import add_log_file_argument

DESCRIPTION = """\
Make the restored system(s) on DISK... boot on this machine: Linux (drivers in the initramfs, device names,
network, cloud agents masked, boot loader for this machine's boot mode) and Windows (offline registry edits:
the inbox storage driver of each controller set to start at boot, cloud-only drivers and services disabled;
on UEFI the firmware's fallback loader on the ESP). Every changed file is first copied to *.failback-bak;
a failure puts everything back as it was; running it again changes nothing already converted."""

EPILOG = """\
controller drivers (--controllers; Linux kernel driver names as /sys/bus/pci/drivers shows them):
  {drivers}

exit status: 0 converted (or nothing to do), 2 bad arguments, 9 conversion failed (the disks are as they were
before this run; the report says why and what to fix)."""


def build_parser() -> argparse.ArgumentParser:
    from failback_client.convert.windows_drivers import WINDOWS_DRIVERS

    p = argparse.ArgumentParser(
        prog="failback-client convert",
        description=DESCRIPTION,
        epilog=EPILOG.format(drivers=", ".join(sorted(WINDOWS_DRIVERS))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "disks",
        nargs="+",
        metavar="DISK",
        help="whole local disk(s) holding the restored volumes, e.g. /dev/sda (block devices only)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would change on Windows and write nothing (not a byte of the disks)",
    )
    p.add_argument(
        "--controllers",
        metavar="DRIVER,...",
        default="",
        help="also make Windows boot from these controller kinds (for a disk moved to other hardware); "
        "default: only the controllers this machine has",
    )
    p.add_argument(
        "--boot-mode",
        choices=("auto", "bios", "uefi"),
        default="auto",
        help="boot mode to convert for (default auto: how this machine booted the failback client)",
    )
    p.add_argument(
        "--remove-hiberfile",
        action="store_true",
        help="consent to discard a Windows hibernated / Fast Startup session on the disks (its unsaved "
        "state is lost) so the volume can be written",
    )
    add_log_file_argument(p)
    return p


def _check_disk(path: str) -> str:
    """'' when `path` is a whole block device, else why not."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISBLK(st.st_mode):
        return f"{path} is not a block device (attach an image with `losetup --find --show --partscan IMAGE`)"
    name = os.path.basename(os.path.realpath(path))
    if os.path.exists(f"/sys/class/block/{name}/partition"):
        return f"{path} is a partition: give the whole disk (e.g. /dev/sda, not /dev/sda1)"
    return ""


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from failback_client.convert import ConversionOptions, convert
    from failback_client.convert.windows_drivers import parse_controllers

    try:
        controllers = parse_controllers(args.controllers)
    except ValueError as exc:
        sys.stderr.write(f"failback-client convert: error: --controllers: {exc}\n")
        return EXIT_USAGE
    problems = [p for p in (_check_disk(d) for d in args.disks) if p]
    if problems:
        for problem in problems:
            sys.stderr.write(f"failback-client convert: error: {problem}\n")
        return EXIT_USAGE
    from failback_client.console import Console
    from failback_client.logs import setup_logging

    setup_logging(log_file=args.log_file, log_console=False)
    options = ConversionOptions(
        boot_mode=args.boot_mode,
        dry_run=args.dry_run,
        windows_controllers=controllers,
        remove_hiberfile=args.remove_hiberfile,
    )
    report = convert([Path(d) for d in args.disks], Console(), options)
    return 0 if report.ok else EXIT_CONVERT
