"""Conversion (guide step 18): make the restored system boot on this machine's hardware.

`convert(targets, console, options)` looks at the target disks (the local devices that received the
replicated volumes), shows what it found, converts each Linux system it found (drivers in the initramfs,
device names, network, cloud agents, boot loader) and each Windows system (windows.py: offline SYSTEM hive
edits with hivex so the storage driver of this machine's controllers starts at boot, cloud-only drivers and
services disabled, the ESP's fallback loader on UEFI; a dirty hive, a hibernated volume or a boot-mode
mismatch stop it before any write). With `options.dry_run` Windows changes are listed, nothing is written.
It returns a ConversionReport; it does not raise for a failed step: `report.ok` is False, `failed_step`
names the step and `error` says why, and every file changed by that run has been put back (`rolled_back`),
so the disks are as replicated and the conversion can be run again. Running it again after success changes
nothing that is already converted (backups `*.failback-bak` keep the files as replicated).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from failback_client.console import Console
from failback_client.convert.detect import find_linux, find_windows, instance_boot_mode
from failback_client.convert.disks import ensure_partition_nodes, inspect_disk, volumes
from failback_client.convert.drivers import local_hardware
from failback_client.convert.linux import LinuxConversion
from failback_client.convert.model import (
    BootMode,
    ConversionError,
    ConversionOptions,
    ConversionReport,
    StaticNetwork,
)
from failback_client.convert.report import show_found, show_report
from failback_client.convert.runner import CommandFailed
from failback_client.convert.windows import WindowsConversion
from failback_client.convert.windows_drivers import WINDOWS_DRIVERS, storage_controllers

__all__ = ["ConversionOptions", "ConversionReport", "StaticNetwork", "convert", "this_machine_boot_mode"]

log = logging.getLogger(__name__)


def _announcer(console: Console, prefix: str) -> Callable[[str], None]:
    """A conversion's `progress`: each step's name on the console after `prefix`."""
    return lambda name: console.info(f"{prefix}{name}...")


def this_machine_boot_mode(options: ConversionOptions) -> BootMode:
    if options.boot_mode != "auto":
        return options.boot_mode
    return "uefi" if (options.sys_root / "sys/firmware/efi").is_dir() else "bios"


def convert(targets: list[Path], console: Console, options: ConversionOptions | None = None) -> ConversionReport:
    options = options or ConversionOptions()
    report = ConversionReport()
    console.heading("Conversion: making the restored system(s) boot on this machine")
    try:
        _convert(targets, console, options, report)
    except ConversionError as exc:
        report.failed_step, report.error = exc.step, str(exc)
    show_report(console, report)
    return report


def _convert(targets: list[Path], console: Console, options: ConversionOptions, report: ConversionReport) -> None:
    step = "inspect the target disks"
    if os.geteuid() != 0:
        raise ConversionError(step, "conversion needs root (it mounts the target disks)")
    if not targets:
        raise ConversionError(step, "no target disks given")
    mode = this_machine_boot_mode(options)
    report.boot_mode = mode
    try:
        report.disks = [inspect_disk(os.fspath(t)) for t in targets]
        for disk in report.disks:
            if not disk.problem:
                ensure_partition_nodes(disk)
        found, notes = volumes(report.disks)
        report.warnings += notes
        options.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        step = "find the operating systems"
        report.linux = find_linux(found, options.work_dir, report.warnings)
        for system in report.linux:
            disk = next(d for d in report.disks if d.path == system.root.disk)
            system.instance_boot_mode = instance_boot_mode(disk)
        linux_disks = {s.root.disk for s in report.linux}
        for disk in report.disks:
            if not disk.problem and disk.path not in linux_disks:
                win = find_windows(disk, this_machine_mode=mode)
                if win:
                    report.windows.append(win)
    except CommandFailed as exc:
        raise ConversionError(step, str(exc)) from None
    report.steps_done.append("inspect the target disks")
    hw = local_hardware(options.sys_root)
    show_found(console, report, hw)
    if not report.linux and not report.windows:
        report.warnings.append("no operating system found on the target disks: nothing converted")
        return
    if options.dry_run and report.linux:
        report.warnings += [
            f"--dry-run: Linux on {s.root.node} is not previewed (its conversion runs tools in its "
            "chroot); run without --dry-run to convert it"
            for s in report.linux
        ]
    for i, system in enumerate([] if options.dry_run else report.linux):
        conversion = LinuxConversion(
            system, report.disks, found, hw, mode, options, report, progress=_announcer(console, f"{system.name}: ")
        )
        conversion.run(i)
    if report.windows:
        controllers = storage_controllers(options.sys_root)
        kinds = list(
            dict.fromkeys(
                [c.kind for c in controllers if c.kind in WINDOWS_DRIVERS] + list(options.windows_controllers)
            )
        )
        console.info("Windows: controllers to make bootable: " + (", ".join(kinds) or "none found"))
        for i, win in enumerate(report.windows):
            disk = next(d for d in report.disks if d.path == win.disk)
            WindowsConversion(
                win,
                disk,
                mode,
                options,
                report,
                controllers,
                kinds,
                progress=_announcer(console, f"Windows on {win.disk}: "),
            ).run(i)
