"""Converting one restored Windows system, offline (modelled on virt-v2v's convert_windows.ml):

1. look: each NTFS volume of the disk is mounted read-only (ntfs-3g) and searched for
   Windows/System32/config/SYSTEM (case-insensitively); the control set in use is Select\\Current;
2. plan: for each storage controller kind (this machine's, plus --controllers) the inbox driver's service
   gets Start=0 and loses its StartOverride key (windows_drivers.py); cloud-only drivers and services get
   Start=4 (disabled), each listed with how to undo it; on UEFI the ESP gets \\EFI\\Boot\\bootx64.efi;
3. refuse before writing: a boot-mode mismatch, a hive with pending transaction logs (committing over it
   would mark it clean and lose what the logs hold), a hibernated / Fast Startup volume (unless the admin
   consented to remove the hibernation file);
4. write (nothing to change: nothing is mounted read-write): the hive is copied to SYSTEM.failback-bak
   (kept from the first run), edited with hivex in its own file, re-read to check nothing is left to do;
   any failure puts the hive back byte for byte and removes this run's backups and ESP files.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from failback_client.bootmode import disk_boot_mode
from failback_client.convert.detect import _rmdir_quietly as _rmdir
from failback_client.convert.detect import fat_has
from failback_client.convert.files import Transaction
from failback_client.convert.hive import Hive, HivexMissing, dirty_reason, find_ci
from failback_client.convert.model import (
    BootMode,
    Change,
    ConversionError,
    ConversionOptions,
    ConversionReport,
    Disk,
    Partition,
    WindowsSystem,
    run_step,
)
from failback_client.convert.mounts import MountStack
from failback_client.convert.runner import CommandFailed, run
from failback_client.convert.windows_drivers import WINDOWS_DRIVERS, Controller

log = logging.getLogger(__name__)

HIVE_PATH = "Windows/System32/config/SYSTEM"
STEP_LOOK = "find the Windows registry"
STEP_BOOT_MODE = "boot mode"
STEP_REFUSE = "Windows hive and volume state"
STEP_HIVE = "Windows registry (SYSTEM hive)"
STEP_ESP = "Windows boot files on the ESP"
BOOT, DISABLED = 0, 4
START_NAMES = {0: "boot", 1: "system", 2: "auto", 3: "demand", 4: "disabled"}
ESP_WINDOWS_LOADER = "/EFI/Microsoft/Boot/bootmgfw.efi"
ESP_FALLBACK_LOADER = "/EFI/Boot/bootx64.efi"
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}

WINDOWS_CHECKS_AFTER = (
    "Network: the NIC is new hardware; set any static IP address again on it.",
    "Licensing/activation may need to be redone on this hardware.",
    "If Windows does not find its boot configuration, run `bcdboot C:\\Windows` from Windows recovery media.",
)


@dataclass(frozen=True)
class Edit:
    """One registry change: `service`'s Start set to `start`, or its StartOverride key removed (start None)."""

    service: str
    start: int | None
    detail: str


@dataclass
class WindowsVolume:
    partition: Partition
    hive_rel: str  # the hive's path inside the volume, as spelled on disk
    control_set: str = ""
    hibernated: bool = False
    dirty: str = ""
    edits: list[Edit] | None = None

    @property
    def label(self) -> str:
        return f"{self.partition.node}:/{self.hive_rel}"


def _service_file(hive: Hive, node: int, service: str, windows: Path) -> tuple[str, bool]:
    """The driver file a service loads (ImagePath, else System32\\drivers\\<name>.sys) and whether it exists."""
    image = hive.string(node, "ImagePath") or f"System32\\drivers\\{service}.sys"
    rel = image.replace("/", "\\")
    low = rel.lower()
    for prefix in ("\\systemroot\\", "%systemroot%\\", "systemroot\\"):
        if low.startswith(prefix):
            rel = rel[len(prefix) :]
            break
    else:
        if low.startswith("\\??\\") and len(rel) > 7 and rel[5] == ":":
            rel = rel[7:]  # \??\C:\Windows\... : relative to the volume root
            return image, find_ci(windows.parent, rel) is not None
    return image, find_ci(windows, rel) is not None


