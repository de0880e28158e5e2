"""image/vm/smoke.py: the verdict on each way, the per-way plan (firmware, VARS copy, disk copy), the
report; and, marked `boot`, the real six-way smoke matrix on the built ISO."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from image.vm import media, qemu, smoke
from image.vm.qemu import BOOT_WAYS, BootResult, boot_way

REPO = Path(__file__).resolve().parent.parent
LINE = "failback-client 0.1.0 | boot mode: {mode} | secure boot: {sb} | memory: 1003 MiB"


def matched(tmp_path: Path, mode: str, sb: str) -> BootResult:
    line = LINE.format(mode=mode, sb=sb)
    m = smoke.SUMMARY_RE.search(line)
    assert m
    return BootResult("matched", 41.5, line, tmp_path / "serial.log", groups=m.groups())


@pytest.mark.parametrize("way", BOOT_WAYS, ids=lambda w: w.name)
def test_right_state_passes_and_any_other_fails(tmp_path: Path, way: qemu.BootWay) -> None:
    ok, detail = smoke.check_summary(way, matched(tmp_path, way.boot_mode, way.secure_boot_state))
    assert ok and detail.startswith("failback-client 0.1.0")
    for mode in ("BIOS", "UEFI"):
        for sb in ("on", "off"):
            if (mode, sb) != (way.boot_mode, way.secure_boot_state):
                ok, detail = smoke.check_summary(way, matched(tmp_path, mode, sb))
                assert not ok
                assert f"must give boot mode {way.boot_mode}, secure boot {way.secure_boot_state}" in detail


def test_summary_regex() -> None:
    assert smoke.SUMMARY_RE.search(LINE.format(mode="UEFI", sb="on")).groups() == ("UEFI", "on")
    assert not smoke.SUMMARY_RE.search("failback-client: boot mode: UEFI")  # no version
    assert not smoke.SUMMARY_RE.search("Starting failback-client@tty1.service - boot mode: maybe")


def test_failures_explain_themselves(tmp_path: Path) -> None:
    way = boot_way("ovmf-cd")
    log = tmp_path / "serial.log"
    assert smoke.check_summary(way, BootResult("timeout", 300, None, log)) == (False, "no summary line within 300 s")
    ok, detail = smoke.check_summary(way, BootResult("failed", 9, "Kernel panic - not syncing: x", log))
    assert not ok and detail == "boot failed: Kernel panic - not syncing: x"
    ok, detail = smoke.check_summary(
        way, BootResult("exited", 1, "QEMU exited with status 1", log, qemu_output="qemu: could not open disk")
    )
    assert not ok and detail == "QEMU exited with status 1: qemu: could not open disk before the summary line"


def fake_iso(path: Path) -> Path:
    data = bytearray(20 * 2048)
    data[17 * 2048 : 17 * 2048 + 30] = b"\x00CD001\x01EL TORITO SPECIFICATION"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("way", BOOT_WAYS, ids=lambda w: w.name)
def test_plan_per_way(tmp_path: Path, way: qemu.BootWay) -> None:
    iso = fake_iso(tmp_path / "live.iso")
    disk = media.disk_copy(iso, tmp_path / "work/disk.img")
    fws = qemu.load_firmware_descriptors()
    argv, log, sock = smoke.plan_way(way, iso, tmp_path / "work", fws, disk)
    shutil.rmtree(sock.parent)
    assert log == tmp_path / "work" / way.name / "serial.log"
    assert f"file:{log}" in argv and f"unix:{sock},server=on,wait=off" in argv
    image = disk if way.medium == "disk" else iso
    assert any(a.startswith(f"if=none,id=boot,file={image},") for a in argv)
    vars_copy = tmp_path / "work" / way.name / "vars.fd"
    if way.firmware == "uefi":
        fw = qemu.select_uefi_firmware(fws, secure_boot=way.secure_boot)
        assert vars_copy.read_bytes() == fw.vars_template.read_bytes()
        assert f"if=pflash,format=raw,unit=1,file={vars_copy}" in argv
        assert ("driver=cfi.pflash01,property=secure,value=on" in argv) == way.secure_boot
    else:
        assert not vars_copy.exists() and not any("pflash" in a for a in argv)


def test_workdir_follows_the_build_directory(tmp_path: Path) -> None:
    # Engineers boot ISOs of their own build directories on one machine: never the same files.
    assert smoke.workdir_for(tmp_path / "build/boot/out/x.iso") == tmp_path / "build/boot/smoke"
    assert smoke.workdir_for(smoke.default_iso()) == smoke.DEFAULT_WORKDIR
    assert smoke.workdir_for(tmp_path / "elsewhere/my.iso") == smoke.DEFAULT_WORKDIR / "my"


def test_matrix_refuses_a_missing_iso(tmp_path: Path) -> None:
    with pytest.raises(qemu.QemuError, match="no such ISO; build it first"):
        smoke.run_matrix(tmp_path / "nope.iso", tmp_path)


def test_report_has_table_and_failed_tails(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("line one\nKernel panic - not syncing: boom\n")
    ok = smoke.WayResult(boot_way("seabios-cd"), True, 40.2, LINE.format(mode="BIOS", sb="off"), log)
    bad_boot = BootResult("failed", 12.0, "Kernel panic - not syncing: boom", log)
    bad = smoke.WayResult(boot_way("ovmf-disk"), False, 12.0, "boot failed: boom", log, bad_boot)
    text = smoke.report([ok, bad])
    lines = text.splitlines()
    assert lines[0].split() == ["way", "result", "seconds", "summary", "line", "/", "reason"]
    assert lines[2].split()[:3] == ["seabios-cd", "PASS", "40.2"]
    assert lines[3].split()[:3] == ["ovmf-disk", "FAIL", "12.0"]
    assert f"--- ovmf-disk: last 40 lines of {log} ---" in text
    assert text.rstrip().endswith("Kernel panic - not syncing: boom")


@pytest.mark.boot
@pytest.mark.parametrize("way", BOOT_WAYS, ids=lambda w: w.name)
def test_smoke_way(built_iso: Path, way: qemu.BootWay) -> None:
    """The built ISO boots this way and the client reports the right boot mode and Secure Boot state."""
    [result] = smoke.run_matrix(built_iso, REPO / "build" / "smoke", ways=[way])
    assert result.passed, smoke.report([result])


@pytest.fixture(scope="module")
def probe_iso() -> Path:
    """The ISO stage's boot chain around the build's kernel and the probe initramfs."""
    kernel = REPO / "build/cache/boot/vmlinuz"
    if not kernel.is_file():
        pytest.skip("no kernel in build/cache/boot yet (inv rootfs)")
    return smoke.make_probe_iso(kernel, REPO / "build" / "smoke" / "probe")


@pytest.mark.boot
@pytest.mark.parametrize("way", BOOT_WAYS, ids=lambda w: w.name)
def test_boot_chain_probe(probe_iso: Path, way: qemu.BootWay) -> None:
    """Firmware, boot loaders and the signed kernel boot each way (the live system left out), and the
    firmware state reaches Linux: the probe reports the boot mode and Secure Boot state of the way."""
    [result] = smoke.run_matrix(probe_iso, REPO / "build" / "smoke" / "probe", ways=[way], timeout=180)
    assert result.passed, smoke.report([result])
    assert "boot-chain-probe" in result.detail
