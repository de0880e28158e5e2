"""Tiny busybox initramfs archives written byte by byte (gzip'd newc cpio, no cpio tool): the bare-kernel
baseline's marker (the boot bench and the firmware tests time a kernel without the live system) and the
boot-chain probe (the ISO's own firmware and boot loader, then this instead of the live system).
"""

from __future__ import annotations

import gzip
import io
import stat
from pathlib import Path

from image.core.errors import ImageError


class InitramfsError(ImageError, RuntimeError):
    """An initramfs cannot be written (busybox missing or not a binary)."""


BARE_MARKER = "failback-bare-kernel-marker"


def _newc_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    out = header + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def write_busybox_initramfs(dest: Path, init: str, busybox: Path = Path("/bin/busybox")) -> Path:
    """A gzip'd newc initramfs holding static busybox and `init` (a busybox sh script) as /init.

    Written here (not with cpio) so it is byte-for-byte the same on every run."""
    bb = busybox.read_bytes()
    if not bb.startswith(b"\x7fELF"):
        raise InitramfsError(f"{busybox} is not a binary; install busybox-static (./install-deps.sh)")
    d = stat.S_IFDIR | 0o755
    entries = [
        _newc_entry("bin", d, ino=1),
        _newc_entry("dev", d, ino=2),
        _newc_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1), ino=3),
        _newc_entry("proc", d, ino=4),
        _newc_entry("sys", d, ino=5),
        _newc_entry("bin/busybox", stat.S_IFREG | 0o755, bb, ino=6),
        _newc_entry("init", stat.S_IFREG | 0o755, f"#!/bin/busybox sh\n{init}".encode(), ino=7),
        _newc_entry("TRAILER!!!", 0),
    ]
    archive = b"".join(entries)
    archive += b"\0" * (-len(archive) % 512)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())
    return dest


def write_marker_initramfs(dest: Path) -> Path:
    """The baseline's initramfs: prints BARE_MARKER on the console and powers off."""
    return write_busybox_initramfs(dest, f"echo {BARE_MARKER}\nexec /bin/busybox poweroff -f\n")


# The boot-chain probe's /init: reports the boot mode and Secure Boot state as the client's summary
# line would (from /sys/firmware/efi and the kernel's own Secure Boot message; efivarfs is a module),
# then powers off. Booted from an ISO made by the ISO stage, it times firmware + boot loader + kernel
# without the live system.
PROBE_INIT = """\
/bin/busybox mount -t sysfs sysfs /sys
mode=BIOS
sb=off
if [ -d /sys/firmware/efi ]; then
  mode=UEFI
  /bin/busybox dmesg | /bin/busybox grep -q "Secure boot enabled" && sb=on
fi
echo "failback-client boot-chain-probe | boot mode: $mode | secure boot: $sb | memory: 0 MiB"
/bin/busybox sleep 1
exec /bin/busybox poweroff -f
"""


def write_probe_initramfs(dest: Path) -> Path:
    return write_busybox_initramfs(dest, PROBE_INIT)