def class_filters(hive: Hive, control_set: str) -> dict[str, str]:
    """Services named as device-class filters (UpperFilters/LowerFilters): disabling one stops every device of
    its class from starting, so they are never disabled here. {service (casefolded): class key}."""
    out: dict[str, str] = {}
    classes = hive.node(control_set, "Control", "Class")
    for name, node in hive.children(classes).items() if classes else ():
        for value in ("UpperFilters", "LowerFilters"):
            for svc in hive.strings(node, value):
                out.setdefault(svc.casefold(), f"{name} {value}")
    return out


def plan_hive(
    hive: Hive,
    windows: Path,
    kinds: list[str],
    controllers: list[Controller],
    cloud_services: tuple[tuple[str, str], ...],
    notes: list[str],
) -> tuple[str, list[Edit]]:
    """(control set in use, the edits that make the controllers boot and disable the cloud-only services).
    What cannot be done goes to `notes`."""
    select = hive.node("Select")
    current = hive.dword(select, "Current") if select else None
    if not current:
        raise ValueError("the SYSTEM hive has no Select\\Current value: cannot tell which control set Windows uses")
    control_set = f"ControlSet{current:03d}"
    services = hive.node(control_set, "Services")
    if services is None:
        raise ValueError(f"Select\\Current is {current} but the hive has no {control_set}\\Services")
    edits: list[Edit] = []
    planned: set[str] = set()

    def boot_start(service: str, why: str) -> bool:
        node = hive.node(control_set, "Services", service)
        if node is None:
            return False
        image, exists = _service_file(hive, node, service, windows)
        if not exists:
            notes.append(f"{why}: service {service} is in the registry but its driver file {image} is missing")
            return False
        if service.casefold() in planned:
            return True
        planned.add(service.casefold())
        start = hive.dword(node, "Start")
        if start != BOOT:
            old = "none" if start is None else f"{start} ({START_NAMES.get(start, '?')})"
            edits.append(Edit(service, BOOT, f"{control_set}\\Services\\{service}: Start {old} -> 0 (boot) for {why}"))
        override = hive.node(control_set, "Services", service, "StartOverride")
        if override is not None:
            held = ", ".join(f"{k}={int.from_bytes(v[1][:4], 'little')}" for k, v in hive.values(override).items())
            edits.append(
                Edit(
                    service,
                    None,
                    f"{control_set}\\Services\\{service}\\StartOverride removed ({held or 'empty'}) for {why}",
                )
            )
        return True

    for kind in kinds:
        seen = [c for c in controllers if c.kind == kind]
        where = ", ".join(c.describe() for c in seen) or f"{kind} (--controllers)"
        entry = WINDOWS_DRIVERS[kind]
        present = [s for s in entry.services if boot_start(s, where)]
        if not present:
            notes.append(
                f"{where}: needs the vendor's driver (none of the Windows drivers "
                f"{', '.join(entry.services)} is installed in this Windows)"
            )
            continue
        for need in entry.needs:
            if not boot_start(need, f"{where} (needed by {present[0]})"):
                notes.append(f"{where}: {present[0]} needs {need}, which is not installed in this Windows")
    for c in controllers:
        if c.kind not in WINDOWS_DRIVERS:
            notes.append(
                f"{c.describe()}: needs the vendor's driver (no inbox Windows driver is known for "
                f"{'Linux driver ' + c.kind if c.kind else 'it'})"
            )

    filters = class_filters(hive, control_set)
    # The AWS PV drivers work as one set: when one of them is a class filter (left enabled), the others it may
    # load with are left enabled too.
    pv_filter = next((s for s, w in cloud_services if w.startswith("AWS PV") and s.casefold() in filters), None)
    for service, what in cloud_services:
        if pv_filter and what.startswith("AWS PV") and service != pv_filter:
            if hive.node(control_set, "Services", service) is not None:
                notes.append(f"{what} ({service}) left as it is, with the PV filter driver {pv_filter}")
            continue
        node = hive.node(control_set, "Services", service)
        if node is None or service.casefold() in planned:
            continue
        start = hive.dword(node, "Start")
        if start == DISABLED:
            continue
        if service.casefold() in filters:
            notes.append(
                f"{what} ({service}) left as it is: it is a device-class filter "
                f"({filters[service.casefold()]}); remove the AWS drivers after the first boot"
            )
            continue
        old = "none" if start is None else f"{start} ({START_NAMES.get(start, '?')})"
        undo = START_NAMES.get(start if start is not None else 3, "demand")
        edits.append(
            Edit(
                service,
                DISABLED,
                f"{control_set}\\Services\\{service}: Start {old} -> 4 (disabled): "
                f"cloud-only {what} (undo: sc.exe config {service} start= {undo})",
            )
        )
    return control_set, edits


