"""image/vm/qemu.py: firmware chosen from QEMU's descriptors, the exact QEMU command per boot way,
the El Torito-less disk copy, the marker initramfs, and real TCG boots of a bare kernel."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from image.vm import initramfs, media, qemu, smoke
from image.vm.qemu import BOOT_WAYS, Firmware, QemuError, boot_way

REAL_DIRS = (Path("/usr/share/qemu/firmware"),)
OVMF = Path("/usr/share/OVMF")


def write_descriptor(
    d: Path,
    name: str,
    features: list[str],
    code: str,
    vars_: str,
    machines: tuple[str, ...] = ("pc-q35-*",),
    interface: str = "uefi",
    device: str = "flash",
) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(
        json.dumps(
            {
                "description": name,
                "interface-types": [interface],
                "mapping": {
                    "device": device,
                    "executable": {"filename": code, "format": "raw"},
                    "nvram-template": {"filename": vars_, "format": "raw"},
                },
                "targets": [{"architecture": "x86_64", "machines": list(machines)}],
                "features": features,
            }
        )
    )


# --- firmware selection, on this host's real descriptors ---------------------------------------------------


def test_real_descriptors_are_loaded_in_priority_order() -> None:
    fws = qemu.load_firmware_descriptors(REAL_DIRS)
    names = [fw.descriptor.name for fw in fws]
    assert names == sorted(names)
    assert "40-edk2-x86_64-secure-enrolled.json" in names
    assert all(fw.code.is_file() and fw.vars_template.is_file() for fw in fws)


def test_secure_boot_picks_the_ms_enrolled_firmware() -> None:
    fw = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(REAL_DIRS), secure_boot=True)
    assert fw.code == OVMF / "OVMF_CODE_4M.ms.fd"
    assert fw.vars_template == OVMF / "OVMF_VARS_4M.ms.fd"
    assert fw.secure_boot_enforced and fw.requires_smm


def test_plain_uefi_picks_the_firmware_without_secure_boot() -> None:
    fw = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(REAL_DIRS), secure_boot=False)
    assert fw.code == OVMF / "OVMF_CODE_4M.fd"
    assert fw.vars_template == OVMF / "OVMF_VARS_4M.fd"
    assert not fw.requires_smm and "secure-boot" not in fw.features


def test_selection_is_by_feature_not_by_file_name(tmp_path: Path) -> None:
    """Only features count: secure-boot without enrolled keys does not enforce Secure Boot, BIOS
    and memory-mapped descriptors are ignored, /etc overrides /usr/share."""
    code, vars_ = str(OVMF / "OVMF_CODE_4M.fd"), str(OVMF / "OVMF_VARS_4M.fd")
    usr, etc = tmp_path / "usr", tmp_path / "etc"
    write_descriptor(usr, "10-bios.json", [], code, vars_, interface="bios")
    write_descriptor(usr, "20-mem.json", [], code, vars_, device="memory")
    write_descriptor(usr, "30-sb-empty.json", ["secure-boot", "requires-smm"], code, vars_)
    write_descriptor(usr, "70-plain.json", [], code, vars_)
    write_descriptor(usr, "80-enrolled.json", ["secure-boot", "enrolled-keys", "requires-smm"], code, vars_)
    write_descriptor(
        etc,
        "80-enrolled.json",
        ["secure-boot", "enrolled-keys", "requires-smm"],
        code,
        str(OVMF / "OVMF_VARS_4M.ms.fd"),
    )
    fws = qemu.load_firmware_descriptors((etc, usr))
    assert [fw.descriptor.name for fw in fws] == ["30-sb-empty.json", "70-plain.json", "80-enrolled.json"]
    assert qemu.select_uefi_firmware(fws, secure_boot=False).descriptor.name == "70-plain.json"
    sb = qemu.select_uefi_firmware(fws, secure_boot=True)
    assert sb.descriptor == etc / "80-enrolled.json"
    assert sb.vars_template == OVMF / "OVMF_VARS_4M.ms.fd"


def test_missing_firmware_is_a_clear_error(tmp_path: Path) -> None:
    write_descriptor(tmp_path, "60-plain.json", [], str(OVMF / "OVMF_CODE_4M.fd"), str(OVMF / "OVMF_VARS_4M.fd"))
    write_descriptor(
        tmp_path,
        "61-i440fx.json",
        ["secure-boot", "enrolled-keys"],
        str(OVMF / "OVMF_CODE_4M.fd"),
        str(OVMF / "OVMF_VARS_4M.fd"),
        machines=("pc-i440fx-*",),
    )
    fws = qemu.load_firmware_descriptors((tmp_path,))
    with pytest.raises(
        QemuError,
        match=r"no UEFI firmware descriptor for machine q35 with secure-boot \+ "
        r"enrolled-keys .*60-plain.json.*ovmf",
    ):
        qemu.select_uefi_firmware(fws, secure_boot=True)


# --- the exact QEMU command of each way --------------------------------------------------------------------

BASE = [
    "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,smm={smm}", "-m", "1024", "-smp", "1",
    "-nodefaults", "-display", "none", "-vga", "std", "-serial", "file:/w/serial.log", "-monitor", "none",
    "-qmp", "unix:/s/q.sock,server=on,wait=off", "-rtc", "base=utc", "-nic", "user,model=virtio-net-pci",
    "-device", "virtio-rng-pci", "-no-reboot",
]  # fmt: skip
CD = [
    "-drive",
    "if=none,id=boot,file={img},format=raw,media=cdrom,readonly=on",
    "-device",
    "ide-cd,drive=boot,bootindex=0",
]
DISK = [
    "-drive",
    "if=none,id=boot,file={img},format=raw,media=disk,snapshot=on",
    "-device",
    "ide-hd,drive=boot,bootindex=0",
]
PLAIN = [
    "-drive",
    "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
    "-drive",
    "if=pflash,format=raw,unit=1,file=/w/vars.fd",
]
SECURE = [
    "-drive",
    "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
    "-drive",
    "if=pflash,format=raw,unit=1,file=/w/vars.fd",
    "-global",
    "driver=cfi.pflash01,property=secure,value=on",
]


def expected(smm: str, fw: list[str], medium: list[str], img: str) -> list[str]:
    return [a.format(smm=smm) for a in BASE] + fw + [a.format(img=img) for a in medium]


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("seabios-cd", expected("off", [], CD, "/i/live.iso")),
        ("seabios-disk", expected("off", [], DISK, "/i/disk.img")),
        ("ovmf-cd", expected("off", PLAIN, CD, "/i/live.iso")),
        ("ovmf-disk", expected("off", PLAIN, DISK, "/i/disk.img")),
        ("ovmf-secureboot-cd", expected("on", SECURE, CD, "/i/live.iso")),
        ("ovmf-secureboot-disk", expected("on", SECURE, DISK, "/i/disk.img")),
    ],
)
def test_exact_qemu_command_per_way(name: str, argv: list[str]) -> None:
    way = boot_way(name)
    fw = None
    if way.firmware == "uefi":
        fw = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(REAL_DIRS), secure_boot=way.secure_boot)
    image = Path("/i/disk.img" if way.medium == "disk" else "/i/live.iso")
    got = qemu.iso_argv(
        way,
        image=image,
        serial_log=Path("/w/serial.log"),
        qmp_socket=Path("/s/q.sock"),
        firmware=fw,
        vars_file=Path("/w/vars.fd") if fw else None,
    )
    assert got == argv


def test_cpus_reach_every_guest_the_bench_compares(tmp_path: Path) -> None:
    """`inv bench --cpus N`: the ISO ways and the bare-kernel baseline get the same -smp."""
    way = boot_way("seabios-cd")
    iso = qemu.iso_argv(
        way, image=Path("/i/live.iso"), serial_log=Path("/w/serial.log"), qmp_socket=Path("/s/q.sock"), cpus=2
    )
    one = expected("off", [], CD, "/i/live.iso")
    i = iso.index("-smp")
    assert iso[i + 1] == "2" and iso[: i + 1] + iso[i + 2 :] == one[: i + 1] + one[i + 2 :]
    bare = qemu.kernel_argv(
        kernel=Path("/k"),
        initrd=Path("/r"),
        append="x",
        serial_log=Path("/w/s.log"),
        qmp_socket=Path("/s/q.sock"),
        cpus=2,
    )
    assert bare[bare.index("-smp") + 1] == "2"
    plan, _, _ = smoke.plan_way(way, Path("/i/live.iso"), tmp_path, (), None, cpus=2)
    assert plan[plan.index("-smp") + 1] == "2"


def test_way_and_firmware_must_agree() -> None:
    fws = qemu.load_firmware_descriptors(REAL_DIRS)
    plain = qemu.select_uefi_firmware(fws, secure_boot=False)
    kw = {"image": Path("/i"), "serial_log": Path("/l"), "qmp_socket": Path("/s")}
    with pytest.raises(QemuError, match="does not match secure_boot=True"):
        qemu.iso_argv(boot_way("ovmf-secureboot-cd"), firmware=plain, vars_file=Path("/v"), **kw)
    with pytest.raises(QemuError, match="UEFI ways need firmware"):
        qemu.iso_argv(boot_way("ovmf-cd"), **kw)
    with pytest.raises(QemuError, match="unknown boot way 'efi'"):
        boot_way("efi")


def test_the_six_ways() -> None:
    assert [(w.boot_mode, w.secure_boot_state, w.medium) for w in BOOT_WAYS] == [
        ("BIOS", "off", "cd"),
        ("BIOS", "off", "disk"),
        ("UEFI", "off", "cd"),
        ("UEFI", "off", "disk"),
        ("UEFI", "on", "cd"),
        ("UEFI", "on", "disk"),
    ]


def test_vars_are_copied_per_boot(tmp_path: Path) -> None:
    fw = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(REAL_DIRS), secure_boot=True)
    copy = qemu.copy_vars(fw, tmp_path / "a/vars.fd")
    assert copy.read_bytes() == fw.vars_template.read_bytes()
    assert os.access(copy, os.W_OK)


# --- the disk copy without El Torito ---------------------------------------------------------------------------


def fake_iso(path: Path) -> Path:
    data = bytearray(20 * 2048)
    data[16 * 2048 : 16 * 2048 + 6] = b"\x01CD001"
    data[17 * 2048 : 17 * 2048 + 7 + 23] = b"\x00CD001\x01EL TORITO SPECIFICATION"
    path.write_bytes(bytes(data))
    return path


def test_disk_copy_breaks_only_el_torito(tmp_path: Path) -> None:
    iso = fake_iso(tmp_path / "x.iso")
    copy = media.disk_copy(iso, tmp_path / "out/disk.img")
    a, b = iso.read_bytes(), copy.read_bytes()
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert diff and min(diff) >= media.ELTORITO_OFFSET and max(diff) < media.ELTORITO_OFFSET + 9
    assert b"EL TORITO" not in b
    # Reused while the ISO is unchanged; redone when it changes.
    mtime = copy.stat().st_mtime_ns
    assert media.disk_copy(iso, copy).stat().st_mtime_ns == mtime
    os.utime(iso, ns=(1, 1))
    media.disk_copy(iso, copy)
    assert b"EL TORITO" not in copy.read_bytes() and copy.stat().st_mtime_ns != mtime


def test_disk_copy_refuses_a_non_eltorito_image(tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(bytes(20 * 2048))
    with pytest.raises(media.MediaError, match="not an El Torito boot record"):
        media.disable_eltorito(img)


# --- the marker initramfs and console handling ----------------------------------------------------------------


def test_marker_initramfs_is_a_reproducible_newc_archive(tmp_path: Path) -> None:
    a = initramfs.write_marker_initramfs(tmp_path / "a.gz")
    b = initramfs.write_marker_initramfs(tmp_path / "b.gz")
    assert a.read_bytes() == b.read_bytes()
    listing = subprocess.run(
        ["cpio", "-t", "-v"], input=gzip.decompress(a.read_bytes()), capture_output=True, check=True
    ).stdout.decode()
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names == ["bin", "dev", "dev/console", "proc", "sys", "bin/busybox", "init"]
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(
        ["cpio", "-i", "--no-absolute-filenames", "init"],
        cwd=extract,
        input=gzip.decompress(a.read_bytes()),
        capture_output=True,
        check=True,
    )
    assert initramfs.BARE_MARKER in (extract / "init").read_text()


def test_console_text_loses_escape_sequences() -> None:
    raw = b"\x1b[=3h\x1b[2J\x1b[1;1H\x1b[0mfailback-client 0.1.0 | boot mode: UEFI\r\n\x1b(B"
    assert qemu.clean_console(raw) == "failback-client 0.1.0 | boot mode: UEFI\n"


# --- real boots (TCG) -----------------------------------------------------------------------------------------


@pytest.fixture
def qmp_socket() -> Iterator[Path]:
    sock = qemu.short_socket_path("t")
    yield sock
    shutil.rmtree(sock.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def bare_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signed Debian kernel: the one the build put in its cache, or the one `inv bench` keeps."""
    repo = Path(__file__).resolve().parent.parent
    candidates = [repo / "build/cache/boot/vmlinuz", *sorted((repo / "build/cache/bench").glob("**/vmlinuz*"))]
    found = [c for c in candidates if c.is_file()]
    if not found:
        pytest.skip("no Debian kernel under build/cache yet (`inv build` makes one)")
    dest = tmp_path_factory.mktemp("kernel") / "vmlinuz"
    shutil.copyfile(found[0], dest)
    return dest


