"""Which Windows boot-start driver each storage controller needs: one table from the Linux kernel driver (as
/sys/bus/pci/drivers names it) to the Windows service(s), and the scan of this machine's controllers.

Sources for the table:
- Microsoft: "Stop error 0x7B INACCESSIBLE_BOOT_DEVICE" and KB 922976 ("Error message when you start a
  computer after you change the SATA mode"): the controller's miniport must have Start=0 and its
  `StartOverride` key removed (storahci on Windows 8 / Server 2012 and later, msahci before).
- Microsoft Learn, "StorNVMe" (stornvme, inbox since Windows 8.1 / Server 2012 R2); the inbox LSI/Broadcom
  miniports lsi_sas, lsi_scsi, lsi_sas2i, lsi_sas3i, megasas, megasas2i, megasas35i (driver store of Windows
  Server 2012 R2-2022: lsi_sas.inf, lsi_sas2i.inf, lsi_sas3i.inf, megasas*.inf).
- Microsoft, Hyper-V integration: storvsc sits on the VMBus (vmbus), both inbox since Server 2008 R2.
- virt-v2v convert_windows.ml (libguestfs): virtio-blk is viostor, virtio-scsi is vioscsi; both come with
  virtio-win, not with Windows.
- VMware: the PVSCSI miniport `pvscsi` ships with VMware Tools.
- Intel: RST in RAID mode is iaStorAVC (inbox in Windows 10 / Server 2016 and later) or iaStorV (Windows 7 /
  Server 2008 R2); VMD needs Intel's iaStorVD, not inbox.

A service that is not in the hive (or whose .sys file is missing) is never created: the report says the
controller "needs the vendor's driver" with its PCI ID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WindowsDriver:
    services: tuple[str, ...]  # miniport service names: every one present in the hive is set to boot start
    needs: tuple[str, ...] = ()  # services it sits on, also set to boot start (the bus driver)
    what: str = ""


# Linux driver -> Windows services. "intel_rst" and "vmd" are this module's names for Intel RAID-mode and VMD
# controllers (Linux drives RST RAID with ahci, VMD with vmd).
WINDOWS_DRIVERS: dict[str, WindowsDriver] = {
    "ahci": WindowsDriver(("storahci", "msahci"), what="AHCI SATA controller"),
    "intel_rst": WindowsDriver(("iaStorAVC", "iaStorV"), what="Intel RST (RAID mode)"),
    "vmd": WindowsDriver(("iaStorVD",), what="Intel VMD (RST with VMD)"),
    "nvme": WindowsDriver(("stornvme",), what="NVMe controller"),
    "ata_piix": WindowsDriver(("intelide", "pciide"), needs=("atapi",), what="Intel IDE controller"),
    "mptsas": WindowsDriver(("LSI_SAS",), what="LSI/Broadcom SAS (Fusion-MPT SAS)"),
    "mptspi": WindowsDriver(("LSI_SCSI",), what="LSI/Broadcom parallel SCSI (Fusion-MPT SPI)"),
    "mpt3sas": WindowsDriver(("LSI_SAS2i", "LSI_SAS3i"), what="LSI/Broadcom SAS2/SAS3 HBA"),
    "megaraid_sas": WindowsDriver(("megasas", "megasas2i", "megasas35i"), what="Broadcom MegaRAID SAS"),
    "vmw_pvscsi": WindowsDriver(("pvscsi",), what="VMware paravirtual SCSI"),
    "hv_storvsc": WindowsDriver(("storvsc",), needs=("vmbus",), what="Hyper-V synthetic storage"),
    "virtio_blk": WindowsDriver(("viostor",), what="virtio block"),
    "virtio_scsi": WindowsDriver(("vioscsi",), what="virtio SCSI"),
}

MASS_STORAGE_CLASS = 0x01
RAID_SUBCLASS = 0x0104
INTEL = 0x8086
VIRTIO_PCI_DRIVERS = ("virtio-pci", "virtio_pci")


@dataclass(frozen=True)
class Controller:
    kind: str  # the Linux driver name (a WINDOWS_DRIVERS key), "" when no driver is bound
    pci_id: str  # vendor:device (e.g. 8086:2922), or the VMBus class id for Hyper-V devices
    slot: str  # 0000:00:1f.2
    pci_class: int = 0

    def describe(self) -> str:
        what = WINDOWS_DRIVERS[self.kind].what if self.kind in WINDOWS_DRIVERS else self.kind or "no Linux driver"
        return f"{what} (PCI {self.pci_id} at {self.slot})" if self.pci_class else f"{what} ({self.pci_id})"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _driver(dev: Path) -> str:
    link = dev / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def storage_controllers(sys_root: Path = Path("/")) -> list[Controller]:
    """This machine's storage controllers: PCI mass-storage devices (class 01xx) with their bound driver
    (virtio's is the one of its virtio child), and Hyper-V storvsc devices on the VMBus."""
    out: list[Controller] = []
    pci = sys_root / "sys/bus/pci/devices"
    for dev in sorted(pci.iterdir()) if pci.is_dir() else []:
        try:
            cls = int(_read(dev / "class") or "0", 16)
            vendor, device = int(_read(dev / "vendor") or "0", 16), int(_read(dev / "device") or "0", 16)
        except ValueError:
            continue
        if cls >> 16 != MASS_STORAGE_CLASS:
            continue
        kind = _driver(dev).replace("-", "_") if _driver(dev) not in VIRTIO_PCI_DRIVERS else ""
        if _driver(dev) in VIRTIO_PCI_DRIVERS:
            kind = next((_driver(c).replace("-", "_") for c in sorted(dev.glob("virtio*")) if _driver(c)), "")
        if kind == "ahci" and vendor == INTEL and cls >> 8 == RAID_SUBCLASS:
            kind = "intel_rst"
        out.append(Controller(kind, f"{vendor:04x}:{device:04x}", dev.name, cls))
    vmbus = sys_root / "sys/bus/vmbus/devices"
    for dev in sorted(vmbus.iterdir()) if vmbus.is_dir() else []:
        if _driver(dev) == "hv_storvsc":
            out.append(Controller("hv_storvsc", "VMBus " + (_read(dev / "class_id") or dev.name), dev.name))
    return out


def parse_controllers(text: str) -> tuple[str, ...]:
    """--controllers DRIVER,...: Linux driver names (dashes or underscores), each one a table entry."""
    names = tuple(dict.fromkeys(n.strip().replace("-", "_") for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in WINDOWS_DRIVERS]
    if unknown:
        raise ValueError(
            f"unknown controller driver(s) {', '.join(unknown)}; known: {', '.join(sorted(WINDOWS_DRIVERS))}"
        )
    return names
