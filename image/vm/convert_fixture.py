"""A small bootable Debian disk image made like a cloud (recovery) instance, for the conversion tests.

What makes it "cloud": a GPT disk laid out as Debian's cloud images are (p1 root, p14 BIOS boot, p15 ESP);
/etc/fstab and the kernel command line name /dev/nvme0n1p1 (the NVMe name the instance had); an initramfs
built with MODULES=list and only `nvme` in /etc/initramfs-tools/modules (all an instance needs); the network
configured by a systemd-networkd .network/.link pair pinned to the instance's MAC address (what cloud-init's
networkd renderer writes); and stand-in unit files named like cloud-init and amazon-ssm-agent (the real
packages pull in far more than a test needs; conversion only looks at the unit names).

A oneshot unit `failback-boot-marker.service` writes `FAILBACK-CONVERTED-BOOT-OK <ip>` to the serial console
once network-online.target is reached, or `FAILBACK-BOOT-NO-ADDRESS` when no IPv4 address came by DHCP.

The image takes minutes (mmdebstrap, initramfs, GRUB): it is cached under build/cache/convert-fixture/<key>/
where the key covers every input below, and built at most once (a lock file guards concurrent runs).
Needs root (loop devices, mounts, chroot).

Used by tests/test_convert_*.py, and meant for the end-to-end failback too: use `cloud_fixture().image` as the
recovery instance's volume, `convert_image()` (or the client's own conversion) on the failed-back disk, then
`boot_disk(...)` must give outcome "matched" (BOOT_OK, with the DHCP address as its group).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from failback_client.console import Console
from failback_client.convert import ConversionOptions, ConversionReport, convert

from image.core.mounts import clear_leftovers, release, require_no_mounts
from image.core.paths import REPO, code_digest, digest
from image.core.run import run
from image.stages.config import apt_sources, load_config
from image.vm import qemu

log = logging.getLogger("image.vm.convert_fixture")

CACHE = REPO / "build" / "cache" / "convert-fixture"
MAIN_APT_CACHE = REPO / "build" / "cache" / "apt"  # read only: .debs the main build already downloaded
# The recipe is this module (its constants and code): editing it rebuilds the fixture.
CODE = ("image/vm/convert_fixture.py",)
DISK_MIB = 2048
CLOUD_MAC = "0a:1b:2c:3d:4e:5f"
CLOUD_NIC = "ens5"
MARKER = "FAILBACK-CONVERTED-BOOT-OK"
NO_ADDRESS_MARKER = "FAILBACK-BOOT-NO-ADDRESS"
ROOT_PASSWORD = "failback"  # a throw-away test image: lets a human log in on the serial console

PACKAGES = (
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "grub-pc",
    "grub-efi-amd64-bin",
    "e2fsprogs",
    "dosfstools",
    "iproute2",
    "usr-is-merged",
)

# sgdisk layout (Debian cloud images): BIOS boot p14, ESP p15, root p1 filling the rest.
PARTITIONS = (
    ("14", "2048", "+3M", "EF02"),
    ("15", "0", "+60M", "EF00"),
    ("1", "0", "0", "8300"),
)

FSTAB = """\
# /etc/fstab of the recovery instance (kernel names of its NVMe disk)
/dev/nvme0n1p1  /          ext4  rw,discard,errors=remount-ro  0 1
/dev/nvme0n1p15 /boot/efi  vfat  defaults                      0 0
"""

GRUB_DEFAULT = """\
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="root=/dev/nvme0n1p1 console=tty0 console=ttyS0,115200n8 net.ifnames=1"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
"""

CLOUD_NETWORK = f"""\
# written by cloud-init's networkd renderer on the recovery instance
[Match]
MACAddress={CLOUD_MAC}
Name={CLOUD_NIC}

[Network]
DHCP=ipv4
"""

CLOUD_LINK = f"""\
[Match]
MACAddress={CLOUD_MAC}

[Link]
Name={CLOUD_NIC}
"""

STAND_IN_UNIT = """\
# Stand-in for the cloud agent of the same name (the real package is not needed to test conversion).
[Unit]
Description={name} (test stand-in for the cloud agent)
After=network-online.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{name} stand-in: would contact the instance metadata service"'

[Install]
WantedBy=multi-user.target
"""

MARKER_SCRIPT = f"""\
#!/bin/sh
# Tells the QEMU test that the system booted and got an IPv4 address by DHCP.
ip=$(ip -4 -o addr show scope global | awk '{{split($4, a, "/"); print a[1]; exit}}')
if [ -n "$ip" ]; then
  echo "{MARKER} $ip" > /dev/ttyS0
else
  echo "{NO_ADDRESS_MARKER}" > /dev/ttyS0
fi
"""

MARKER_UNIT = """\
[Unit]
Description=Failback conversion test: report boot and DHCP address on the serial console
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/failback-boot-marker