@pytest.mark.boot
@pytest.mark.parametrize(
    ("firmware", "secure_line"),
    [
        (None, None),
        ("plain", "secureboot: Secure boot disabled"),
        ("secure", "secureboot: Secure boot enabled"),
    ],
)
def test_bare_kernel_boots_with_each_firmware(
    bare_kernel: Path, tmp_path: Path, qmp_socket: Path, firmware: str | None, secure_line: str | None
) -> None:
    """The firmware and Secure Boot plumbing, proven with the signed Debian kernel booted directly
    (the benchmark's baselines: SeaBIOS, and each UEFI way's own firmware)."""
    fw = None
    if firmware:
        fw = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(), secure_boot=firmware == "secure")
    result = qemu.boot_bare_kernel(bare_kernel, tmp_path, append="console=ttyS0,115200n8", firmware=fw, timeout=180)
    assert result.outcome == "matched", result.tail()
    assert 0 < result.seconds < 180
    assert (tmp_path / "bare-kernel.vars.fd").is_file() == (fw is not None)  # its own copy of the NVRAM
    text = qemu.clean_console(result.serial_log.read_bytes())
    if secure_line:
        assert secure_line in text
        assert "efi: EFI v" in text
    else:
        assert "efi: EFI v" not in text


@pytest.mark.boot
def test_watch_boot_reports_qemu_exit_and_timeout(bare_kernel: Path, tmp_path: Path, qmp_socket: Path) -> None:
    initrd = initramfs.write_marker_initramfs(tmp_path / "initrd.gz")
    log, sock = tmp_path / "serial.log", qmp_socket
    argv = qemu.kernel_argv(
        kernel=bare_kernel, initrd=initrd, append="console=ttyS0 panic=-1", serial_log=log, qmp_socket=sock
    )
    # The guest powers off after the marker: waiting for something else ends with QEMU's exit.
    exited = qemu.watch_boot(argv, serial_log=log, qmp_socket=sock, pattern=re.compile("never printed"), timeout=180)
    assert exited.outcome == "exited", exited.tail()
    assert "QEMU exited with status 0" in (exited.match or "")
    stuck = qemu.watch_boot(argv, serial_log=log, qmp_socket=sock, pattern=re.compile("never printed"), timeout=0.5)
    assert stuck.outcome == "timeout"


