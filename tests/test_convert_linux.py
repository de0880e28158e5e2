"""Conversion of a cloud-like Debian disk image (image/vm/convert_fixture.py) on this host, as root, and the proof
that it boots on other hardware: the converted image reaches its marker unit with a DHCP address in QEMU on an
AHCI (and a virtio-blk) disk, the same image unconverted does not.

Slow: the fixture takes minutes the first time (then it is cached), each conversion ~1 minute, each boot
1-3 minutes under TCG. Run with `pytest --run-slow tests/test_convert_linux.py` as root.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from failback_client.console import Console
from failback_client.convert import ConversionReport

from image.vm import convert_fixture as fx

pytestmark = [pytest.mark.slow, pytest.mark.root]
log = logging.getLogger("tests.convert")
POSITIVE_TIMEOUT = 900
NEGATIVE_TIMEOUT = 300  # the initramfs gives up on the root device after ~30 s; this only bounds a hang


@dataclass
class Converted:
    image: Path
    report: ConversionReport
    console_text: str
    seconds: float
    fixture: fx.Fixture


def run_convert(image: Path, work: Path) -> tuple[ConversionReport, str, float]:
    out = io.StringIO()
    report, seconds = fx.convert_image(image, work, Console(stdin=io.StringIO(""), stdout=out, plain=True))
    return report, out.getvalue(), seconds


@pytest.fixture(scope="module")
def fixture_image() -> fx.Fixture:
    fixture = fx.cloud_fixture()
    print(f"\nconvert fixture: {fixture.image} (built in {fixture.build_seconds:.0f} s; 0 = cached)")
    return fixture


@pytest.fixture(scope="module")
def converted(fixture_image: fx.Fixture, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    work = tmp_path_factory.mktemp("convert")
    image = fx.copy_image(fixture_image.image, work / "converted.img")
    report, text, seconds = run_convert(image, work / "mnt")
    print(f"\nconversion took {seconds:.1f} s\n{text}")
    return Converted(image, report, text, seconds, fixture_image)


@pytest.fixture()
def mounted(converted: Converted, tmp_path: Path) -> Iterator[Path]:
    """The converted image's root filesystem, read-only."""
    where = tmp_path / "root"
    where.mkdir()
    with fx.loop_device(converted.image) as dev:
        subprocess.run(["mount", "-o", "ro", f"{dev}p1", str(where)], check=True)
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=True)


def test_report_lists_what_was_found_and_changed(converted: Converted) -> None:
    report = converted.report
    assert report.ok, f"{report.failed_step}: {report.error}"
    assert [s.name for s in report.linux] == ["Debian GNU/Linux 12 (bookworm)"]
    assert report.linux[0].initramfs_tool == "initramfs-tools"
    assert report.linux[0].instance_boot_mode == "BIOS"  # BIOS boot partition; its ESP holds no EFI directory
    assert report.windows == []
    changed = {(c.path, c.action) for c in report.changes}
    for expected in [
        ("/etc/fstab", "edited"),
        ("/etc/default/grub", "edited"),
        ("/etc/initramfs-tools/modules", "edited"),
        ("/boot/grub/grub.cfg", "regenerated"),
        ("/etc/systemd/network/10-cloud-init-ens5.network", "removed"),
        ("/etc/systemd/network/10-cloud-init-ens5.link", "removed"),
        ("/etc/systemd/network/90-failback-wired.network", "created"),
        ("/etc/systemd/system/cloud-init.service", "masked"),
        ("/etc/systemd/system/amazon-ssm-agent.service", "masked"),
    ]:
        assert expected in changed, f"{expected} not in the report: {sorted(changed)}"
    assert any(c.action == "regenerated" and c.path.startswith("/boot/initrd.img-") for c in report.changes)
    assert any(c.action == "installed" and "i386-pc" in c.detail for c in report.changes)
    assert {"ahci", "virtio_blk", "virtio_net", "nvme", "sd_mod"} <= set(report.drivers)
    # The console (and the log, which the console feeds) shows every change with its backup.
    for c in report.changes:
        assert c.path in converted.console_text
        if c.backup:
            assert c.backup in converted.console_text
    assert "OK: Conversion done" in converted.console_text


