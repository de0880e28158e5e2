"""The QEMU smoke matrix: boot the built ISO six ways and check what the client reports.

A way passes only when the serial console shows the client's summary line
(`failback-client <version> | boot mode: BIOS|UEFI | secure boot: on|off | memory: N MiB`) with
the boot mode and Secure Boot state that way must produce. Disk ways boot a copy of the ISO whose
El Torito record is made unrecognisable, so only the hybrid MBR/GPT (USB stick) path can boot.
Serial logs stay under the work directory (build/smoke/ by default).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from image.vm import initramfs, media, qemu
from image.vm.qemu import BOOT_WAYS, BootResult, BootWay, Firmware

log = logging.getLogger(__name__)

SUMMARY_RE = re.compile(r"failback-client \S+ .*boot mode: (BIOS|UEFI) .*secure boot: (on|off)")
DEFAULT_TIMEOUT = 300.0
# Two cores here (and on CI): more parallel TCG guests only slow every one of them down.
MAX_PARALLEL = 2


@dataclass(frozen=True)
class WayResult:
    way: BootWay
    passed: bool
    seconds: float
    detail: str
    serial_log: Path
    boot: BootResult | None = None


def default_iso() -> Path:
    """The default build's ISO (build/out/<iso.artifact>)."""
    from image.core.paths import DEFAULT_BUILD, BuildPaths
    from image.stages.config import load_config

    return BuildPaths(DEFAULT_BUILD).artifact(load_config().iso.artifact)


DEFAULT_WORKDIR = Path(__file__).resolve().parents[2] / "build" / "smoke"


def workdir_for(iso: Path) -> Path:
    """Where the boots of `iso` keep their serial logs, NVRAM copies and disk copy: <build>/smoke for
    <build>/out/<iso> (build/smoke for the default build), so that boots of ISOs from different build
    directories (engineers sharing a machine) never write the same files."""
    iso = iso.resolve()
    if iso.parent.name == "out":
        return iso.parent.parent / "smoke"
    return DEFAULT_WORKDIR / iso.stem


def make_probe_iso(kernel: Path, workdir: Path) -> Path:
    """An ISO made by the ISO stage (same boot loaders, menu, hybrid layout) around `kernel` and the
    boot-chain probe initramfs instead of the live system: its summary line times firmware + boot
    loader + kernel alone, and tells a broken boot chain from a broken live system."""
    from image.core.mounts import require_no_mounts
    from image.core.run import run
    from image.stages import bootloader
    from image.stages.boot.iso import IsoInputs, assemble_iso
    from image.stages.config import load_config

    workdir.mkdir(parents=True, exist_ok=True)
    initrd = initramfs.write_probe_initramfs(workdir / "probe-initrd.img")
    empty = workdir / "empty"
    empty.mkdir(exist_ok=True)
    layer = workdir / "00-probe.squashfs"
    if not layer.is_file():
        require_no_mounts(empty, f"pack it into {layer.name}")
        run(["mksquashfs", str(empty), str(layer), "-noappend", "-quiet", "-all-root", "-mkfs-time", "0"])
    inputs = IsoInputs(kernel=kernel, initrd=initrd, layers=(layer,), extra_files={}, source_date_epoch=0)
    cfg = load_config()
    loaders = bootloader.fetch_boot_loaders(workdir / "cache", bootloader.AptSources.from_config(cfg))
    return assemble_iso(cfg, inputs, workdir / "boot-chain-probe.iso", workdir / "cache", loaders).path


def check_summary(way: BootWay, boot: BootResult) -> tuple[bool, str]:
    """Whether `boot` shows the summary line with the boot mode and Secure Boot state of `way`."""
    if boot.outcome == "matched":
        mode, sb = boot.groups[0], boot.groups[1]
        if (mode, sb) == (way.boot_mode, way.secure_boot_state):
            return True, boot.match or ""
        return False, (
            f"wrong state: client says boot mode {mode}, secure boot {sb}; "
            f"{way.name} must give boot mode {way.boot_mode}, secure boot {way.secure_boot_state} "
            f"({boot.match})"
        )
    if boot.outcome == "failed":
        return False, f"boot failed: {boot.match}"
    if boot.outcome == "timeout":
        return False, f"no summary line within {boot.seconds:.0f} s"
    detail = boot.match or "QEMU exited"
    if boot.qemu_output:
        detail += f": {boot.qemu_output.splitlines()[-1]}"
    return False, f"{detail} before the summary line"