@pytest.mark.boot
def test_failure_line_stops_the_boot_early(bare_kernel: Path, tmp_path: Path, qmp_socket: Path) -> None:
    """No init at all: the kernel panics, and the watcher stops QEMU instead of waiting out the timeout."""
    empty = tmp_path / "empty.gz"
    empty.write_bytes(gzip.compress(initramfs._newc_entry("TRAILER!!!", 0), mtime=0))
    log, sock = tmp_path / "serial.log", qmp_socket
    argv = qemu.kernel_argv(
        kernel=bare_kernel, initrd=empty, append="console=ttyS0 panic=0", serial_log=log, qmp_socket=sock
    )
    result = qemu.watch_boot(argv, serial_log=log, qmp_socket=sock, pattern=re.compile("never printed"), timeout=180)
    assert result.outcome == "failed", result.tail()
    assert "Kernel panic - not syncing" in (result.match or "")
    assert result.seconds < 60


def test_firmware_dataclass_is_frozen() -> None:
    fw = Firmware(Path("/d"), "", Path("/c"), Path("/v"), frozenset(), ("pc-q35-*",))
    with pytest.raises(AttributeError):
        fw.code = Path("/x")  # type: ignore[misc]
    assert fw.supports_machine("q35") and not fw.supports_machine("pc")


