"""What conversion shows on the console (and, through the console, in the log)."""

from __future__ import annotations

from failback_client.console import Console
from failback_client.convert.drivers import LocalHardware
from failback_client.convert.model import ConversionReport


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show_found(console: Console, report: ConversionReport, hw: LocalHardware) -> None:
    rows = []
    for disk in report.disks:
        if disk.problem:
            rows.append([disk.path, "-", "-", "-", f"not interpreted, left untouched: {disk.problem}"])
        elif disk.whole_fstype:
            rows.append([disk.path, "(whole disk)", "-", disk.whole_fstype, disk.whole_uuid])
        for p in disk.partitions:
            kind = "ESP" if p.is_esp else "BIOS boot" if p.is_bios_boot else p.type_code
            rows.append(
                [
                    p.node,
                    f"{disk.table} #{p.number}",
                    _size(p.size),
                    p.fstype or "-",
                    " ".join(x for x in (kind, p.uuid, p.label) if x),
                ]
            )
    console.table(["device", "partition", "size", "filesystem", "type / UUID / label"], rows, title="Target disks")
    for s in report.linux:
        console.info(
            f"Found Linux: {s.name} on {s.root.node} ({s.root.fstype}); initramfs: "
            f"{s.initramfs_tool or 'none found'}; boot loader: {s.boot_loader}; the instance booted: "
            f"{s.instance_boot_mode or 'unknown'}"
        )
    for w in report.windows:
        console.info(f"Found Windows on {w.disk}: {'; '.join(w.evidence)}")
    console.info(
        f"This machine: boots {report.boot_mode.upper()}; storage drivers: "
        f"{', '.join(sorted(hw.storage)) or 'none seen'}; NICs: "
        + (", ".join(hw.nics) + f" ({', '.join(sorted(hw.network))})" if hw.nics else "none seen")
    )


def show_report(console: Console, report: ConversionReport) -> None:
    console.heading("Conversion report")
    if report.drivers:
        console.info(f"Drivers in the initramfs: {' '.join(report.drivers)}")
    if report.changes:
        dry = all(c.action.startswith("would ") for c in report.changes)
        console.table(
            ["file", "action", "what", "backup"],
            [[c.path, c.action, c.detail, c.backup or "-"] for c in report.changes],
            title="Changes that would be made (dry run: nothing written)" if dry else "Changes made on the target",
        )
    for w in report.windows:
        console.warn(
            f"Windows on {w.disk} was converted; after its first boot check:"
            if w.converted
            else f"Windows on {w.disk} was NOT changed. An administrator must check:"
        )
        for check in w.checks:
            console.info(f"  - {check}")
    for warning in report.warnings:
        console.warn(warning)
    if report.ok:
        console.ok(f"Conversion done ({len(report.changes)} changes)")
        return
    console.error(f"Conversion failed at step '{report.failed_step}': {report.error}")
    if report.rolled_back:
        console.info("Put back as replicated: " + ", ".join(report.rolled_back))
    console.info(
        "The target disks are as replicated (except where listed above); fix the cause and run the conversion again."
    )