[Install]
WantedBy=multi-user.target
"""

CHROOT_SETUP = f"""\
set -eu
sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf
echo nvme >> /etc/initramfs-tools/modules
update-initramfs -u -k all
grub-install --target=i386-pc "$1"
update-grub
systemctl enable systemd-networkd.service failback-boot-marker.service cloud-init.service amazon-ssm-agent.service
echo 'root:{ROOT_PASSWORD}' | chpasswd
"""


@dataclass(frozen=True)
class Fixture:
    image: Path  # the pristine cloud-like disk image (never modified; copy it before use)
    build_seconds: float  # 0 when it came from the cache


def fixture_key() -> str:
    cfg = load_config()
    parts = (
        code_digest(*CODE),
        PACKAGES,
        PARTITIONS,
        DISK_MIB,
        FSTAB,
        GRUB_DEFAULT,
        CLOUD_NETWORK,
        CLOUD_LINK,
        STAND_IN_UNIT,
        MARKER_SCRIPT,
        MARKER_UNIT,
        CHROOT_SETUP,
        cfg.debian,
    )
    return digest("convert-fixture", *parts)[:16]


def cloud_fixture(cache: Path = CACHE) -> Fixture:
    """The cached image, built first when missing."""
    key = fixture_key()
    dest = cache / key / "cloud-disk.img"
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        for work in cache.glob("*/work"):  # a killed or failed run's (any key): its mounts, loop devices, files
            clear_leftovers(work)
        if dest.is_file():
            return Fixture(dest, 0.0)
        start = time.monotonic()
        build_image(dest, cache / "apt")
        return Fixture(dest, time.monotonic() - start)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """`image` attached to a loop device whose partitions have device nodes."""
    dev = run(["losetup", "--find", "--show", "--partscan", str(image)], capture=True).stdout.strip()
    try:
        # Without udev (containers) the partition scan may not reach /dev: ask the kernel again.
        if not Path(f"{dev}p1").exists():
            run(["partx", "--add", dev], check=False)
        for _ in range(50):
            if Path(f"{dev}p1").exists():
                break
            time.sleep(0.1)
        yield dev
    finally:
        run(["losetup", "--detach", dev], check=False)


@contextlib.contextmanager
def _mounted(dev: str, where: Path, *extra: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run(["mount", *extra, dev, str(where)])
    try:
        yield where
    finally:
        run(["umount", str(where)], check=False)


def _mmdebstrap(target: Path, apt_cache: Path) -> None:
    cfg = load_config()
    apt_cache.mkdir(parents=True, exist_ok=True)
    hooks = ['--setup-hook=mkdir -p "$1"/var/cache/apt/archives/']
    if MAIN_APT_CACHE.is_dir():
        hooks.append(f"--setup-hook=sync-in {MAIN_APT_CACHE} /var/cache/apt/archives/")
    hooks += [
        f"--setup-hook=sync-in {apt_cache} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {apt_cache}",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
    ]
    run([
        "mmdebstrap", "--variant=minbase", "--architectures=amd64",
        f"--components={','.join(cfg.debian.components)}",
        f"--include={','.join(PACKAGES)}",
        "--aptopt=APT::Install-Recommends \"false\"", "--aptopt=Acquire::Retries \"3\"",
        "--skip=download/empty", "--skip=essential/unlink",
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        *hooks,
        cfg.debian.suite, str(target), *apt_sources(cfg),
    ])  # fmt: skip


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def build_image(dest: Path, apt_cache: Path) -> None:
    work = dest.parent / "work"
    clear_leftovers(work)
    work.mkdir(parents=True)
    try:
        _build_in(work, dest, apt_cache)
    except BaseException:
        release(work)  # nothing stays mounted or attached; the files stay for a look (removed at the next start)
        raise
    shutil.rmtree(work)


def _build_in(work: Path, dest: Path, apt_cache: Path) -> None:
    tree = work / "tree"
    log.info("convert fixture: mmdebstrap (a few minutes)...")
    _mmdebstrap(tree, apt_cache)
    for rel, text in (
        ("/etc/fstab", FSTAB),
        ("/etc/default/grub", GRUB_DEFAULT),
        ("/etc/systemd/network/10-cloud-init-ens5.network", CLOUD_NETWORK),
        ("/etc/systemd/network/10-cloud-init-ens5.link", CLOUD_LINK),
        ("/lib/systemd/system/cloud-init.service", STAND_IN_UNIT.format(name="cloud-init")),
        ("/lib/systemd/system/amazon-ssm-agent.service", STAND_IN_UNIT.format(name="amazon-ssm-agent")),
        ("/etc/systemd/system/failback-boot-marker.service", MARKER_UNIT),
        ("/etc/hostname", "recovery-instance\n"),
    ):
        _write(tree, rel, text)
    _write(tree, "/usr/local/sbin/failback-boot-marker", MARKER_SCRIPT, 0o755)

    img = work / "cloud-disk.img"
    with img.open("wb") as f:
        f.truncate(DISK_MIB * 1024 * 1024)
    sg = ["sgdisk", "--clear"]
    for num, start, end, code in PARTITIONS:
        sg += [f"--new={num}:{start}:{end}", f"--typecode={num}:{code}"]
    run([*sg, str(img)])
    mnt = work / "mnt"
    with loop_device(img) as dev:
        run(["mkfs.ext4", "-q", "-L", "cloudimg-rootfs", f"{dev}p1"])
        run(["mkfs.vfat", "-F", "32", "-n", "UEFI", f"{dev}p15"])
        with _mounted(f"{dev}p1", mnt):
            require_no_mounts(tree, f"copy it into {img.name}")
            run(["cp", "-a", f"{tree}/.", str(mnt)])
            # The ESP is not mounted: the host kernel may lack vfat, and a BIOS instance never needed it.
            with _chroot_mounts(mnt):
                run(["chroot", str(mnt), "sh", "-c", CHROOT_SETUP, "setup", dev])
    shutil.rmtree(tree)
    img.rename(dest)


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    done: list[Path] = []
    try:
        for src in ("/dev", "/proc", "/sys", "/run"):
            where = root / src.lstrip("/")
            where.mkdir(exist_ok=True)
            run(["mount", "--rbind", src, str(where)])
            run(["mount", "--make-rslave", str(where)])
            done.append(where)
        yield
    finally:
        for where in reversed(done):
            run(["umount", "-R", str(where)], check=False)


def convert_image(
    image: Path, work_dir: Path, console: Console | None = None, **options: Any
) -> tuple[ConversionReport, float]:
    """Run the client's conversion on a disk image file (attached to a loop device); (report, seconds).
    `options` are ConversionOptions fields (boot_mode defaults to bios: what boot_disk's SeaBIOS machine uses)."""
    console = console or Console(stdin=io.StringIO(""), plain=True)
    opts = ConversionOptions(**{"boot_mode": "bios", "work_dir": work_dir, **options})
    start = time.monotonic()
    with loop_device(image) as dev:
        report = convert([Path(dev)], console, opts)
    return report, time.monotonic() - start


def copy_image(src: Path, dest: Path) -> Path:
    """A sparse working copy of the pristine fixture."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "--sparse=always", str(src), str(dest)])
    return dest


# ---- booting a disk image under QEMU ----------------------------------------------------------------------------

# The storage controller the "local server" has: anything but the instance's NVMe.
CONTROLLERS = {
    "ahci": ["-device", "ide-hd,drive=disk0,bus=ide.0,bootindex=0"],  # q35's built-in ICH9 AHCI
    "virtio-blk": ["-device", "virtio-blk-pci,drive=disk0,bootindex=0"],
}
BOOT_OK = re.compile(re.escape(MARKER) + r" (\d+\.\d+\.\d+\.\d+)")
BOOT_FAILURES = (
    *qemu.FAILURE_PATTERNS,
    re.compile(r"Gave up waiting for root file system device.*"),
    re.compile(re.escape(NO_ADDRESS_MARKER)),
)


def disk_boot_argv(
    image: Path, controller: str, *, serial_log: Path, qmp_socket: Path, memory_mib: int = 1024
) -> list[str]:
    """SeaBIOS on q35 with the disk on `controller` and a virtio NIC on QEMU's user network (DHCP server)."""
    if controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {controller!r}; known: {', '.join(CONTROLLERS)}")
    return [
        qemu.QEMU, "-accel", "tcg", "-machine", "q35", "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-display", "none", "-serial", f"file:{serial_log}", "-monitor", "none",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off", "-rtc", "base=utc", "-no-reboot",
        "-nic", "user,model=virtio-net-pci",
        # snapshot=on: the boot's writes go to a throw-away overlay, the image stays as converted.
        "-drive", f"if=none,id=disk0,file={image},format=raw,snapshot=on",
        *CONTROLLERS[controller],
    ]  # fmt: skip


def boot_disk(image: Path, controller: str, workdir: Path, *, timeout: float) -> qemu.BootResult:
    """Boot `image` until the marker line (matched), a failure line (failed) or `timeout`."""
    serial_log = workdir / f"{image.stem}-{controller}.serial.log"
    qmp = qemu.short_socket_path(f"{image.stem}-{controller}"[:40])
    try:
        argv = disk_boot_argv(image, controller, serial_log=serial_log, qmp_socket=qmp)
        return qemu.watch_boot(
            argv, serial_log=serial_log, qmp_socket=qmp, pattern=BOOT_OK, timeout=timeout, failures=BOOT_FAILURES
        )
    finally:
        shutil.rmtree(qmp.parent, ignore_errors=True)