def test_kernel_and_layers_are_read_from_the_iso(tmp_path: Path) -> None:
    """The benchmark's baseline boots the ISO's own kernel; its layer sizes come from the ISO too."""
    import pycdlib

    from image.bench import boot as bench

    iso = tmp_path / "t.iso"
    pc = pycdlib.PyCdlib()
    pc.new(interchange_level=3, rock_ridge="1.09", joliet=3)
    pc.add_directory("/LIVE", rr_name="live", joliet_path="/live")
    for iso_name, name, data in (
        ("VMLINUZ.;1", "vmlinuz", b"kernel-bytes"),
        ("BASE.SQF;1", "00-base.squashfs", b"b" * 5000),
        ("OVERLAY.SQF;1", "10-overlay.squashfs", b"o" * 700),
    ):
        pc.add_fp(io.BytesIO(data), len(data), f"/LIVE/{iso_name}", rr_name=name, joliet_path=f"/live/{name}")
    pc.write(str(iso))
    pc.close()
    kernel = media.extract_from_iso(iso, r"/vmlinuz[^/]*$", tmp_path / "out/vmlinuz")
    assert kernel.read_bytes() == b"kernel-bytes"
    assert bench.iso_layers(iso) == {"/live/00-base.squashfs": 5000, "/live/10-overlay.squashfs": 700}
    with pytest.raises(media.MediaError, match="no file matching 'initrd'"):
        media.extract_from_iso(iso, "initrd", tmp_path / "x")


