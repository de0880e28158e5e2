"""The benchmark: build times, ISO and layer sizes, and boot times next to a baseline measured in
the same run (a bare kernel + tiny initramfs on the same QEMU machine), printed as figures and
ratios against the targets. Nothing here asserts a time: the figures are for people to read.

Targets (issue 2): warm rebuild <= 30 s, ISO <= 200 MiB, summary line <= 4x the bare-kernel boot.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from image.core import mounts
from image.core.run import run
from image.vm import media, qemu, smoke
from image.vm.qemu import BOOT_WAYS, BootWay

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
WARM_REBUILD_TARGET_S = 30.0
ISO_TARGET_MIB = 200.0
BOOT_RATIO_TARGET = 4.0
MIB = 1024 * 1024
# The client file the warm rebuild changes (created, then removed again): a change of content,
# since the build keys its stages on content, not on modification times.
BENCH_CLIENT_FILE = REPO / "client" / "failback_client" / "_bench_change.py"
TOUCHED_CLIENT_FILE = REPO / "client" / "failback_client" / "__init__.py"


@dataclass
class BenchReport:
    cold_build_s: float | None = None
    touch_rebuild_s: float | None = None
    warm_rebuild_s: float | None = None
    iso_bytes: int | None = None
    layers: dict[str, int] = field(default_factory=dict)
    baseline_s: float | None = None
    baseline_detail: str = ""
    boots: list[smoke.WayResult] = field(default_factory=list)
    # The baseline booted again right before each way (way name -> seconds): on a shared machine the
    # load changes between boots, so each way's ratio is taken against its own neighbour.
    way_baselines: dict[str, float] = field(default_factory=dict)
    way_baseline_cpu: dict[str, float] = field(default_factory=dict)
    # UEFI ways: the same bare kernel + initramfs loaded directly by that way's firmware (way name ->
    # seconds): the floor of any boot on that machine, firmware included (OVMF alone takes ~3.5 s
    # under TCG before it loads anything; SeaBIOS ~0.1 s, so the BIOS ways' baseline is the same).
    firmware_baselines: dict[str, float] = field(default_factory=dict)
    # The same ways booting another ISO (`against`, e.g. the previous build), interleaved with these.
    against: Path | None = None
    against_boots: list[smoke.WayResult] = field(default_factory=list)
    # The same ways on the boot-chain probe ISO (no live system): what firmware + loaders cost.
    probe_boots: list[smoke.WayResult] = field(default_factory=list)
    cpus: int = 1  # vCPUs of every guest, baseline included

    def format(self) -> str:
        out = ["== failback LiveCD benchmark =="]

        def secs(label: str, value: float | None, target: float | None = None) -> None:
            if value is None:
                out.append(f"{label:<44} (not measured)")
                return
            line = f"{label:<44} {value:8.1f} s"
            if target is not None:
                line += f"   target <= {target:.0f} s: {'met' if value <= target else 'MISSED'}"
            out.append(line)

        secs("cold build", self.cold_build_s)
        secs("rebuild after `touch` of a client file", self.touch_rebuild_s)
        secs("warm rebuild after changing a client file", self.warm_rebuild_s, WARM_REBUILD_TARGET_S)
        if self.iso_bytes is not None:
            mib = self.iso_bytes / MIB
            out.append(
                f"{'ISO size':<44} {mib:8.1f} MiB target <= {ISO_TARGET_MIB:.0f} MiB: "
                f"{'met' if mib <= ISO_TARGET_MIB else 'MISSED'}"
            )
        for name, size in self.layers.items():
            out.append(f"  {name:<42} {size / MIB:8.1f} MiB")
        out.append("")
        out.append(
            f"boot: seconds from QEMU start (TCG, 1 GiB, {self.cpus} vCPU) to the line; 'chain' = the same way "
            "booting the"
        )
        out.append("ISO stage's boot chain around the same kernel with a probe initramfs (no live system)")
        if self.way_baselines:
            out.append("  ratio = seconds / the bare-kernel boot measured right before that way ('base')")
        if self.baseline_s is not None:
            out.append(
                f"  {'bare kernel (baseline)':<24} {self.baseline_s:8.1f} s   1.00x"
                + ("  (median of the runs before each way)" if len(self.way_baselines) > 1 else "")
            )
        else:
            out.append(f"  bare kernel baseline: not measured {self.baseline_detail or '(boots not asked for)'}")
        probes = {r.way.name: r for r in self.probe_boots}
        others = {r.way.name: r for r in self.against_boots}
        for r in self.boots:
            base = self.way_baselines.get(r.way.name, self.baseline_s)
            probe = probes.get(r.way.name)
            extra = f"  base {base:4.1f} s" if r.way.name in self.way_baselines and base else ""
            if probe is not None:
                extra += f"   chain {probe.seconds:5.1f} s" if probe.passed else f"   chain FAILED ({probe.detail})"
            other = others.get(r.way.name)
            if other is not None:
                extra += (
                    f"   against {other.seconds:5.1f} s" + (f" {other.seconds / base:5.2f}x" if base else "")
                    if other.passed
                    else f"   against FAILED ({other.detail})"
                )
            if not r.passed:
                out.append(f"  {r.way.name:<24} FAILED after {r.seconds:.1f} s: {r.detail}{extra}")
                continue
            ratio = f"{r.seconds / base:5.2f}x" if base else "  n/a"
            verdict = ""
            if base:
                met = r.seconds / base <= BOOT_RATIO_TARGET
                verdict = f"  (target <= {BOOT_RATIO_TARGET:.0f}x: {'met' if met else 'MISSED'})"
            out.append(f"  {r.way.name:<24} {r.seconds:8.1f} s  {ratio}{extra}{verdict}")
            fw_base = self.firmware_baselines.get(r.way.name)
            if fw_base:
                met = r.seconds / fw_base <= BOOT_RATIO_TARGET
                out.append(
                    f"  {'':<24} same firmware: bare kernel {fw_base:4.1f} s, {r.seconds / fw_base:5.2f}x"
                    f"  (target <= {BOOT_RATIO_TARGET:.0f}x against it: {'met' if met else 'MISSED'})"
                )
            cpu = _cpu(r)
            if cpu is not None and r.way.name in self.way_baseline_cpu:
                line = f"  {'':<24} QEMU CPU {cpu:6.1f} s  base {self.way_baseline_cpu[r.way.name]:4.1f} s"
                other_cpu = _cpu(other) if other is not None else None
                if other_cpu is not None:
                    line += f"   against {other_cpu:6.1f} s"
                out.append(line)
        if self.firmware_baselines:
            out.append("  same firmware = the bare kernel + initramfs loaded directly by the way's UEFI firmware,")
            out.append("  booted right before it: what that machine costs before any ISO can act ('base' boots it")
            out.append("  with SeaBIOS)")
        if self.way_baseline_cpu:
            out.append(
                "  QEMU CPU = host CPU seconds of the guest: on an idle machine about the seconds (TCG, and "
                "boot loaders busy-wait), on a loaded one much steadier than them"
            )
        if self.against is not None:
            out.append(f"  against = {self.against}, booted right after each way")
        return "\n".join(out)


def _cpu(r: smoke.WayResult) -> float | None:
    return r.boot.cpu_seconds if r.boot is not None else None


def remove_build_dir(path: Path) -> None:
    """Remove a throw-away build directory, refusing while anything is mounted below it (a leaked
    /proc or /dev bind mount of a chroot must not be deleted through)."""
    inside = [str(m.target) for m in reversed(mounts.mounts_under(path))]
    if inside:
        raise RuntimeError(f"{path}: still mounted below it: {', '.join(inside)}; unmount, then retry")
    shutil.rmtree(path, ignore_errors=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def iso_layers(iso: Path) -> dict[str, int]:
    """The squashfs layers inside the ISO (Rock Ridge path -> bytes)."""
    from image.stages.boot.iso import open_iso

    with open_iso(iso) as pc:
        layers = {}
        for dirpath, _dirs, files in pc.walk(rr_path="/"):
            for f in sorted(files):
                if f.endswith(".squashfs"):
                    path = f"{dirpath.rstrip('/')}/{f}"
                    layers[path] = pc.get_record(rr_path=path).get_data_length()
        return layers


BASELINE_APPEND = "console=tty0 console=ttyS0,115200n8 quiet"


def baseline_kernel(iso: Path, workdir: Path) -> Path:
    """The ISO's own kernel, so the baseline runs exactly the kernel the ISO boots."""
    return media.extract_from_iso(iso, r"/vmlinuz[^/]*$", workdir / "vmlinuz")