def test_files_are_converted_and_backed_up(converted: Converted, mounted: Path) -> None:
    fstab = (mounted / "etc/fstab").read_text()
    entries = [line.split() for line in fstab.splitlines() if line.strip() and not line.startswith("#")]
    assert entries and all(e[0].startswith("UUID=") for e in entries), fstab
    assert "/dev/nvme0n1p1  /" in (mounted / "etc/fstab.failback-bak").read_text()
    root_line = next(line for line in fstab.splitlines() if line.split()[1:2] == ["/"])
    uuid = root_line.split()[0].removeprefix("UUID=")
    assert len(uuid) == 36
    assert f"root=UUID={uuid}" in (mounted / "etc/default/grub").read_text()
    assert "root=/dev/nvme0n1p1" in (mounted / "etc/default/grub.failback-bak").read_text()
    grub_cfg = (mounted / "boot/grub/grub.cfg").read_text()
    assert "nvme0n1p1" not in grub_cfg and f"root=UUID={uuid}" in grub_cfg
    assert (mounted / "boot/grub/grub.cfg.failback-bak").exists()
    for c in converted.report.changes:
        if c.backup:
            assert (mounted / c.backup.lstrip("/")).exists() or c.backup.startswith("/boot/efi"), c.backup
    modules = (mounted / "etc/initramfs-tools/modules").read_text()
    assert "virtio_blk" in modules and "ahci" in modules
    initrds = sorted((mounted / "boot").glob("initrd.img-*-amd64"))
    listing = subprocess.run(
        ["chroot", str(mounted), "lsinitramfs", f"/boot/{initrds[0].name}"], check=True, capture_output=True, text=True
    ).stdout
    for mod in ("ahci.ko", "virtio_blk.ko", "sd_mod.ko", "nvme.ko"):
        assert mod in listing, f"{mod} missing from the regenerated initramfs"
    assert (mounted / "etc/systemd/system/cloud-init.service").readlink() == Path("/dev/null")
    assert not (mounted / "etc/systemd/network/10-cloud-init-ens5.network").exists()


def test_rerun_changes_nothing_already_converted(converted: Converted, tmp_path: Path) -> None:
    report, _text, seconds = run_convert(converted.image, tmp_path / "mnt")
    print(f"\nsecond conversion took {seconds:.1f} s")
    assert report.ok, f"{report.failed_step}: {report.error}"
    edits = [(c.path, c.action) for c in report.changes if c.action not in ("regenerated", "installed")]
    assert edits == [], edits


def test_failed_step_rolls_back(fixture_image: fx.Fixture, tmp_path: Path) -> None:
    """update-initramfs fails (a hook of the target exits 1): the files changed before are put back."""
    image = fx.copy_image(fixture_image.image, tmp_path / "broken.img")
    hook = "#!/bin/sh\n[ \"$1\" = prereqs ] && exit 0\necho 'test hook: failing on purpose' >&2\nexit 1\n"
    root = tmp_path / "root"
    root.mkdir()
    with fx.loop_device(image) as dev:
        subprocess.run(["mount", f"{dev}p1", str(root)], check=True)
        try:
            (root / "etc/initramfs-tools/hooks/zz-fail").write_text(hook)
            (root / "etc/initramfs-tools/hooks/zz-fail").chmod(0o755)
            before = (root / "etc/fstab").read_text()
        finally:
            subprocess.run(["umount", str(root)], check=True)
    report, text, _ = run_convert(image, tmp_path / "mnt")
    assert report.failed_step == "initramfs"
    assert "update-initramfs -u -k all" in (report.error or "")
    assert "/etc/fstab" in report.rolled_back
    assert "Conversion failed at step 'initramfs'" in text
    with fx.loop_device(image) as dev:
        subprocess.run(["mount", "-o", "ro", f"{dev}p1", str(root)], check=True)
        try:
            assert (root / "etc/fstab").read_text() == before
            assert not (root / "etc/fstab.failback-bak").exists()  # the failed run's backups are gone too
            assert (root / "etc/systemd/network/10-cloud-init-ens5.network").exists()
            assert not (root / "etc/systemd/network/90-failback-wired.network").exists()
            assert not (root / "etc/systemd/system/cloud-init.service").is_symlink()
        finally:
            subprocess.run(["umount", str(root)], check=True)


@pytest.mark.boot
@pytest.mark.parametrize("controller", ["ahci", "virtio-blk"])
def test_converted_image_boots_with_dhcp(converted: Converted, controller: str, tmp_path: Path) -> None:
    result = fx.boot_disk(converted.image, controller, tmp_path, timeout=POSITIVE_TIMEOUT)
    print(f"\nconverted image on {controller}: {result.outcome} after {result.seconds:.0f} s: {result.match}")
    assert result.outcome == "matched", f"{result.outcome}: {result.match}\n{result.tail(40)}"
    assert result.groups[0] and result.groups[0].startswith("10.0.2.")  # QEMU's user-network DHCP range
    # The disk appeared through the controller's driver, now in the initramfs.
    disk = {"ahci": "[sda]", "virtio-blk": "[vda]"}[controller]
    assert disk in result.tail(100_000), f"no {disk} in the kernel messages"


@pytest.mark.boot
def test_unconverted_image_does_not_boot(fixture_image: fx.Fixture, tmp_path: Path) -> None:
    result = fx.boot_disk(fixture_image.image, "ahci", tmp_path, timeout=NEGATIVE_TIMEOUT)
    print(f"\nunconverted image on ahci: {result.outcome} after {result.seconds:.0f} s: {result.match}")
    assert result.outcome in ("failed", "timeout"), result.tail(40)
    text = result.tail(100_000)
    assert fx.MARKER not in text
    assert "[sda]" not in text  # without ahci/sd_mod in the initramfs no disk shows up at all
    # The initramfs (nvme only) finds no disk on the AHCI controller: it gives up on the root device.
    alert = re.search(r"ALERT!\s+(\S+) does not exist", text)
    assert alert or "Gave up waiting for root file system device" in text, text[-3000:]
    print(alert.group(0) if alert else "Gave up waiting for root file system device")