def plan_way(
    way: BootWay, iso: Path, workdir: Path, firmwares: Sequence[Firmware], disk_image: Path | None, cpus: int = 1
) -> tuple[list[str], Path, Path]:
    """The QEMU command for `way`, its serial log and its QMP socket (VARS copied fresh)."""
    waydir = workdir / way.name
    waydir.mkdir(parents=True, exist_ok=True)
    serial_log = waydir / "serial.log"
    qmp_socket = qemu.short_socket_path(way.name)
    firmware = vars_file = None
    if way.firmware == "uefi":
        firmware = qemu.select_uefi_firmware(firmwares, secure_boot=way.secure_boot)
        vars_file = qemu.copy_vars(firmware, waydir / "vars.fd")
    image = iso
    if way.medium == "disk":
        if disk_image is None:
            raise qemu.QemuError(f"{way.name}: needs the El Torito-less disk copy of the ISO")
        image = disk_image
    argv = qemu.iso_argv(
        way,
        image=image,
        serial_log=serial_log,
        qmp_socket=qmp_socket,
        firmware=firmware,
        vars_file=vars_file,
        cpus=cpus,
    )
    return argv, serial_log, qmp_socket


def run_way(
    way: BootWay,
    iso: Path,
    workdir: Path,
    *,
    firmwares: Sequence[Firmware],
    disk_image: Path | None,
    timeout: float = DEFAULT_TIMEOUT,
    cpus: int = 1,
) -> WayResult:
    argv, serial_log, qmp_socket = plan_way(way, iso, workdir, firmwares, disk_image, cpus)
    log.info("smoke: booting %s", way.name)
    try:
        boot = qemu.watch_boot(argv, serial_log=serial_log, qmp_socket=qmp_socket, pattern=SUMMARY_RE, timeout=timeout)
    finally:
        shutil.rmtree(qmp_socket.parent, ignore_errors=True)
    passed, detail = check_summary(way, boot)
    log.info("smoke: %s %s after %.1f s: %s", way.name, "PASS" if passed else "FAIL", boot.seconds, detail)
    return WayResult(way, passed, boot.seconds, detail, serial_log, boot)


def run_matrix(
    iso: Path,
    workdir: Path,
    *,
    ways: Sequence[BootWay] = BOOT_WAYS,
    parallel: int = MAX_PARALLEL,
    timeout: float = DEFAULT_TIMEOUT,
    firmware_dirs: Sequence[Path] = qemu.FIRMWARE_DIRS,
    on_result: Callable[[WayResult], None] | None = None,
    cpus: int = 1,
) -> list[WayResult]:
    """Boot `iso` each way in `ways`, at most `parallel` at a time; results in the order of `ways`."""
    if not iso.is_file():
        raise qemu.QemuError(f"{iso}: no such ISO; build it first (inv build) or pass --iso")
    parallel = max(1, min(parallel, MAX_PARALLEL))
    workdir.mkdir(parents=True, exist_ok=True)
    firmwares = qemu.load_firmware_descriptors(firmware_dirs)
    disk_image = None
    if any(w.medium == "disk" for w in ways):
        disk_image = media.disk_copy(iso, workdir / "disk-no-eltorito.img")

    def one(way: BootWay) -> WayResult:
        result = run_way(way, iso, workdir, firmwares=firmwares, disk_image=disk_image, timeout=timeout, cpus=cpus)
        if on_result:
            on_result(result)
        return result

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, ways))


def format_table(results: Sequence[WayResult]) -> str:
    rows = [("way", "result", "seconds", "summary line / reason")]
    for r in results:
        rows.append((r.way.name, "PASS" if r.passed else "FAIL", f"{r.seconds:.1f}", r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * (sum(widths) + 6 + len(rows[0][3])))
    return "\n".join(lines)


def report(results: Sequence[WayResult], tail_lines: int = 40) -> str:
    """The table, then the tail of every failed way's serial log."""
    out = [format_table(results)]
    for r in results:
        if not r.passed:
            out.append(f"\n--- {r.way.name}: last {tail_lines} lines of {r.serial_log} ---")
            out.append(r.boot.tail(tail_lines) if r.boot else "")
    return "\n".join(out)
