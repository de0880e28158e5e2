"""What the summary line shows (version, boot mode, Secure Boot, memory), read with nothing but `os`.

The client prints that line the moment it starts, before its heavier modules load: on a LiveCD booting
under emulation or from a slow medium those imports take seconds, and the admin should see at once that
the client is up and how the machine booted. preflight.py builds the full checks on the same readers.
"""

from __future__ import annotations

import os

from failback_client import __version__

ENV_SYSROOT = "FAILBACK_SYSROOT"  # read /proc, /sys, /dev, /etc, /run under this root (tests)
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _under(root: str, path: str) -> str:
    """`path` inside the system root `root` ("/" or "" on the running system, a recorded tree in tests)."""
    return path if root in ("", "/") else os.path.join(root, path.lstrip("/"))


def memory_kb(root: str) -> int | None:
    for line in _read(_under(root, "/proc/meminfo")).splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def boot_mode(root: str) -> str:
    return "UEFI" if os.path.isdir(_under(root, "/sys/firmware/efi")) else "BIOS"


def secure_boot(root: str) -> bool | None:
    """The SecureBoot efivar: 4 attribute bytes, then the value byte (1 = on)."""
    if boot_mode(root) == "BIOS":
        return False
    try:
        with open(_under(root, SECURE_BOOT_VAR), "rb") as f:
            data = f.read(5)
    except FileNotFoundError:
        return False  # firmware without Secure Boot support
    except OSError:
        return None
    return len(data) >= 5 and data[4] == 1


def summary_line(boot: str, secure: bool | None, mem_kb: int | None) -> str:
    """The one line the smoke tests (and an admin) look for before the first prompt."""
    memory = "unknown" if mem_kb is None else f"{mem_kb // 1024} MiB"
    return (
        f"failback-client {__version__} | boot mode: {boot} | "
        f"secure boot: {'on' if secure else 'off'} | memory: {memory}"
    )


def summary(root: str = "/") -> str:
    return summary_line(boot_mode(root), secure_boot(root), memory_kb(root))
