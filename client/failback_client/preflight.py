"""Checks before the workflow: memory, boot mode, Secure Boot, hardware clock, clock skew, local disks.

Everything is read under a root path so tests can use recorded trees. The summary line is printed first,
before any prompt; the ISO smoke tests grep the serial console for it:
    failback-client <version> | boot mode: BIOS|UEFI | secure boot: on|off | memory: N MiB
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from failback_client.devices import LocalDisk, discover, human_size
from failback_client.machine import _read, _under, boot_mode, memory_kb, secure_boot, summary_line

log = logging.getLogger(__name__)

# What this client needs, measured (not the AWS client's 4 GiB): its own peak RSS over a run
# (tests/test_client_memory.py) plus the replication software's (tests/test_replication_memory.py
# bounds it; it peaks near 36 MiB), plus room for the conversion's tools in the restored system's chroot
# and the unpacked software on the RAM-backed root. The whole failback passes in QEMU with 1 GiB.
CLIENT_PEAK_MIB = 64  # measured 48 MiB up to the connectivity checks; room for the replication phase
REPLICATOR_PEAK_MIB = 40  # measured ~36 MiB
TOOLS_MIB = 128  # an allowance, not measured: grub/initramfs tools in the chroot, the unpacked software
NEEDED_MIB = CLIENT_PEAK_MIB + REPLICATOR_PEAK_MIB + TOOLS_MIB
SKEW_LIMIT_S = 240.0  # SigV4 refuses requests more than 5 minutes off; keep a margin
SKEW_WARN_S = 30.0


@dataclass
class Preflight:
    memory_kb: int | None
    boot_mode: str  # BIOS | UEFI
    secure_boot: bool | None  # None: unknown (BIOS has none)
    hwclock_local: bool | None  # True: the hardware clock keeps local time (breaks signing)
    hwclock_reason: str
    disks: list[LocalDisk] = field(default_factory=list)
    available_kb: int | None = None  # MemAvailable: what the client can still use (the root is in RAM)

    @property
    def memory_mib(self) -> int | None:
        return None if self.memory_kb is None else self.memory_kb // 1024

    @property
    def usable_mib(self) -> int | None:
        kb = self.available_kb if self.available_kb is not None else self.memory_kb
        return None if kb is None else kb // 1024

    @property
    def memory_ok(self) -> bool:
        return self.usable_mib is None or self.usable_mib >= NEEDED_MIB

    def memory_warning(self) -> str | None:
        if self.memory_ok:
            return None
        return (
            f"Only {self.usable_mib} MiB of memory is available; this failback client needs about {NEEDED_MIB} "
            f"MiB (itself {CLIENT_PEAK_MIB}, the replication software {REPLICATOR_PEAK_MIB}, the conversion's "
            f"tools {TOOLS_MIB}): replication or conversion may run out of memory. Add memory or close "
            "what else runs."
        )

    def summary_line(self) -> str:
        return summary_line(self.boot_mode, self.secure_boot, self.memory_kb)

    def rows(self) -> list[tuple[str, str, str]]:
        """(check, value, verdict) for the preflight table."""
        rows = []
        mem = "unknown" if self.memory_mib is None else f"{self.memory_mib} MiB"
        if self.available_kb is not None and self.memory_mib is not None:
            mem += f" ({self.usable_mib} MiB available)"
        rows.append(
            (
                "Memory",
                mem,
                f"ok (this client needs about {NEEDED_MIB} MiB)"
                if self.memory_ok
                else f"LOW: this client needs about {NEEDED_MIB} MiB; replication may run out of memory",
            )
        )
        rows.append(
            (
                "Boot mode",
                self.boot_mode,
                "ok (Linux servers must boot the client in BIOS mode; Windows: same mode as the source)",
            )
        )
        sb = "unknown" if self.secure_boot is None else ("on" if self.secure_boot else "off")
        rows.append(("Secure Boot", sb, "TURN IT OFF in the firmware settings" if self.secure_boot else "ok"))
        hw = {True: "local time", False: "UTC", None: "unknown"}[self.hwclock_local]
        rows.append(
            (
                "Hardware clock",
                hw,
                ("set it to UTC: " + self.hwclock_reason) if self.hwclock_local else self.hwclock_reason or "ok",
            )
        )
        targets = [d for d in self.disks if not d.boot_medium]
        disks = ", ".join(f"{d.path} {human_size(d.size_bytes)}" for d in targets) or "none"
        busy = [f"{d.path} IN USE ({d.in_use[0].what})" for d in targets if d.in_use]
        free = len(targets) - len(busy)
        verdict = (
            "ok"
            if free and not busy
            else "NO DISK to fail back to"
            if not targets
            else "; ".join(busy) + (" (never a target)" if free else ": NO FREE DISK to fail back to")
        )
        rows.append(("Local disks", disks, verdict))
        return rows


def hwclock_local(root: str, now: float | None = None) -> tuple[bool | None, str]:
    """Whether the hardware clock keeps local time: /etc/adjtime says so, or the RTC differs from the
    system clock by a time-zone-like offset (a whole number of quarter hours, at least 15 minutes)."""
    lines = _read(_under(root, "/etc/adjtime")).splitlines()
    if len(lines) >= 3 and lines[2].strip() in ("LOCAL", "UTC"):
        local = lines[2].strip() == "LOCAL"
        return local, "/etc/adjtime says " + lines[2].strip()
    since = _read(_under(root, "/sys/class/rtc/rtc0/since_epoch"))
    if not since.isdigit():
        return None, "no RTC readable"
    now = time.time() if now is None else now
    offset = int(since) - now
    quarters = round(offset / 900)
    if abs(offset) >= 840 and abs(offset - quarters * 900) < 120:
        sign = "ahead of" if offset > 0 else "behind"
        return True, f"the RTC is {abs(offset) / 3600:.2f} h {sign} the system clock"
    return False, "RTC agrees with the system clock"


def available_kb(root: str) -> int | None:
    for line in _read(_under(root, "/proc/meminfo")).splitlines():
        if line.startswith("MemAvailable:") and line.split()[1:2] and line.split()[1].isdigit():
            return int(line.split()[1])
    return None


def gather(root: str = "/", *, include_loop: bool = False) -> Preflight:
    local, reason = hwclock_local(root)
    return Preflight(
        memory_kb=memory_kb(root),
        available_kb=available_kb(root),
        boot_mode=boot_mode(root),
        secure_boot=secure_boot(root),
        hwclock_local=local,
        hwclock_reason=reason,
        disks=discover(root, include_loop=include_loop),
    )


# ---- clock skew against the endpoint ------------------------------------------------------------


@dataclass
class Skew:
    seconds: float  # server minus local: positive when the local clock is behind
    server_time: dt.datetime

    @property
    def too_large(self) -> bool:
        return abs(self.seconds) >= SKEW_LIMIT_S

    def describe(self) -> str:
        direction = "behind" if self.seconds > 0 else "ahead of"
        return f"this machine's clock is {abs(self.seconds):.0f} s {direction} the endpoint's clock"

    def advice(self) -> str:
        stamp = self.server_time.strftime("%Y-%m-%d %H:%M:%S")
        return (
            f"AWS refuses signed requests more than 5 minutes off. Set the clock to UTC, e.g. "
            f"`date -u -s '{stamp}'` then `hwclock --systohc --utc`, or fix the firmware clock to UTC "
            "and reboot the failback client"
        )


def endpoint_date(url: str, *, timeout: float = 10.0, proxies: dict[str, str] | None = None) -> dt.datetime | None:
    """The endpoint's `Date` header; None when unreachable or absent. A plain GET: AWS endpoints answer it
    with an error that carries `Date`, and we never send credentials here."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler(proxies or None)]
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url.rstrip("/") + "/", method="GET")
    try:
        with opener.open(request, timeout=timeout) as response:
            header = response.headers.get("Date")
    except urllib.error.HTTPError as e:
        header = e.headers.get("Date") if e.headers else None
    except (OSError, ValueError) as e:
        log.info("no Date from %s: %s", url, e)
        return None
    if not header:
        return None
    try:
        return email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None


def measure_skew(url: str, *, timeout: float = 10.0) -> Skew | None:
    before = time.time()
    server = endpoint_date(url, timeout=timeout)
    after = time.time()
    if server is None:
        return None
    # The header has 1 s resolution and was stamped during the round trip: compare with its middle.
    return Skew(seconds=server.timestamp() + 0.5 - (before + after) / 2, server_time=server)


def correct_clock(skew: Skew) -> None:
    """Step the system clock by the measured skew (needs CAP_SYS_TIME)."""
    time.clock_settime(time.CLOCK_REALTIME, time.time() + skew.seconds)


def may_fix_clock(root: str, setting: bool | None) -> bool:
    """Correct the clock only on the LiveCD (its live medium is mounted) as root, unless told otherwise."""
    if setting is not None:
        return setting and os.geteuid() == 0
    return os.geteuid() == 0 and root == "/" and os.path.isdir("/run/live/medium")
