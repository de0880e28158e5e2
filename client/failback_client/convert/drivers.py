"""The drivers this machine needs, from what the running LiveCD sees in /sys, and which of them a target
kernel has as a module (modules.dep) or built in (modules.builtin)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Drivers of buses and bridges met while walking up a device path: not what a disk or NIC needs.
_IGNORED = {"pcieport", "shpchp", "agpgart-intel", "usb", "hub", "port", "serial8250", "platform", "processor"}


@dataclass
class LocalHardware:
    storage: set[str] = field(default_factory=set)  # module names of the disk controllers' drivers
    network: set[str] = field(default_factory=set)  # module names of the NICs' drivers
    nics: list[str] = field(default_factory=list)  # names of wired NICs (physical, not wireless)


def norm(module: str) -> str:
    return module.replace("-", "_")


def _module_of(driver_link: Path) -> str | None:
    """The module behind a /sys/.../driver link: its `module` link's name, else the driver's own name."""
    try:
        driver_dir = driver_link.resolve(strict=True)
    except OSError:
        return None
    module = driver_dir / "module"
    name = os.path.basename(os.readlink(module)) if module.is_symlink() else driver_dir.name
    return None if name in _IGNORED else norm(name)


def _drivers_up(device: Path, stop: Path) -> set[str]:
    """Drivers of `device` and of every parent device up to /sys/devices."""
    found: set[str] = set()
    try:
        here = device.resolve(strict=True)
    except OSError:
        return found
    while here != stop and stop in here.parents:
        link = here / "driver"
        if link.is_symlink():
            mod = _module_of(link)
            if mod:
                found.add(mod)
        here = here.parent
    return found


def local_hardware(sys_root: Path = Path("/")) -> LocalHardware:
    sysfs = sys_root / "sys"
    stop = (sysfs / "devices").resolve() if (sysfs / "devices").exists() else sysfs / "devices"
    hw = LocalHardware()
    block = sysfs / "block"
    for dev in sorted(block.iterdir()) if block.is_dir() else []:
        if dev.name.startswith(("loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd")):
            continue
        if (dev / "device").exists():
            hw.storage |= _drivers_up(dev / "device", stop)
    net = sysfs / "class" / "net"
    for nic in sorted(net.iterdir()) if net.is_dir() else []:
        if not (nic / "device").exists() or (nic / "wireless").exists() or (nic / "phy80211").exists():
            continue
        hw.nics.append(nic.name)
        hw.network |= _drivers_up(nic / "device", stop)
    # The disks' drivers sit next to the SCSI/ATA layers: sd_mod is what makes SCSI/SATA disks appear.
    if any(
        d.startswith(
            (
                "ahci",
                "ata_",
                "pata_",
                "sata_",
                "mpt",
                "megaraid",
                "hpsa",
                "smartpqi",
                "aacraid",
                "virtio_scsi",
                "vmw_pvscsi",
                "hv_storvsc",
                "uas",
                "usb_storage",
            )
        )
        for d in hw.storage
    ):
        hw.storage.add("sd_mod")
    return hw


_DEP_RE = re.compile(r"^(?:.*/)?(?P<name>[^/:]+?)\.ko(?:\.(?:xz|zst|gz))?:", re.M)
_BUILTIN_RE = re.compile(r"^(?:.*/)?(?P<name>[^/]+?)\.ko$", re.M)


def kernel_modules(target: Path) -> dict[str, tuple[set[str], set[str]]]:
    """For each kernel in the target's /lib/modules: (loadable module names, built-in module names)."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    base = target / "lib" / "modules"
    if not base.is_dir():
        base = target / "usr" / "lib" / "modules"
    for kdir in sorted(base.iterdir()) if base.is_dir() else []:
        dep = kdir / "modules.dep"
        if not dep.is_file():
            continue
        loadable = {norm(m.group("name")) for m in _DEP_RE.finditer(dep.read_text(errors="replace"))}
        builtin_file = kdir / "modules.builtin"
        builtin = (
            {norm(m.group("name")) for m in _BUILTIN_RE.finditer(builtin_file.read_text(errors="replace"))}
            if builtin_file.is_file()
            else set()
        )
        out[kdir.name] = (loadable, builtin)
    return out
