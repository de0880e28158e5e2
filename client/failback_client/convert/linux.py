"""Converting one restored Linux system: mount it read-write under a private directory (with /boot, the ESP,
/usr and /var when separate, and the API filesystems bound in), then the steps below in the target's own
chroot. A failing step raises ConversionError; every file changed so far is then put back (rollback)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from failback_client.convert import agents, bootloader, initramfs, network
from failback_client.convert.devrefs import (
    DeviceResolver,
    fstab_entries,
    kernel_arg_roots,
    rewrite_table,
    root_reference,
    split_kernel_name,
)
from failback_client.convert.drivers import LocalHardware, kernel_modules
from failback_client.convert.files import Transaction
from failback_client.convert.model import (
    BASE_DRIVERS,
    BootMode,
    ConversionError,
    ConversionOptions,
    ConversionReport,
    Disk,
    LinuxSystem,
    Volume,
    run_step,
)
from failback_client.convert.mounts import MountStack
from failback_client.convert.runner import CommandFailed

log = logging.getLogger(__name__)

# Mount points that must be there for the initramfs tool, GRUB and package metadata to work.
NEEDED_MOUNTS = ("/usr", "/var", "/boot", "/boot/efi", "/efi")
STEP_MOUNT = "mount the restored system"
STEP_DEVREFS = "device references (fstab, crypttab, GRUB defaults)"
STEP_NETWORK = "network configuration"
STEP_AGENTS = "cloud agents"


def find_volume(spec: str, fstype: str, volumes: list[Volume], resolver: DeviceResolver) -> Volume | None:
    """The volume an fstab source names (UUID=, LABEL=, PARTUUID=, /dev/disk/by-*, LVM paths, kernel names)."""
    for prefix, attr in (
        ("UUID=", "uuid"),
        ("LABEL=", "label"),
        ("PARTUUID=", "partuuid"),
        ("/dev/disk/by-uuid/", "uuid"),
        ("/dev/disk/by-label/", "label"),
        ("/dev/disk/by-partuuid/", "partuuid"),
    ):
        if spec.startswith(prefix):
            value = spec[len(prefix) :].strip("\"'").lower()
            return next((v for v in volumes if getattr(v, attr).lower() == value and value), None)
    if split_kernel_name(spec):
        return resolver.resolve(spec, fstype)
    if spec.startswith("/dev/"):
        real = os.path.realpath(spec)
        return next((v for v in volumes if v.node == spec or os.path.realpath(v.node) == real), None)
    return None


def wanted_modules(
    hw: LocalHardware, system_fs: set[str], options: ConversionOptions, target: Path, report: ConversionReport
) -> list[str]:
    """Drivers for the initramfs: this machine's controllers and NICs, the basics, the root's filesystem;
    only those that a target kernel has as a module (built-in ones need no listing)."""
    found = hw.storage | hw.network | set(options.extra_drivers)
    wanted = found | set(BASE_DRIVERS) | (system_fs & {"ext4", "xfs", "btrfs"})
    kernels = kernel_modules(target)
    if not kernels:
        raise ConversionError("initramfs", "no kernel modules (modules.dep) found in the target's /lib/modules")
    out = []
    for mod in sorted(wanted):
        loadable = [k for k, (mods, _b) in kernels.items() if mod in mods]
        builtin = [k for k, (_m, b) in kernels.items() if mod in b]
        if loadable:
            out.append(mod)
        elif not builtin and mod in found:
            report.warnings.append(
                f"driver {mod} (used by this machine) is in none of the target's kernels "
                f"({', '.join(sorted(kernels))}): the system may not see that device"
            )
    return out


class LinuxConversion:
    def __init__(
        self,
        system: LinuxSystem,
        disks: list[Disk],
        volumes: list[Volume],
        hw: LocalHardware,
        mode: BootMode,
        options: ConversionOptions,
        report: ConversionReport,
        progress: Callable[[str], None],
    ) -> None:
        self.system, self.disks, self.volumes, self.hw = system, disks, volumes, hw
        self.mode, self.options, self.report, self.progress = mode, options, report, progress
        self.resolver = DeviceResolver(volumes, system.root)
        self.esp_mountpoint: str | None = None

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        run_step(self.report, self.progress, name, fn, (CommandFailed, OSError, ValueError))

    def run(self, index: int) -> None:
        root = self.options.work_dir / f"target-{index}"
        with MountStack() as mounts:
            self._step(STEP_MOUNT, lambda: self._mount(mounts, root))
            tx = Transaction(root, self.report)
            try:
                self._step(STEP_DEVREFS, lambda: self._devrefs(tx))
                self._step(
                    STEP_NETWORK,
                    lambda: self.report.warnings.extend(
                        network.convert_network(tx, static=self.options.static_network, nics=self.hw.nics)
                    ),
                )
                self._step(STEP_AGENTS, lambda: self._agents(tx))
                self._step(initramfs.STEP, lambda: self._initramfs(tx))
                self._step(bootloader.STEP_CONFIG, lambda: bootloader.regenerate_config(tx))
                self._step(bootloader.STEP_INSTALL, lambda: self._install(tx))
            except ConversionError:
                self.report.rolled_back += tx.rollback()
                raise
            finally:
                os.sync()

    # ---- steps ---------------------------------------------------------------------------------------------

    def _mount(self, mounts: MountStack, root: Path) -> None:
        sysm = self.system
        mounts.mount(sysm.root.node, root, fstype=sysm.root.fstype)
        # How the instance named its root tells which old disk name is the root's disk.
        for ref in [
            root_reference(sysm.fstab) or "",
            *kernel_arg_roots(_read(root / "etc/default/grub")),
            *kernel_arg_roots(_read(root / "boot/grub/grub.cfg")),
        ]:
            self.resolver.learn_root(ref)
        for fields in fstab_entries(sysm.fstab):
            if len(fields) < 3 or fields[1] not in NEEDED_MOUNTS:
                continue
            spec, where, fstype = fields[0], fields[1], fields[2]
            vol = find_volume(spec, fstype, self.volumes, self.resolver)
            is_esp = where in ("/boot/efi", "/efi")
            if vol is None:
                msg = f"{where}: its fstab source {spec} is on none of the target disks"
                if is_esp and self.mode == "bios":
                    self.report.warnings.append(msg + " (not needed to boot BIOS)")
                    continue
                raise ConversionError(STEP_MOUNT, msg)
            try:
                mounts.mount(vol.node, root / where.lstrip("/"), fstype=vol.fstype)
            except CommandFailed as exc:
                if is_esp and self.mode == "bios":
                    self.report.warnings.append(
                        f"{where} ({vol.node}) could not be mounted; not needed to boot "
                        f"BIOS: {str(exc).splitlines()[0]}"
                    )
                    continue
                raise
            if is_esp:
                self.esp_mountpoint = where
        for api in ("/dev", "/proc", "/sys"):
            mounts.bind(api, root / api.lstrip("/"))
        # A fresh /run (our own mounts may live under the LiveCD's /run), with udev's database for the tools
        # that ask udev about devices (grub-probe, lsblk).
        mounts.mount("tmpfs", root / "run", fstype="tmpfs", options="mode=0755,nosuid,nodev")
        if os.path.isdir("/run/udev"):
            mounts.bind("/run/udev", root / "run/udev")

    def _devrefs(self, tx: Transaction) -> None:
        unresolved: list[str] = []
        for rel, field, type_field in (("/etc/fstab", 0, 2), ("/etc/crypttab", 1, None)):
            text = tx.read(rel)
            if text is None:
                continue
            new, done, missing = rewrite_table(text, self.resolver, source_field=field, type_field=type_field, name=rel)
            unresolved += missing
            if done:
                tx.write(rel, new, "; ".join(f"{r.old} -> {r.new} ({r.where.split(' in ')[0]})" for r in done))
        unresolved += bootloader.rewrite_defaults(tx, self.resolver)
        for dev in sorted(set(unresolved)):
            self.report.warnings.append(f"{dev}: no target volume matches this device name; left as it is")

    def _agents(self, tx: Transaction) -> None:
        masked = agents.disable_agents(tx, self.options.disable_units)
        if not masked:
            log.info("no cloud agent units found in the target")

    def _initramfs(self, tx: Transaction) -> None:
        fs = {self.system.root.fstype}
        modules = wanted_modules(self.hw, fs, self.options, tx.root, self.report)
        self.report.drivers = modules
        initramfs.regenerate(tx, self.system.initramfs_tool, modules)

    def _install(self, tx: Transaction) -> None:
        if self.mode == "uefi":
            bootloader.install_uefi(
                tx, self.esp_mountpoint, self.system.os_id or "linux", removable=self.options.efi_removable
            )
            return
        disk = next((d for d in self.disks if d.path == self.system.root.disk), None)
        boot_vol = self.system.root
        for fields in fstab_entries(self.system.fstab):
            if len(fields) >= 2 and fields[1] == "/boot":
                boot_vol = (
                    find_volume(fields[0], fields[2] if len(fields) > 2 else "", self.volumes, self.resolver)
                    or boot_vol
                )
        disk = next((d for d in self.disks if d.path == boot_vol.disk), disk)
        if disk is None:
            raise ConversionError(bootloader.STEP_INSTALL, "cannot tell which target disk holds /boot")
        bootloader.install_bios(tx, disk)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
