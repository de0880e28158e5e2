"""Preflight: summary line (grepped by the ISO smoke tests), memory, boot mode, Secure Boot, hardware clock."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from failback_client import __version__
from failback_client.preflight import NEEDED_MIB, Skew, endpoint_date, gather, hwclock_local, may_fix_clock, secure_boot

from tests.test_client_helpers import BIOS_ROOT, UEFI_ROOT, closed_port

SMOKE = re.compile(r"failback-client \S+ .*boot mode: (BIOS|UEFI) .*secure boot: (on|off)")


def test_summary_lines() -> None:
    bios = gather(BIOS_ROOT)
    prefix = f"failback-client {__version__} | boot mode: "
    assert bios.summary_line() == prefix + "BIOS | secure boot: off | memory: 7961 MiB"
    uefi = gather(UEFI_ROOT)
    assert uefi.summary_line() == prefix + "UEFI | secure boot: on | memory: 1968 MiB"
    for pre in (bios, uefi):
        assert SMOKE.search(pre.summary_line())
    assert bios.memory_ok and uefi.memory_ok  # 2 GiB is plenty for this client (not the AWS client's 4 GiB)
    rows = {r[0]: r for r in uefi.rows()}
    assert rows["Memory"][2] == f"ok (this client needs about {NEEDED_MIB} MiB)"
    assert rows["Secure Boot"][2].startswith("TURN IT OFF")
    assert rows["Hardware clock"][1] == "local time"
    assert rows["Local disks"][1] == "/dev/nvme0n1 30 GiB, /dev/nvme1n1 100 GiB"


def test_secure_boot_variable_fifth_byte(tmp_path: Path) -> None:
    root = tmp_path / "r"
    shutil.copytree(UEFI_ROOT, root, symlinks=True)
    var = root / "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
    var.write_bytes(b"\x06\x00\x00\x00\x00")
    assert secure_boot(str(root)) is False
    var.unlink()
    assert secure_boot(str(root)) is False  # UEFI without Secure Boot support
    assert secure_boot(BIOS_ROOT) is False


@pytest.mark.parametrize(("offset", "local"), [(3600, True), (-5 * 3600 - 1800, True), (4, False), (400, False)])
def test_hardware_clock_from_rtc(tmp_path: Path, offset: int, local: bool) -> None:
    now = time.time()
    rtc = tmp_path / "sys/class/rtc/rtc0"
    rtc.mkdir(parents=True)
    (rtc / "since_epoch").write_text(f"{int(now + offset)}\n")
    assert hwclock_local(str(tmp_path), now)[0] is local
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/adjtime").write_text("0.0 0 0.0\n0\nLOCAL\n")
    assert hwclock_local(str(tmp_path), now) == (True, "/etc/adjtime says LOCAL")


def test_skew_advice_and_unreachable_endpoint() -> None:
    from datetime import UTC, datetime

    skew = Skew(seconds=3600, server_time=datetime(2026, 11, 25, 20, 0, 0, tzinfo=UTC))
    assert skew.too_large and "1 h" not in skew.describe() and "3600 s behind" in skew.describe()
    assert "date -u -s '2026-11-25 20:00:00'" in skew.advice()
    assert endpoint_date(f"http://127.0.0.1:{closed_port()}", timeout=2) is None
    assert may_fix_clock(BIOS_ROOT, None) is False  # never off the LiveCD unless asked
    assert may_fix_clock("/", False) is False


def test_memory_warns_only_below_what_this_client_needs(tmp_path: Path) -> None:
    """MemAvailable is what counts (the LiveCD's root is in RAM); the figure is measured (test_client_memory.py)."""
    root = tmp_path / "r"
    shutil.copytree(BIOS_ROOT, root, symlinks=True)
    meminfo = root / "proc/meminfo"
    meminfo.write_text(f"MemTotal: 1000000 kB\nMemAvailable: {NEEDED_MIB * 1024} kB\n")
    pre = gather(str(root))
    assert pre.memory_ok and pre.memory_warning() is None  # a 1 GiB machine: no warning
    assert {r[0]: r for r in pre.rows()}["Memory"][1] == f"976 MiB ({NEEDED_MIB} MiB available)"
    meminfo.write_text(f"MemTotal: 1000000 kB\nMemAvailable: {NEEDED_MIB * 1024 - 1024} kB\n")
    pre = gather(str(root))
    assert not pre.memory_ok
    warning = pre.memory_warning() or ""
    assert (
        f"Only {NEEDED_MIB - 1} MiB of memory is available; this failback client needs about {NEEDED_MIB} MiB"
        in warning
        and "4 GiB" not in warning
    )
