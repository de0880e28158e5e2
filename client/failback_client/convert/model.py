"""What conversion is told (options), what it finds (disks, volumes, systems) and what it did (the report)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Units of cloud-only agents that fail (or wait for a metadata service) off the cloud: masked on the target.
DEFAULT_CLOUD_AGENTS: tuple[str, ...] = (
    "cloud-init-local.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
    "amazon-ssm-agent.service",
    "snap.amazon-ssm-agent.amazon-ssm-agent.service",
    "ec2-instance-connect.service",
    "ec2-instance-connect-harvest-hostkeys.service",
    "amazon-cloudwatch-agent.service",
    "aws-kinesis-agent.service",
    "hibinit-agent.service",
    "google-guest-agent.service",
    "walinuxagent.service",
)

# Windows drivers and services that only work on AWS (they fail, wait or look for the Xen/ENA devices off the
# cloud): set to Start=4 (disabled) on the target, each listed with its `sc.exe config` undo. Device-class
# filters among them (xenfilt) are left alone: disabling a filter stops its whole device class.
DEFAULT_WINDOWS_CLOUD_SERVICES: tuple[tuple[str, str], ...] = (
    ("ena", "AWS ENA network driver"),
    ("xenvbd", "AWS PV storage driver"),
    ("xennet", "AWS PV network driver"),
    ("xenvif", "AWS PV network interface driver"),
    ("xeniface", "AWS PV interface driver"),
    ("xenbus", "AWS PV bus driver"),
    ("xenfilt", "AWS PV filter driver"),
    ("AWSLiteAgent", "AWS Lite Guest Agent (PV drivers)"),
    ("AmazonSSMAgent", "SSM Agent"),
    ("EC2Launch", "EC2Launch v2 agent"),
    ("Ec2Config", "EC2Config agent"),
    ("AmazonCloudWatchAgent", "CloudWatch agent"),
)

# Drivers an initramfs carries whatever this machine has: the common virtual and standard controllers.
BASE_DRIVERS: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "ahci",
    "nvme",
    "sd_mod",
    "sr_mod",
)

BootMode = Literal["bios", "uefi"]


class ConversionError(Exception):
    """A step of the conversion failed: `step` names it, str() says why."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


def run_step(
    report: ConversionReport,
    progress: Callable[[str], None],
    name: str,
    fn: Callable[[], object],
    errors: tuple[type[BaseException], ...],
) -> None:
    """One named step of a conversion: shown, run, recorded as done; `errors` become ConversionError(name)."""
    progress(name)
    try:
        fn()
    except ConversionError:
        raise
    except errors as exc:
        raise ConversionError(name, str(exc)) from None
    report.steps_done.append(name)


@dataclass(frozen=True)
class StaticNetwork:
    """Static settings the admin gave instead of DHCP (address in CIDR form, e.g. 192.0.2.10/24)."""

    address: str
    gateway: str | None = None
    dns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_interface(self.address)
            if "/" not in self.address:
                raise ValueError("no prefix length")
        except ValueError as exc:
            raise ValueError(
                f"static network address {self.address!r} must be an address with a prefix length "
                f"such as 192.0.2.10/24 ({exc})"
            ) from None
        for name, value in (("gateway", self.gateway), *(("dns", d) for d in self.dns)):
            if value is not None:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise ValueError(f"static network {name} {value!r} is not an IP address") from None


@dataclass(frozen=True)
class ConversionOptions:
    boot_mode: Literal["auto", "bios", "uefi"] = "auto"  # auto: what this machine booted the LiveCD with
    disable_units: tuple[str, ...] = DEFAULT_CLOUD_AGENTS
    static_network: StaticNetwork | None = None  # None: DHCP on every wired NIC
    extra_drivers: tuple[str, ...] = ()  # kernel modules to add to the initramfs besides those found
    sys_root: Path = Path("/")  # where this machine's /sys is read (tests point it at recorded trees)
    work_dir: Path = Path("/run/failback-convert")  # private mount points live here
    efi_removable: bool = True  # also install GRUB as EFI/BOOT/BOOTX64.EFI (firmware without a boot entry)
    dry_run: bool = False  # list what would change (Windows) and write nothing
    windows_controllers: tuple[str, ...] = ()  # controller kinds (Linux driver names) besides this machine's
    windows_cloud_services: tuple[tuple[str, str], ...] = DEFAULT_WINDOWS_CLOUD_SERVICES
    remove_hiberfile: bool = False  # the admin's consent to discard a hibernated / Fast Startup session


@dataclass
class Partition:
    number: int
    node: str  # /dev/sdb1 (may be absent for image files)
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type_code: str  # GPT type GUID or MBR type byte, as sfdisk prints it
    fstype: str = ""
    uuid: str = ""
    label: str = ""
    partuuid: str = ""

    @property
    def is_esp(self) -> bool:
        return self.type_code.upper() in ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EF")

    @property
    def is_bios_boot(self) -> bool:
        return self.type_code.upper() == "21686148-6449-6E6F-744E-656564454649"


@dataclass
class Disk:
    path: str
    table: str = ""  # gpt, dos, or "" (none)
    partitions: list[Partition] = field(default_factory=list)
    whole_fstype: str = ""  # a filesystem on the whole disk (no partition table)
    whole_uuid: str = ""
    problem: str = ""  # why the disk cannot be interpreted ("" when it can)


@dataclass
class Volume:
    """A block device holding a filesystem: a partition, a whole disk or an LVM logical volume."""

    node: str
    fstype: str
    uuid: str
    label: str
    disk: str  # the target disk it lives on
    partition: int | None = None  # partition number, None for whole disks and LVs
    partuuid: str = ""


@dataclass
class LinuxSystem:
    root: Volume
    name: str  # PRETTY_NAME from os-release
    os_id: str
    version: str
    fstab: str  # its text
    initramfs_tool: str = ""  # initramfs-tools, dracut, mkinitrd, or ""
    boot_loader: str = ""  # what was found, for the report
    instance_boot_mode: str = ""  # how the instance booted, as far as the disk tells (bios, uefi, both, unknown)


@dataclass
class WindowsSystem:
    disk: str
    evidence: list[str]  # what showed it is Windows
    checks: list[str]  # what an admin must check
    converted: bool = False  # the registry/ESP conversion ran (checks then lists what is left to check)
    instance_boot_mode: str = ""  # how its disk boots (bios, uefi, "" unknown)


@dataclass
class Change:
    path: str  # as seen inside the target (/etc/fstab) or a device for boot sectors
    action: str  # edited, created, removed, masked, regenerated, installed
    detail: str
    backup: str = ""  # the backup's path inside the target, when there is one


@dataclass
class ConversionReport:
    disks: list[Disk] = field(default_factory=list)
    linux: list[LinuxSystem] = field(default_factory=list)
    windows: list[WindowsSystem] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    steps_done: list[str] = field(default_factory=list)
    failed_step: str | None = None
    error: str | None = None
    rolled_back: list[str] = field(default_factory=list)  # files put back after a failure
    boot_mode: str = ""
    drivers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed_step is None

    def change(self, path: str) -> list[Change]:
        return [c for c in self.changes if c.path == path]
