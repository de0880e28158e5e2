"""Fast unit tests of conversion's parsing and rewriting (no root, no mounts)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from failback_client.convert import detect, devrefs, disks, drivers, initramfs, network
from failback_client.convert.agents import disable_agents
from failback_client.convert.files import BACKUP_SUFFIX, Transaction
from failback_client.convert.model import ConversionReport, StaticNetwork, Volume

ROOT_UUID = "11111111-2222-3333-4444-555555555555"
ESP_UUID = "ABCD-1234"
VOLUMES = [
    Volume("/dev/sdb1", "ext4", ROOT_UUID, "cloudimg-rootfs", "/dev/sdb", 1),
    Volume("/dev/sdb15", "vfat", ESP_UUID, "UEFI", "/dev/sdb", 15),
    Volume("/dev/sdc1", "xfs", "99999999-0000-0000-0000-000000000001", "", "/dev/sdc", 1),
    Volume("/dev/sdc2", "swap", "99999999-0000-0000-0000-000000000002", "", "/dev/sdc", 2),
]


def resolver() -> devrefs.DeviceResolver:
    r = devrefs.DeviceResolver(VOLUMES, VOLUMES[0])
    r.learn_root("/dev/nvme0n1p1")
    return r


# ---- device references -----------------------------------------------------------------------------------------


def test_split_kernel_name() -> None:
    assert devrefs.split_kernel_name("/dev/nvme0n1p15") == ("nvme0n1", 15)
    assert devrefs.split_kernel_name("/dev/xvda1") == ("xvda", 1)
    assert devrefs.split_kernel_name("/dev/sdb") == ("sdb", None)
    assert devrefs.split_kernel_name("/dev/nvme0n1") == ("nvme0n1", None)
    assert devrefs.split_kernel_name("/dev/mapper/vg-root") is None
    assert devrefs.split_kernel_name("UUID=abc") is None


def test_fstab_rewrite_keeps_layout_and_resolves_other_disks() -> None:
    fstab = (
        "# comment /dev/nvme0n1p1 stays\n"
        "/dev/nvme0n1p1  /          ext4  rw,discard  0 1\n"
        "/dev/nvme0n1p15 /boot/efi  vfat  defaults    0 0\n"
        "/dev/nvme1n1p1\t/data\txfs\tdefaults\t0 2\n"
        "/dev/nvme1n1p2 none swap sw 0 0\n"
        "/dev/nvme2n1p1 /gone ext4 defaults 0 2\n"
        "UUID=keep /x ext4 defaults 0 2\n"
        "/dev/mapper/vg-lv /y ext4 defaults 0 2\n"
        "tmpfs /tmp tmpfs defaults 0 0\n"
    )
    new, done, unresolved = devrefs.rewrite_table(fstab, resolver(), source_field=0, type_field=2, name="/etc/fstab")
    lines = new.splitlines()
    assert lines[0] == "# comment /dev/nvme0n1p1 stays"
    assert lines[1] == f"UUID={ROOT_UUID}  /          ext4  rw,discard  0 1"
    assert lines[2] == f"UUID={ESP_UUID} /boot/efi  vfat  defaults    0 0"
    assert lines[3] == "UUID=99999999-0000-0000-0000-000000000001\t/data\txfs\tdefaults\t0 2"
    assert lines[4].startswith("UUID=99999999-0000-0000-0000-000000000002 none swap")
    assert lines[5:] == fstab.splitlines()[5:]
    assert unresolved == ["/dev/nvme2n1p1"]
    assert [(r.old, r.where) for r in done][:2] == [
        ("/dev/nvme0n1p1", "/ in /etc/fstab"),
        ("/dev/nvme0n1p15", "/boot/efi in /etc/fstab"),
    ]
    # A second pass finds nothing more to do (idempotent).
    again, done2, _ = devrefs.rewrite_table(new, resolver(), source_field=0, type_field=2, name="/etc/fstab")
    assert again == new and [r.old for r in done2] == ["/dev/nvme2n1p1"][:0]


def test_fstab_type_mismatch_is_not_guessed() -> None:
    # nvme1n1p1 says ext4 but the only unmapped disk's partition 1 is xfs: no guess.
    text = "/dev/nvme1n1p1 /data ext4 defaults 0 2\n"
    new, done, unresolved = devrefs.rewrite_table(text, resolver(), source_field=0, type_field=2, name="/etc/fstab")
    assert new == text and not done and unresolved == ["/dev/nvme1n1p1"]


def test_crypttab_source_field() -> None:
    text = "cryptdata /dev/nvme1n1p1 none luks\n"
    new, done, _ = devrefs.rewrite_table(text, resolver(), source_field=1, type_field=None, name="/etc/crypttab")
    assert new == "cryptdata UUID=99999999-0000-0000-0000-000000000001 none luks\n"
    assert done[0].where == "cryptdata in /etc/crypttab"


def test_grub_default_rewrite() -> None:
    text = (
        'GRUB_TIMEOUT=1\nGRUB_CMDLINE_LINUX="root=/dev/nvme0n1p1 console=ttyS0 resume=/dev/nvme1n1p2"\n'
        'GRUB_CMDLINE_LINUX_DEFAULT="root=/dev/mapper/vg-root quiet"\n'
    )
    new, done, unresolved = devrefs.rewrite_kernel_args(text, resolver(), "/etc/default/grub")
    assert f'root=UUID={ROOT_UUID} console=ttyS0 resume=UUID=99999999-0000-0000-0000-000000000002"' in new
    assert "root=/dev/mapper/vg-root quiet" in new
    assert len(done) == 2 and not unresolved
    assert devrefs.kernel_arg_roots(text) == ["/dev/nvme0n1p1", "/dev/mapper/vg-root"]


# ---- network ---------------------------------------------------------------------------------------------------

CLOUD_NETPLAN = """\
# This file is generated from information provided by the datasource.
network:
    version: 2
    ethernets:
        ens5:
            dhcp4: true
            match:
                macaddress: 0a:1b:2c:3d:4e:5f
            set-name: ens5
        bond-slave:
            dhcp4: false