def test_match_is_reported_to_the_end_of_its_line() -> None:
    text = "\\x1b[2Jmenu junk   failback-client 1.0 | boot mode: BIOS | secure boot: off | memory: 9 MiB\nnext"
    m = re.search(r"failback-client \S+ .*boot mode: (BIOS|UEFI)", text)
    assert m
    assert qemu._whole_line(m) == "failback-client 1.0 | boot mode: BIOS | secure boot: off | memory: 9 MiB"


def test_bench_removes_build_dirs_but_never_through_a_mount(tmp_path: Path) -> None:
    from image.bench import boot as bench

    d = tmp_path / "cold"
    (d / "cache/rootfs/etc").mkdir(parents=True)
    bench.remove_build_dir(d)
    assert not d.exists()
    with pytest.raises(RuntimeError, match=r"still mounted below it: .*/proc"):
        bench.remove_build_dir(Path("/"))


def test_bench_ratio_uses_the_baseline_next_to_each_way(tmp_path: Path) -> None:
    """Under a shared machine's changing load, each way is compared with the bare-kernel boot measured
    right before it; an `against` ISO (e.g. the previous build) is shown beside it."""
    from image.bench import boot as bench
    from image.vm.smoke import WayResult

    cd, disk = qemu.boot_way("seabios-cd"), qemu.boot_way("ovmf-disk")
    report = bench.BenchReport(
        baseline_s=5.0,
        way_baselines={"seabios-cd": 4.0, "ovmf-disk": 6.0},
        against=tmp_path / "before.iso",
        boots=[WayResult(cd, True, 16.0, "ok", tmp_path), WayResult(disk, True, 30.0, "ok", tmp_path)],
        against_boots=[WayResult(cd, True, 40.0, "ok", tmp_path), WayResult(disk, False, 300.0, "no line", tmp_path)],
    )
    lines = {line.split()[0]: line for line in report.format().splitlines() if line.strip()}
    assert "16.0 s   4.00x  base  4.0 s   against  40.0 s 10.00x  (target <= 4x: met)" in lines["seabios-cd"]
    assert "30.0 s   5.00x  base  6.0 s   against FAILED (no line)  (target <= 4x: MISSED)" in lines["ovmf-disk"]
    assert f"against = {tmp_path / 'before.iso'}" in report.format()


def test_bench_shows_uefi_ways_against_their_own_firmware_too(tmp_path: Path) -> None:
    """A UEFI way's firmware costs seconds before any ISO can act: next to the SeaBIOS baseline's ratio
    the report gives the ratio against the bare kernel loaded by that way's own firmware."""
    from image.bench import boot as bench
    from image.vm.smoke import WayResult

    cd, disk = qemu.boot_way("seabios-cd"), qemu.boot_way("ovmf-disk")
    report = bench.BenchReport(
        way_baselines={"seabios-cd": 4.0, "ovmf-disk": 4.0},
        firmware_baselines={"ovmf-disk": 7.5},
        boots=[WayResult(cd, True, 15.0, "ok", tmp_path), WayResult(disk, True, 20.0, "ok", tmp_path)],
    )
    text = report.format()
    assert "20.0 s   5.00x  base  4.0 s  (target <= 4x: MISSED)" in text
    assert "same firmware: bare kernel  7.5 s,  2.67x  (target <= 4x against it: met)" in text
    assert text.count("same firmware: bare kernel") == 1  # none for the BIOS way: SeaBIOS is its baseline


def test_watch_boot_measures_the_child_cpu_time(tmp_path: Path) -> None:
    """cpu_seconds counts what the watched process burnt (a loaded machine stretches `seconds`, not it)."""
    log = tmp_path / "serial.log"
    busy = (
        "python3 -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass'; "
        f"echo READY-MARK >> {log}; sleep 1"
    )
    result = qemu.watch_boot(
        ["sh", "-c", busy],
        serial_log=log,
        qmp_socket=tmp_path / "none.sock",
        pattern=re.compile("READY-MARK"),
        timeout=30,
    )
    assert result.outcome == "matched", result.tail()
    assert result.cpu_seconds is not None and 0.35 <= result.cpu_seconds < result.seconds + 1.5