def run_bench(
    iso: Path,
    workdir: Path,
    *,
    build_cmd: Sequence[str] | None = None,
    cold_build_cmd: Sequence[str] | None = None,
    ways: Sequence[BootWay] = BOOT_WAYS,
    parallel: int = 1,
    timeout: float = smoke.DEFAULT_TIMEOUT,
    probe: bool = True,
    against: Path | None = None,
    cpus: int = 1,
    firmware_baseline: bool = True,
) -> BenchReport:
    """Measure what is asked: builds only when their commands are given, boots when `ways`; with
    `against`, each way also boots that ISO right after this one (a before/after comparison under
    the same load); with `firmware_baseline`, each UEFI way also gets a bare-kernel boot by its own
    firmware right before it (one at a time only)."""
    report = BenchReport(cpus=cpus)
    # Absolute: the probe ISO's apt cache (image/stages/boot/efi.py) breaks on a relative directory.
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if cold_build_cmd:
        report.cold_build_s = timed(lambda: run(cold_build_cmd, cwd=REPO))
    if build_cmd:
        run(build_cmd, cwd=REPO)  # up to date first, so what follows is only the change's cost
        TOUCHED_CLIENT_FILE.touch()
        report.touch_rebuild_s = timed(lambda: run(build_cmd, cwd=REPO))
        BENCH_CLIENT_FILE.write_text(f'"""Written by `inv bench` to measure a warm rebuild ({time.time()})."""\n')
        try:
            report.warm_rebuild_s = timed(lambda: run(build_cmd, cwd=REPO))
        finally:
            BENCH_CLIENT_FILE.unlink(missing_ok=True)
        run(build_cmd, cwd=REPO)  # back to an ISO of the tree as it is
    if not iso.is_file():
        raise qemu.QemuError(f"{iso}: no such ISO; build it first (inv build) or pass --iso")
    report.iso_bytes = iso.stat().st_size
    report.layers = iso_layers(iso)
    if against is not None and not against.is_file():
        raise qemu.QemuError(f"{against}: no such ISO to compare against")
    report.against = against
    if ways:
        kernel = baseline_kernel(iso, workdir)
        if parallel > 1:
            # Two guests at once: one baseline for all (they would disturb each other's).
            base = qemu.boot_bare_kernel(kernel, workdir, append=BASELINE_APPEND, cpus=cpus)
            if base.outcome == "matched":
                report.baseline_s = base.seconds
            else:
                report.baseline_detail = f"({base.outcome}: {base.match}; see {base.serial_log})"
            report.boots = smoke.run_matrix(
                iso, workdir / "boots", ways=ways, parallel=parallel, timeout=timeout, cpus=cpus
            )
            if against is not None:
                report.against_boots = smoke.run_matrix(
                    against, workdir / "against", ways=ways, parallel=parallel, timeout=timeout, cpus=cpus
                )
        else:
            for way in ways:
                base = qemu.boot_bare_kernel(kernel, workdir / "baseline" / way.name, append=BASELINE_APPEND, cpus=cpus)
                if base.outcome == "matched":
                    report.way_baselines[way.name] = base.seconds
                    if base.cpu_seconds is not None:
                        report.way_baseline_cpu[way.name] = base.cpu_seconds
                else:
                    report.baseline_detail = f"({base.outcome}: {base.match}; see {base.serial_log})"
                if firmware_baseline and way.firmware == "uefi":
                    firmware = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(),
                                                         secure_boot=way.secure_boot)  # fmt: skip
                    fw_base = qemu.boot_bare_kernel(kernel, workdir / "baseline-firmware" / way.name,
                                                    append=BASELINE_APPEND, cpus=cpus, firmware=firmware)  # fmt: skip
                    if fw_base.outcome == "matched":
                        report.firmware_baselines[way.name] = fw_base.seconds
                    else:
                        log.warning("%s: bare kernel under %s: %s (see %s)", way.name, firmware.descriptor.name,
                                    fw_base.outcome, fw_base.serial_log)  # fmt: skip
                report.boots += smoke.run_matrix(iso, workdir / "boots", ways=[way], timeout=timeout, cpus=cpus)
                if against is not None:
                    report.against_boots += smoke.run_matrix(
                        against, workdir / "against", ways=[way], timeout=timeout, cpus=cpus
                    )
            if report.way_baselines:
                report.baseline_s = statistics.median(report.way_baselines.values())
        if probe:
            probe_iso = smoke.make_probe_iso(kernel, workdir / "probe")
            report.probe_boots = smoke.run_matrix(
                probe_iso, workdir / "probe", ways=ways, parallel=parallel, timeout=timeout, cpus=cpus
            )
    return report