def apply_edits(hive: Hive, control_set: str, edits: list[Edit]) -> None:
    for edit in edits:
        node = hive.node(control_set, "Services", edit.service)
        if node is None:
            raise ValueError(f"{control_set}\\Services\\{edit.service} vanished from the hive")
        if edit.start is None:
            override = hive.node(control_set, "Services", edit.service, "StartOverride")
            if override is not None:
                hive.delete(override)
        else:
            hive.set_dword(node, "Start", edit.start)


def is_hibernated(root: Path) -> bool:
    """hiberfil.sys starting with "hibr": Windows hibernated, or shut down with Fast Startup (hybrid)."""
    path = find_ci(root, "hiberfil.sys")
    if path is None or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4).lower() == b"hibr"
    except OSError:
        return False


def _read_only(where: Path) -> bool:
    return bool(os.statvfs(where).f_flag & os.ST_RDONLY)


class WindowsConversion:
    def __init__(
        self,
        system: WindowsSystem,
        disk: Disk,
        mode: BootMode,
        options: ConversionOptions,
        report: ConversionReport,
        controllers: list[Controller],
        kinds: list[str],
        progress: Callable[[str], None],
    ) -> None:
        self.system, self.disk, self.mode, self.options, self.report = system, disk, mode, options, report
        self.controllers, self.kinds, self.progress = controllers, kinds, progress
        self.notes: list[str] = []

    def _step(self, name: str, fn: Callable[[], object]) -> None:
        # RuntimeError: libhivex's errors (and HivexMissing) besides the commands' CommandFailed
        run_step(self.report, self.progress, name, fn, (CommandFailed, OSError, ValueError, RuntimeError))

    def run(self, index: int) -> None:
        found: list[WindowsVolume] = []
        self._step(STEP_LOOK, lambda: found.extend(self._look(index)))
        if not found:
            self.report.warnings.append(
                f"Windows on {self.disk.path}: no {HIVE_PATH} on its NTFS volumes; not converted"
            )
            return
        self._flush_notes()  # what cannot be done is worth knowing even when a refusal follows
        self._step(STEP_BOOT_MODE, self._check_boot_mode)
        self._step(STEP_REFUSE, lambda: self._refuse(found))
        esp = self._esp_to_fix()
        self._flush_notes()
        if self.options.dry_run:
            for vol in found:
                for e in vol.edits or []:
                    self.report.changes.append(Change(vol.label, "would edit", e.detail))
            if esp is not None:
                self.report.changes.append(
                    Change(
                        f"{esp.node}:{ESP_FALLBACK_LOADER}",
                        "would create",
                        f"copy of {ESP_WINDOWS_LOADER} (firmware fallback path)",
                    )
                )
            return
        for i, vol in enumerate(found):
            if vol.edits:
                self._write_hive(index, i, vol, esp if i == 0 else None)
            elif i == 0 and esp is not None:
                tx = Transaction(self.options.work_dir, self.report)
                try:
                    self._step(STEP_ESP, functools.partial(self._copy_loader, tx, esp))
                except ConversionError:
                    self.report.rolled_back += tx.rollback()
                    raise
        self.system.converted = True
        self.system.checks = list(WINDOWS_CHECKS_AFTER)

    def _flush_notes(self) -> None:
        self.report.warnings += [f"Windows on {self.disk.path}: {n}" for n in self.notes]
        self.notes.clear()

    # ---- looking (read-only) ------------------------------------------------------------------------------

    def _look(self, index: int) -> list[WindowsVolume]:
        out = []
        for p in self.disk.partitions:
            if p.fstype != "ntfs":
                continue
            where = self.options.work_dir / f"windows-{index}-p{p.number}-ro"
            with MountStack() as mounts:
                mounts.mount(p.node, where, fstype="ntfs-3g", options="ro")
                hive = find_ci(where, HIVE_PATH)
                if hive is None or not hive.is_file():
                    continue
                vol = WindowsVolume(p, os.fspath(hive.relative_to(where)), hibernated=is_hibernated(where))
                vol.dirty = dirty_reason(hive)
                if not vol.dirty:
                    try:
                        reader = Hive(hive)
                    except (OSError, RuntimeError) as exc:
                        if isinstance(exc, HivexMissing):
                            raise
                        raise ValueError(f"hivex cannot read {vol.label}: {exc}") from None
                    windows = hive.parent.parent.parent
                    vol.control_set, vol.edits = plan_hive(
                        reader, windows, self.kinds, self.controllers, self.options.windows_cloud_services, self.notes
                    )
                    reader.close()
                out.append(vol)
            _rmdir(where)
        return out

    def _check_boot_mode(self) -> None:
        instance = disk_boot_mode(self.disk.path)
        self.system.instance_boot_mode = instance
        if instance in ("bios", "uefi") and instance != self.mode:
            raise ConversionError(STEP_BOOT_MODE, boot_mode_advice(self.disk.path, instance, self.mode))
        if self.mode == "bios":
            self.report.warnings.append(
                f"Windows on {self.disk.path} boots BIOS: its MBR and active partition are left as replicated"
            )

    def _refuse(self, found: list[WindowsVolume]) -> None:
        for vol in found:
            if vol.dirty:
                raise ConversionError(
                    STEP_REFUSE,
                    f"{vol.label}: {vol.dirty}. Nothing was written. Fix: shut "
                    "Windows down cleanly on the recovery instance (Shut down, not hibernate) "
                    "and let replication catch up, or boot it once here so Windows replays its "
                    "logs, then run `failback-client convert` again",
                )
            if vol.hibernated and not vol.edits and not self.options.remove_hiberfile:
                self.notes.append(
                    f"{vol.partition.node} is hibernated or has Fast Startup on (hiberfil.sys); "
                    "nothing to change on it, so it was not written"
                )
            elif vol.hibernated and not self.options.remove_hiberfile:
                raise ConversionError(
                    STEP_REFUSE,
                    f"{vol.partition.node}: Windows left this volume hibernated or "
                    "with Fast Startup (hiberfil.sys), so it can only be mounted read-only. "
                    "Nothing was written. Fix: on the recovery instance turn Fast Startup off "
                    "(powercfg /h off) and shut down fully, then replicate again; or run "
                    "`failback-client convert --remove-hiberfile DISK` to discard the "
                    "hibernated session",
                )

    def _esp_to_fix(self) -> Partition | None:
        if self.mode != "uefi":
            return None
        esps = [p for p in self.disk.partitions if p.is_esp and p.fstype == "vfat"]
        with_windows = [p for p in esps if fat_has(self.disk.path, p.start, ESP_WINDOWS_LOADER)]
        if not with_windows:
            self.notes.append(
                f"no EFI System partition holds {ESP_WINDOWS_LOADER}: the firmware may not find "
                "Windows (run `bcdboot C:\\Windows /f UEFI` from recovery media)"
            )
            return None
        esp = with_windows[0]
        return None if fat_has(self.disk.path, esp.start, ESP_FALLBACK_LOADER) else esp

    # ---- writing ------------------------------------------------------------------------------------------

    def _write_hive(self, index: int, i: int, vol: WindowsVolume, esp: Partition | None) -> None:
        where = self.options.work_dir / f"windows-{index}-p{vol.partition.number}"
        with MountStack() as mounts:
            opts = "remove_hiberfile" if vol.hibernated and self.options.remove_hiberfile else ""
            self._step(
                "mount Windows read-write",
                lambda: mounts.mount(vol.partition.node, where, fstype="ntfs-3g", options=opts),
            )
            if _read_only(where):
                raise ConversionError(
                    STEP_REFUSE,
                    f"{vol.partition.node}: ntfs-3g mounted it read-only (Windows "
                    "left it hibernated, with Fast Startup or not cleanly unmounted). Nothing "
                    "was written. Fix: shut Windows down fully (no Fast Startup) and replicate "
                    "again, or run `failback-client convert --remove-hiberfile DISK`",
                )
            tx = Transaction(where, self.report)
            try:
                self._step(STEP_HIVE, lambda: self._edit_hive(tx, vol))
                if esp is not None:
                    self._step(STEP_ESP, lambda: self._copy_loader(tx, esp))
            except ConversionError:
                self.report.rolled_back += tx.rollback()
                raise
            finally:
                os.sync()
        _rmdir(where)

    def _edit_hive(self, tx: Transaction, vol: WindowsVolume) -> None:
        rel = "/" + vol.hive_rel
        backup = tx.backup_in_place(rel)
        hive = Hive(tx.host(rel), write=True)
        apply_edits(hive, vol.control_set, vol.edits or [])
        hive.commit()
        hive.close()
        for edit in vol.edits or []:
            self.report.changes.append(Change(vol.label, "edited", edit.detail, f"{vol.partition.node}:{backup}"))
            log.info("conversion change: %s: %s", vol.label, edit.detail)
        # Read back with a fresh handle: a second run must find nothing to do.
        check = Hive(tx.host(rel))
        _cs, left = plan_hive(
            check,
            tx.host(rel).parent.parent.parent,
            self.kinds,
            self.controllers,
            self.options.windows_cloud_services,
            [],
        )
        check.close()
        if left:
            raise ValueError(f"{vol.label}: after the commit, still to do: {'; '.join(e.detail for e in left)}")

    def _copy_loader(self, tx: Transaction, esp: Partition) -> None:
        image = f"{self.disk.path}@@{esp.start}"
        made_dir = not fat_has(self.disk.path, esp.start, "/EFI/Boot")
        with tempfile.TemporaryDirectory() as tmp:
            loader = Path(tmp) / "bootmgfw.efi"
            run(["mcopy", "-n", "-i", image, f"::{ESP_WINDOWS_LOADER}", os.fspath(loader)], env=MTOOLS_ENV)
            if made_dir:
                run(["mmd", "-i", image, "::/EFI/Boot"], env=MTOOLS_ENV)

            def undo() -> None:
                run(["mdel", "-i", image, f"::{ESP_FALLBACK_LOADER}"], check=False, env=MTOOLS_ENV)
                if made_dir:
                    run(["mrd", "-i", image, "::/EFI/Boot"], check=False, env=MTOOLS_ENV)

            tx.on_rollback(f"{esp.node}:{ESP_FALLBACK_LOADER}", undo)
            run(["mcopy", "-n", "-i", image, os.fspath(loader), f"::{ESP_FALLBACK_LOADER}"], env=MTOOLS_ENV)
        self.report.changes.append(
            Change(
                f"{esp.node}:{ESP_FALLBACK_LOADER}",
                "created",
                f"copy of {ESP_WINDOWS_LOADER}: the firmware finds Windows without an "
                "NVRAM boot entry (undo: delete it)",
            )
        )


def boot_mode_advice(disk: str, instance: str, this: str) -> str:
    return (
        f"the Windows system on {disk} was made to boot {instance.upper()} but this machine booted the "
        f"failback client in {this.upper()} mode; Windows only boots in the mode it was installed for. "
        f"Nothing was written. Fix: reboot this ISO in {instance.upper()} mode (firmware boot menu or "
        "setup), then fail back again"
    )