"""


def test_netplan_unpin() -> None:
    new, dropped = network.netplan_unpin(CLOUD_NETPLAN)
    assert dropped == ["ens5"]
    data = yaml.safe_load(new)
    assert list(data["network"]["ethernets"]) == ["bond-slave"]
    assert network.netplan_unpin(new) == (None, [])
    only, dropped = network.netplan_unpin(CLOUD_NETPLAN.split("        bond-slave")[0])
    assert "ethernets" not in yaml.safe_load(only)["network"]


def test_netplan_wired_dhcp_and_static() -> None:
    dhcp = yaml.safe_load(network.netplan_wired(None, None))
    assert {e["match"]["name"] for e in dhcp["network"]["ethernets"].values()} == {"en*", "eth*"}
    assert all(e["dhcp4"] is True for e in dhcp["network"]["ethernets"].values())
    static = yaml.safe_load(
        network.netplan_wired(StaticNetwork("192.0.2.10/24", "192.0.2.1", ("192.0.2.53",)), "enp1s0")
    )
    eth = static["network"]["ethernets"]["enp1s0"]
    assert eth["addresses"] == ["192.0.2.10/24"]
    assert eth["routes"] == [{"to": "default", "via": "192.0.2.1"}]
    assert eth["nameservers"] == {"addresses": ["192.0.2.53"]}


def test_static_network_validation() -> None:
    with pytest.raises(ValueError, match="prefix length"):
        StaticNetwork("192.0.2.10")
    with pytest.raises(ValueError, match="gateway 'x'"):
        StaticNetwork("192.0.2.10/24", "x")


IFUPDOWN = """\
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto eth0 ens5
iface ens5 inet dhcp
    hwaddress ether 0a:1b:2c:3d:4e:5f
    mtu 9001

