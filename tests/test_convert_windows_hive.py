"""Windows conversion's registry part on real hive files: made by hivex (hivexregedit --merge) from .reg text
shaped like a SYSTEM hive, edited by the conversion's code (python3-hivex), and read back with reglookup, a
parser that shares no code with hivex. Also the controller scan on recorded /sys trees and the boot-mode
reading of partition tables. No root needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from failback_client.bootmode import disk_boot_mode, layout_boot_mode
from failback_client.convert.hive import DIST_PACKAGES, Hive, dirty_reason, find_ci, load_hivex
from failback_client.convert.model import DEFAULT_WINDOWS_CLOUD_SERVICES
from failback_client.convert.windows import apply_edits, plan_hive
from failback_client.convert.windows_drivers import WINDOWS_DRIVERS, Controller, parse_controllers, storage_controllers

from image.vm.windows_fixture import (
    CLOUD_DRIVERS,
    STORAGE_SERVICES,
    build_hive,
    make_dirty,
    reglookup,
    system_reg,
)

pytestmark = pytest.mark.skipif(
    not (shutil.which("hivexregedit") and shutil.which("reglookup")),
    reason="libwin-hivex-perl / reglookup not installed (./install-deps.sh)",
)
CS = "/ControlSet001/Services"


def _windows(tmp: Path, drivers: tuple[str, ...] = STORAGE_SERVICES + CLOUD_DRIVERS) -> Path:
    win = tmp / "Windows"
    (win / "System32" / "drivers").mkdir(parents=True)
    for d in drivers:
        (win / "System32" / "drivers" / f"{d}.sys").write_bytes(b"MZ")
    return win


def _convert(
    hive_path: Path,
    windows: Path,
    kinds: list[str],
    controllers: list[Controller] | None = None,
    cloud=DEFAULT_WINDOWS_CLOUD_SERVICES,
) -> tuple[list, list[str]]:
    notes: list[str] = []
    h = Hive(hive_path, write=True)
    cs, edits = plan_hive(h, windows, kinds, controllers or [], cloud, notes)
    apply_edits(h, cs, edits)
    h.commit()
    h.close()
    return edits, notes


def test_hivex_is_loaded_narrowly_from_debian() -> None:
    hivex = load_hivex()
    assert Path(hivex.__file__).parent.parent == DIST_PACKAGES
    # Only hivex's own two files: Debian's dist-packages did not join the venv's path.
    assert str(DIST_PACKAGES) not in sys.path
    assert Path(sys.modules["libhivexmod"].__file__).parent == DIST_PACKAGES


@pytest.mark.parametrize("kind", sorted(WINDOWS_DRIVERS))
def test_each_controller_kind_gets_its_inbox_driver_to_boot_start(kind: str, tmp_path: Path) -> None:
    hive = build_hive(tmp_path / "SYSTEM", system_reg(cloud=False))
    before = reglookup(hive)
    edits, notes = _convert(hive, _windows(tmp_path), [kind], cloud=())
    after = reglookup(hive)
    entry = WINDOWS_DRIVERS[kind]
    wanted = [s for s in (*entry.services, *entry.needs) if s in STORAGE_SERVICES]
    if not [s for s in entry.services if s in STORAGE_SERVICES]:  # vmd: iaStorVD is never inbox
        assert edits == [] and after == before
        assert any("needs the vendor's driver" in n and "iaStorVD" in n for n in notes), notes
        return
    for svc in wanted:
        assert after[f"{CS}/{svc}/Start"] == ("DWORD", "0x00000000"), svc
        assert not any(k.startswith(f"{CS}/{svc}/StartOverride") for k in after), svc
    for svc in set(STORAGE_SERVICES) - set(wanted):  # nothing else touched
        assert after[f"{CS}/{svc}/Start"] == before[f"{CS}/{svc}/Start"], svc
    assert notes == []


def test_second_plan_finds_nothing_and_missing_drivers_are_reported_with_pci_id(tmp_path: Path) -> None:
    hive = build_hive(tmp_path / "SYSTEM", system_reg(storage=("storahci", "stornvme"), cloud=False))
    controllers = [
        Controller("ahci", "8086:2922", "0000:00:1f.2", 0x010601),
        Controller("virtio_blk", "1af4:1042", "0000:00:04.0", 0x010000),
        Controller("smartpqi", "9005:028f", "0000:03:00.0", 0x010700),
        Controller("", "1234:5678", "0000:05:00.0", 0x010800),
    ]
    windows = _windows(tmp_path, ("storahci",))  # stornvme's key is there, its file is not
    edits, notes = _convert(hive, windows, ["ahci", "virtio_blk", "nvme"], controllers, cloud=())
    assert [e.service for e in edits] == ["storahci", "storahci"]  # Start, then StartOverride
    text = "\n".join(notes)
    assert "PCI 1af4:1042" in text and "viostor" in text and "needs the vendor's driver" in text
    assert "PCI 9005:028f" in text and "Linux driver smartpqi" in text
    assert "PCI 1234:5678" in text
    assert "stornvme is in the registry but its driver file System32\\drivers\\stornvme.sys is missing" in text
    after = reglookup(hive)
    assert f"{CS}/viostor" not in after  # never invented
    assert after[f"{CS}/stornvme/Start"] == ("DWORD", "0x00000003")
    # A second pass has nothing left to do.
    again, _ = _convert(hive, windows, ["ahci", "virtio_blk", "nvme"], controllers, cloud=())
    assert again == []


def test_cloud_services_disabled_with_undo_and_class_filters_left(tmp_path: Path) -> None:
    hive = build_hive(tmp_path / "SYSTEM", system_reg(storage=("storahci",)))
    edits, notes = _convert(hive, _windows(tmp_path), [])
    after = reglookup(hive)
    for svc in ("ena", "AmazonSSMAgent", "EC2Launch"):
        assert after[f"{CS}/{svc}/Start"] == ("DWORD", "0x00000004"), svc
    ssm = next(e for e in edits if e.service == "AmazonSSMAgent")
    assert "Start 2 (auto) -> 4" in ssm.detail and "undo: sc.exe config AmazonSSMAgent start= auto" in ssm.detail
    # xenfilt filters the System class: it and the PV drivers it works with stay as they were.
    for svc in ("xenfilt", "xenbus", "xenvbd"):
        assert after[f"{CS}/{svc}/Start"] == ("DWORD", "0x00000000"), svc
    assert any("xenfilt" in n and "device-class filter" in n for n in notes)


def test_control_set_in_use_is_select_current(tmp_path: Path) -> None:
    hive = build_hive(tmp_path / "SYSTEM", system_reg(storage=("storahci",), current=2, cloud=False))
    edits, _ = _convert(hive, _windows(tmp_path), ["ahci"], cloud=())
    assert edits and all("ControlSet002" in e.detail for e in edits)
    assert reglookup(hive)["/ControlSet002/Services/storahci/Start"] == ("DWORD", "0x00000000")


def test_dirty_hive_is_told_apart(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    clean = build_hive(config / "SYSTEM", system_reg(storage=("storahci",), cloud=False))
    assert dirty_reason(clean) == ""
    clean.write_bytes(make_dirty(clean.read_bytes()))
    assert "has no log to finish it" in dirty_reason(clean)
    (config / "SYSTEM.LOG1").write_bytes(b"x" * 512)
    assert "pending transaction logs (SYSTEM.LOG1" in dirty_reason(clean)
    data = bytearray(clean.read_bytes())
    data[100] ^= 1
    clean.write_bytes(bytes(data))
    assert "checksum is wrong" in dirty_reason(clean)


def test_find_ci(tmp_path: Path) -> None:
    (tmp_path / "WINDOWS" / "system32" / "Config").mkdir(parents=True)
    (tmp_path / "WINDOWS" / "system32" / "Config" / "system").write_bytes(b"")
    assert find_ci(tmp_path, "Windows/System32/config/SYSTEM") == tmp_path / "WINDOWS/system32/Config/system"
    assert find_ci(tmp_path, "Windows/System32/config/SOFTWARE") is None


def _pci(sysfs: Path, slot: str, cls: str, vendor: str, device: str, driver: str | None) -> Path:
    dev = sysfs / "sys/bus/pci/devices" / slot
    dev.mkdir(parents=True)
    for name, value in (("class", cls), ("vendor", vendor), ("device", device)):
        (dev / name).write_text(value + "\n")
    if driver:
        d = sysfs / "sys/bus/pci/drivers" / driver
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(d, dev / "driver")
    return dev


def test_storage_controllers_from_sys(tmp_path: Path) -> None:
    _pci(tmp_path, "0000:00:1f.2", "0x010601", "0x8086", "0x2922", "ahci")
    _pci(tmp_path, "0000:00:17.0", "0x010400", "0x8086", "0x2822", "ahci")  # Intel RST in RAID mode
    _pci(tmp_path, "0000:01:00.0", "0x010802", "0x144d", "0xa808", "nvme")
    _pci(tmp_path, "0000:02:00.0", "0x020000", "0x8086", "0x10d3", "e1000e")  # a NIC: not storage
    _pci(tmp_path, "0000:03:00.0", "0x010700", "0x1000", "0x0097", None)  # no Linux driver
    virtio = _pci(tmp_path, "0000:00:04.0", "0x010000", "0x1af4", "0x1001", "virtio-pci")
    (virtio / "virtio2").mkdir()
    (tmp_path / "sys/bus/virtio/drivers/virtio_blk").mkdir(parents=True)
    os.symlink(tmp_path / "sys/bus/virtio/drivers/virtio_blk", virtio / "virtio2" / "driver")
    hv = tmp_path / "sys/bus/vmbus/devices/f8b3781a-1e82-4818-a1c3-63d806ec15bb"
    hv.mkdir(parents=True)
    (hv / "class_id").write_text("{ba6163d9-04a1-4d29-b605-72e2ffb1dc7f}\n")
    (tmp_path / "sys/bus/vmbus/drivers/hv_storvsc").mkdir(parents=True)
    os.symlink(tmp_path / "sys/bus/vmbus/drivers/hv_storvsc", hv / "driver")
    found = {(c.kind, c.pci_id) for c in storage_controllers(tmp_path)}
    assert found == {
        ("virtio_blk", "1af4:1001"),
        ("intel_rst", "8086:2822"),
        ("ahci", "8086:2922"),
        ("nvme", "144d:a808"),
        ("", "1000:0097"),
        ("hv_storvsc", "VMBus {ba6163d9-04a1-4d29-b605-72e2ffb1dc7f}"),
    }
    assert storage_controllers(tmp_path / "nothing") == []


def test_parse_controllers() -> None:
    assert parse_controllers("ahci, virtio-blk,ahci") == ("ahci", "virtio_blk")
    with pytest.raises(ValueError, match=r"unknown controller driver.*e1000e.*known: ahci"):
        parse_controllers("e1000e")


@pytest.mark.parametrize(
    ("table", "mode"),
    [
        ("label: dos\nsize=10M, type=7, bootable\ntype=7\n", "bios"),
        ("label: dos\nsize=10M, type=7\ntype=7\n", ""),  # no active partition
        ("label: dos\nsize=10M, type=ef\ntype=7\n", "uefi"),
        (
            "label: gpt\nsize=10M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
            "type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
            "uefi",
        ),
        ("label: gpt\ntype=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n", ""),  # GPT without ESP
        (
            "label: gpt\nsize=3M, type=21686148-6449-6E6F-744E-656564454649\n"
            "size=10M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
            "both",
        ),  # Debian's cloud images: BIOS boot + ESP
    ],
)
def test_layout_boot_mode(table: str, mode: str, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["sfdisk", "-q", str(img)], input=table, text=True, check=True, capture_output=True)
    assert disk_boot_mode(str(img)) == mode
    assert layout_boot_mode(b"\0" * 4096) == ""


def test_not_a_hive_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "SYSTEM"
    bad.write_bytes(b"\0" * 8192)
    with pytest.raises(ValueError, match="SYSTEM is not a registry hive"):
        dirty_reason(bad)