iface eth0 inet dhcp
"""


def test_ifupdown_unpin_hwaddress_and_renamed() -> None:
    result = network.ifupdown_unpin(IFUPDOWN, set())
    assert result.disabled == ["ens5"]
    assert "# failback: iface ens5 inet dhcp" in result.text
    assert "# failback:     hwaddress ether 0a:1b:2c:3d:4e:5f" in result.text
    assert "\nauto eth0\n" in result.text and "\niface eth0 inet dhcp\n" in result.text
    assert "iface lo inet loopback" in result.text and "# failback: iface lo" not in result.text
    renamed = network.ifupdown_unpin(IFUPDOWN, {"eth0"})
    assert renamed.disabled == ["ens5", "eth0"]
    cloud = network.ifupdown_unpin(
        "auto lo\niface lo inet loopback\nauto ens5\niface ens5 inet dhcp\n", set(), whole_file_is_cloud=True
    )
    assert cloud.disabled == ["ens5"] and "iface lo inet loopback" in cloud.text


def test_networkd_and_udev_mac_detection() -> None:
    assert network.is_mac_pinned_unit("[Match]\nMACAddress=0a:1b:2c:3d:4e:5f\n[Network]\nDHCP=yes\n")
    assert network.is_mac_pinned_unit("[Match]\nPermanentMACAddress=0a:1b:2c:3d:4e:5f\n")
    assert not network.is_mac_pinned_unit("[Match]\nName=en*\n[Link]\nMACAddress=0a:1b:2c:3d:4e:5f\n")
    rule = 'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="0a:1b:2c:3d:4e:5f", NAME="eth0"\n'
    assert network.udev_mac_names(rule) == ["eth0"]
    assert network.udev_mac_names('SUBSYSTEM=="block", RUN+="/bin/true"\n') is None


def _tree(tmp_path: Path, files: dict[str, str]) -> Transaction:
    for rel, text in files.items():
        p = tmp_path / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return Transaction(tmp_path, ConversionReport())


def test_convert_network_networkd_target(tmp_path: Path) -> None:
    pinned = "[Match]\nMACAddress=0a:1b:2c:3d:4e:5f\nName=ens5\n\n[Network]\nDHCP=ipv4\n"
    link = "[Match]\nMACAddress=0a:1b:2c:3d:4e:5f\n\n[Link]\nName=ens5\n"
    tx = _tree(
        tmp_path,
        {
            "/etc/systemd/network/10-cloud-init-ens5.network": pinned,
            "/etc/systemd/network/10-cloud-init-ens5.link": link,
            "/etc/systemd/network/20-other.network": "[Match]\nName=br0\n",
            "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service": "",
            "/etc/cloud/cloud.cfg": "",
        },
    )
    notes = network.convert_network(tx, static=None, nics=["enp0s2"])
    assert notes == []
    d = tmp_path / "etc/systemd/network"
    assert not (d / "10-cloud-init-ens5.network").exists()
    assert (d / ("10-cloud-init-ens5.network" + BACKUP_SUFFIX)).read_text() == pinned
    assert (d / ("10-cloud-init-ens5.link" + BACKUP_SUFFIX)).read_text() == link
    assert (d / "20-other.network").exists()
    ours = (d / "90-failback-wired.network").read_text()
    assert "Name=en* eth*" in ours and "DHCP=yes" in ours
    paths = {(c.path, c.action) for c in tx.report.changes}
    assert ("/etc/systemd/network/10-cloud-init-ens5.network", "removed") in paths
    assert ("/etc/systemd/network/90-failback-wired.network", "created") in paths
    assert (network.CLOUD_INIT_NET_OFF, "created") in paths
    # Again: nothing left to change.
    tx2 = Transaction(tmp_path, ConversionReport())
    network.convert_network(tx2, static=None, nics=["enp0s2"])
    assert tx2.report.changes == []


def test_convert_network_ifupdown_target(tmp_path: Path) -> None:
    tx = _tree(
        tmp_path,
        {
            "/etc/network/interfaces": "auto lo\niface lo inet loopback\n",
            "/etc/network/interfaces.d/50-cloud-init": "auto lo\niface lo inet loopback\n\nauto ens5\n"
            "iface ens5 inet dhcp\n",
            "/etc/udev/rules.d/70-persistent-net.rules": 'SUBSYSTEM=="net", ATTR{address}=="0a:1b:2c:3d:4e:5f", '
            'NAME="ens5"\n',
            "/sbin/ifup": "",
        },
    )
    network.convert_network(tx, static=StaticNetwork("192.0.2.10/24", "192.0.2.1"), nics=["enp1s0", "enp2s0"])
    ours = (tmp_path / "etc/network/interfaces.d/90-failback-wired").read_text()
    assert "iface enp1s0 inet static\n    address 192.0.2.10/24\n    gateway 192.0.2.1" in ours
    assert "iface enp2s0 inet dhcp" in ours
    assert "source /etc/network/interfaces.d/*" in (tmp_path / "etc/network/interfaces").read_text()
    assert "# failback: iface ens5 inet dhcp" in (tmp_path / "etc/network/interfaces.d/50-cloud-init").read_text()
    assert not (tmp_path / "etc/udev/rules.d/70-persistent-net.rules").exists()


def test_convert_network_netplan_target(tmp_path: Path) -> None:
    tx = _tree(tmp_path, {"/etc/netplan/50-cloud-init.yaml": CLOUD_NETPLAN})
    network.convert_network(tx, static=None, nics=[])
    assert "ens5" not in (tmp_path / "etc/netplan/50-cloud-init.yaml").read_text()
    assert (tmp_path / ("etc/netplan/50-cloud-init.yaml" + BACKUP_SUFFIX)).read_text() == CLOUD_NETPLAN
    assert oct((tmp_path / "etc/netplan/90-failback-wired.yaml").stat().st_mode & 0o777) == "0o600"


# ---- files, initramfs, agents ------------------------------------------------------------------------------------


def test_transaction_backup_is_kept_from_first_run_and_rollback(tmp_path: Path) -> None:
    tx = _tree(tmp_path, {"/etc/fstab": "original\n"})
    (tmp_path / "etc/fstab").chmod(0o640)
    assert tx.write("/etc/fstab", "first\n", "x")
    tx2 = Transaction(tmp_path, ConversionReport())
    assert tx2.write("/etc/fstab", "second\n", "y")
    assert tx2.write("/etc/new.conf", "new\n", "z")
    assert (tmp_path / "etc/fstab.failback-bak").read_text() == "original\n"
    assert not tx2.write("/etc/fstab", "second\n", "again")
    restored = tx2.rollback()
    assert set(restored) == {"/etc/fstab", "/etc/new.conf"}
    assert (tmp_path / "etc/fstab").read_text() == "first\n"
    assert oct((tmp_path / "etc/fstab").stat().st_mode & 0o777) == "0o640"
    assert not (tmp_path / "etc/new.conf").exists()
    assert (tmp_path / "etc/fstab.failback-bak").read_text() == "original\n"  # made by the first run: kept
    tx3 = Transaction(tmp_path, ConversionReport())
    tx3.write("/etc/other", "x\n", "new")
    tx3.write("/etc/other", "y\n", "edit")
    assert (tmp_path / "etc/other.failback-bak").exists()
    tx3.rollback()
    assert not (tmp_path / "etc/other").exists() and not (tmp_path / "etc/other.failback-bak").exists()


def test_initramfs_modules_block_is_idempotent() -> None:
    base = "# comment\nnvme\n"
    once = initramfs.with_block(base, ["ahci", "nvme", "virtio_blk"])
    assert once == f"# comment\nnvme\n\n{initramfs.BEGIN}\nahci\nvirtio_blk\n{initramfs.END}\n"
    assert initramfs.with_block(once, ["ahci", "nvme", "virtio_blk"]) == once
    assert initramfs.with_block(once, ["e1000e"]).count(initramfs.BEGIN) == 1
    assert 'add_drivers+=" ahci nvme "' in initramfs.dracut_conf(["ahci", "nvme"])


def test_disable_agents_masks_installed_units(tmp_path: Path) -> None:
    tx = _tree(
        tmp_path,
        {
            "/lib/systemd/system/cloud-init.service": "[Unit]\n",
            "/lib/systemd/system/amazon-ssm-agent.service": "[Unit]\n",
            "/etc/cloud/cloud.cfg": "",
        },
    )
    masked = disable_agents(tx, ("cloud-init.service", "amazon-ssm-agent.service", "not-there.service"))
    assert masked == ["cloud-init.service", "amazon-ssm-agent.service"]
    assert os.readlink(tmp_path / "etc/systemd/system/cloud-init.service") == "/dev/null"
    assert (tmp_path / "etc/cloud/cloud-init.disabled").exists()
    tx2 = Transaction(tmp_path, ConversionReport())
    disable_agents(tx2, ("cloud-init.service",))
    assert tx2.report.changes == []
    assert tx.rollback()
    assert not (tmp_path / "etc/systemd/system/cloud-init.service").is_symlink()


# ---- this machine's drivers, the target's kernels -----------------------------------------------------------------


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))


def test_local_hardware_from_sysfs(tmp_path: Path) -> None:
    sys_ = tmp_path / "sys"
    pci = sys_ / "devices/pci0000:00"
    ahci_dev = pci / "0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0"
    nic_dev = pci / "0000:00:03.0/virtio0"
    for d in (ahci_dev, nic_dev / "net/enp0s3", pci / "0000:00:1f.2"):
        d.mkdir(parents=True, exist_ok=True)
    drv = sys_ / "bus/pci/drivers"
    (drv / "ahci").mkdir(parents=True)
    _link(drv / "ahci/module", sys_ / "module/ahci")
    (sys_ / "bus/scsi/drivers/sd").mkdir(parents=True)
    _link(sys_ / "bus/scsi/drivers/sd/module", sys_ / "module/sd_mod")
    (sys_ / "bus/virtio/drivers/virtio_net").mkdir(parents=True)
    _link(pci / "0000:00:1f.2/driver", drv / "ahci")
    _link(ahci_dev / "driver", sys_ / "bus/scsi/drivers/sd")
    _link(nic_dev / "driver", sys_ / "bus/virtio/drivers/virtio_net")
    _link(sys_ / "block/sda/device", ahci_dev)
    (sys_ / "block/loop0").mkdir(parents=True)
    _link(sys_ / "class/net/enp0s3", nic_dev / "net/enp0s3")
    _link(nic_dev / "net/enp0s3/device", nic_dev)
    (sys_ / "class/net/lo").mkdir(parents=True)
    hw = drivers.local_hardware(tmp_path)
    assert hw.storage == {"ahci", "sd_mod"}
    assert hw.network == {"virtio_net"}
    assert hw.nics == ["enp0s3"]


def test_kernel_modules_parse(tmp_path: Path) -> None:
    k = tmp_path / "lib/modules/6.1.0-28-amd64"
    k.mkdir(parents=True)
    (k / "modules.dep").write_text(
        "kernel/drivers/ata/ahci.ko.xz: kernel/drivers/ata/libahci.ko.xz\n"
        "kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko\n"
        "kernel/drivers/nvme/host/nvme-core.ko:\n"
    )
    (k / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    mods = drivers.kernel_modules(tmp_path)
    assert mods == {"6.1.0-28-amd64": ({"ahci", "nvme", "nvme_core"}, {"virtio_pci"})}


def test_os_release_parse() -> None:
    info = detect.parse_os_release('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n# x\n')
    assert info == {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "ID": "debian", "VERSION_ID": "12"}


# ---- disks and Windows detection on crafted images (files: no root needed) --------------------------------------

MIB = 1024 * 1024
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MSDATA_TYPE = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"


def _sh(*cmd: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **(env or {})})


def _crafted_disk(tmp_path: Path, *, bcd: bool) -> Path:
    """GPT: partition 1 an ESP (FAT, EFI/Microsoft/Boot/BCD when `bcd`), partition 2 NTFS (boot sector)."""
    for tool in ("sfdisk", "mkfs.vfat", "mmd", "mcopy", "blkid"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (./install-deps.sh)")
    img = tmp_path / "windows.img"
    with img.open("wb") as f:
        f.truncate(80 * MIB)
    subprocess.run(
        ["sfdisk", "-q", str(img)],
        check=True,
        capture_output=True,
        text=True,
        input=f"label: gpt\nstart=2048, size=69632, type={ESP_TYPE}\nsize=40M, type={MSDATA_TYPE}\n",
    )
    esp = tmp_path / "esp.fat"
    _sh("mkfs.vfat", "-C", "-F", "32", str(esp), str(69632 // 2))
    if bcd:
        (tmp_path / "BCD").write_bytes(b"regf" + b"\0" * 60)
        mt = {"MTOOLS_SKIP_CHECK": "1"}
        _sh("mmd", "-i", str(esp), "::/EFI", "::/EFI/Microsoft", "::/EFI/Microsoft/Boot", env=mt)
        _sh("mcopy", "-i", str(esp), str(tmp_path / "BCD"), "::/EFI/Microsoft/Boot/BCD", env=mt)
    with img.open("r+b") as f:
        f.seek(2048 * 512)
        f.write(esp.read_bytes())
        ntfs_start = (2048 + 69632) * 512
        f.seek(ntfs_start)
        # An NTFS boot sector's start: jump instruction, OEM id "NTFS    ", bytes per sector.
        f.write(b"\xebR\x90NTFS    \x00\x02\x08")
    return img


def test_inspect_disk_and_windows_detection(tmp_path: Path) -> None:
    img = _crafted_disk(tmp_path, bcd=True)
    disk = disks.inspect_disk(str(img))
    assert disk.table == "gpt" and not disk.problem
    assert [(p.number, p.fstype, p.is_esp) for p in disk.partitions] == [(1, "vfat", True), (2, "", False)]
    win = detect.find_windows(disk, this_machine_mode="bios")
    assert win is not None
    assert win.evidence == [
        "NTFS on partition 2 (" + disk.partitions[1].node + ")",
        "UEFI boot configuration EFI/Microsoft/Boot/BCD on partition 1",
    ]
    assert any("this machine boots BIOS; the instance's disk was made for UEFI" in c for c in win.checks)


def test_ntfs_without_boot_configuration_is_not_windows(tmp_path: Path) -> None:
    img = _crafted_disk(tmp_path, bcd=False)
    assert detect.find_windows(disks.inspect_disk(str(img)), this_machine_mode="uefi") is None


def test_uninterpretable_disk_is_reported(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\x5a" * MIB)
    disk = disks.inspect_disk(str(blank))
    assert disk.problem == "no partition table and no filesystem recognised"
    assert disks.inspect_disk(str(tmp_path / "missing")).problem == "no such device"
    assert disks.volumes([disk]) == ([], [])


# ---- the whole convert() on disks without Linux (no mounts happen) -----------------------------------------------


def test_convert_reports_windows_and_uninterpretable_disks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from failback_client.console import Console
    from failback_client.convert import ConversionOptions, convert

    win = _crafted_disk(tmp_path, bcd=True)
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * MIB)
    before = win.read_bytes()
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # image files: nothing here needs root
    out = io.StringIO()
    report = convert(
        [win, blank],
        Console(stdin=io.StringIO(""), stdout=out, plain=True),
        ConversionOptions(boot_mode="uefi", work_dir=tmp_path / "work", sys_root=tmp_path),
    )
    text = out.getvalue()
    assert report.ok and report.changes == [] and report.linux == []
    assert [w.disk for w in report.windows] == [str(win)]
    blank_row = next(line for line in text.splitlines() if line.startswith(str(blank)))
    assert blank_row.split()[1:4] == ["-", "-", "-"]
    assert blank_row.endswith("not interpreted, left untouched: no partition table and no filesystem recognised")
    assert f"WARNING: Windows on {win} was NOT changed. An administrator must check:" in text
    assert "this machine boots UEFI; the instance's disk was made for UEFI" in text
    assert win.read_bytes() == before


def test_convert_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from failback_client.console import Console
    from failback_client.convert import ConversionOptions, convert

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = io.StringIO()
    report = convert(
        [tmp_path / "x"],
        Console(stdin=io.StringIO(""), stdout=out, plain=True),
        ConversionOptions(work_dir=tmp_path / "work"),
    )
    assert not report.ok and report.failed_step == "inspect the target disks"
    assert "ERROR: Conversion failed at step 'inspect the target disks': conversion needs root" in out.getvalue()


def test_find_volume_by_every_kind_of_name() -> None:
    from failback_client.convert.linux import find_volume

    r = resolver()
    assert find_volume(f"UUID={ROOT_UUID.upper()}", "ext4", VOLUMES, r) is VOLUMES[0]
    assert find_volume("LABEL=cloudimg-rootfs", "ext4", VOLUMES, r) is VOLUMES[0]
    assert find_volume(f"/dev/disk/by-uuid/{ESP_UUID}", "vfat", VOLUMES, r) is VOLUMES[1]
    assert find_volume("/dev/nvme0n1p15", "vfat", VOLUMES, r) is VOLUMES[1]
    assert find_volume("/dev/sdc2", "swap", VOLUMES, r) is VOLUMES[3]
    assert find_volume("UUID=nope", "ext4", VOLUMES, r) is None
    assert find_volume("server:/export", "nfs", VOLUMES, r) is None


def test_wanted_modules_keeps_what_the_target_kernel_has(tmp_path: Path) -> None:
    from failback_client.convert.linux import wanted_modules
    from failback_client.convert.model import ConversionOptions

    k = tmp_path / "lib/modules/6.1.0-28-amd64"
    k.mkdir(parents=True)
    mods = ("ahci", "nvme", "sd_mod", "virtio_blk", "virtio_net", "ext4", "megaraid_sas")
    (k / "modules.dep").write_text("".join(f"kernel/x/{m}.ko.xz:\n" for m in mods))
    (k / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    hw = drivers.LocalHardware(storage={"megaraid_sas", "sd_mod"}, network={"bnx2x"}, nics=["eno1"])
    report = ConversionReport()
    mods = wanted_modules(hw, {"ext4"}, ConversionOptions(extra_drivers=("virtio_pci",)), tmp_path, report)
    assert mods == ["ahci", "ext4", "megaraid_sas", "nvme", "sd_mod", "virtio_blk", "virtio_net"]
    assert len(report.warnings) == 1 and report.warnings[0].startswith("driver bnx2x (used by this machine)")
