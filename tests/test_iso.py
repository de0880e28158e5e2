"""The ISO stage (image/stages/boot/iso.py): structure, El Torito, isohybrid MBR/GPT, reproducibility, bad input,
and (marked boot) real boots of an ISO with Debian's kernel in QEMU in all six ways."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import struct
import time
from pathlib import Path

import pycdlib
import pytest

from image.core.run import run
from image.stages import bootloader
from image.stages.boot import efi, gpt, iso, localdisk
from image.stages.boot.iso import IsoError, IsoInputs, assemble_iso
from image.stages.config import BootConfig, BootEntry, load_config

EPOCH = 1_700_000_000
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull}


def _write(path: Path, size: int, seed: int) -> Path:
    block = bytes((seed + i) % 251 for i in range(4096))
    path.write_bytes((block * (size // 4096 + 1))[:size])
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("iso-cache")


@pytest.fixture(scope="module")
def loaders(cache: Path) -> bootloader.BootLoaders:
    # The bootloader stage's work (apt-get update + download from the image's mirror), once for the module.
    return bootloader.fetch_boot_loaders(cache, bootloader.AptSources.from_config(load_config()))


@pytest.fixture()
def no_loaders() -> bootloader.BootLoaders:
    """For input checks that fail before the EFI image is made: no mirror needed."""
    return bootloader.BootLoaders({"packages": []}, {})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> IsoInputs:
    d = tmp_path_factory.mktemp("iso-inputs")
    (d / "filesystem.module").write_text("00-base.squashfs 10-overlay.squashfs\n")
    (d / "filesystem.packages").write_text("bash\t5.2.15-2+b13\n")
    return IsoInputs(
        kernel=_write(d / "vmlinuz-6.1", 3_000_123, 1),
        initrd=_write(d / "initrd.img-6.1", 1_000_001, 2),
        layers=(_write(d / "00-base.squashfs", 2_500_000, 3), _write(d / "10-overlay.squashfs", 300_000, 4)),
        extra_files={
            "/live/filesystem.module": d / "filesystem.module",
            "/live/filesystem.packages": d / "filesystem.packages",
        },
        source_date_epoch=EPOCH,
    )


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def built(
    cfg, inputs: IsoInputs, cache: Path, loaders: bootloader.BootLoaders, tmp_path_factory: pytest.TempPathFactory
) -> iso.IsoResult:
    return assemble_iso(cfg, inputs, tmp_path_factory.mktemp("iso-out") / "a.iso", cache, loaders)


@pytest.fixture()
def opened(built: iso.IsoResult):
    with iso.open_iso(built.path) as pc:
        yield pc


def _read(pc: pycdlib.PyCdlib, **path: str) -> bytes:
    buf = io.BytesIO()
    pc.get_file_from_iso_fp(buf, **path)
    return buf.getvalue()


def _rr_files(pc: pycdlib.PyCdlib) -> set[str]:
    out = set()
    for dirpath, _dirs, files in pc.walk(rr_path="/"):
        out.update(f"{dirpath.rstrip('/')}/{f}" for f in files)
    return out


# --- structure ---------------------------------------------------------------------------------


@pytest.mark.network
def test_rock_ridge_joliet_and_layout(opened: pycdlib.PyCdlib, inputs: IsoInputs) -> None:
    assert opened.has_rock_ridge() and opened.has_joliet()
    assert opened.pvd.volume_identifier.rstrip() == b"DRSFAILBACK"
    files = _rr_files(opened)
    assert {
        "/live/vmlinuz",
        "/live/initrd.img",
        "/live/00-base.squashfs",
        "/live/10-overlay.squashfs",
        "/live/filesystem.module",
        "/live/filesystem.packages",
        "/isolinux/isolinux.bin",
        "/isolinux/ldlinux.c32",
        "/isolinux/menu.c32",
        "/isolinux/libutil.c32",
        "/isolinux/libcom32.c32",
        "/isolinux/isolinux.cfg",
        "/isolinux/boot.cat",
        "/boot/grub/grub.cfg",
        "/boot/grub/efi.img",
        "/.disk/info",
        "/.disk/boot-packages",
    } <= files
    assert _read(opened, rr_path="/live/vmlinuz") == inputs.kernel.read_bytes()
    assert _read(opened, joliet_path="/live/00-base.squashfs") == inputs.layers[0].read_bytes()
    assert _read(opened, iso_path="/LIVE/INITRD.IMG;1") == inputs.initrd.read_bytes()
    module = inputs.extra_files["/live/filesystem.module"]
    assert _read(opened, rr_path="/live/filesystem.module") == module.read_bytes()
    # isolinux reads plain ISO9660 names: its files must be findable there, case-insensitively.
    assert _read(opened, iso_path="/ISOLINUX/LDLINUX.C32;1")[:4] == b"\x7fELF"
    info = _read(opened, rr_path="/.disk/info").decode()
    assert info.startswith("AWS DRS Failback Client LiveCD") and "20231114" in info


@pytest.mark.network
def test_local_disk_boot_sector_knows_this_images_mbr_id(opened: pycdlib.PyCdlib, built: iso.IsoResult) -> None:
    """isolinux's "boot from first local disk" skips the disk carrying this image's MBR id."""
    bs = _read(opened, rr_path="/isolinux/localdisk.bs")
    mbr_id = struct.unpack_from("<I", built.path.read_bytes(), 440)[0]
    assert mbr_id == iso.derive_mbr_id(iso.derive_seed("DRSFAILBACK", EPOCH))
    assert bs == localdisk.boot_sector(mbr_id)
    assert struct.unpack_from("<I", bs, localdisk.OWN_ID_OFFSET)[0] == mbr_id
    # isolinux looks it up by its ISO9660 name too.
    assert _read(opened, iso_path="/ISOLINUX/LOCALDISK.BS;1") == bs


@pytest.mark.network
def test_menus_on_the_iso_are_the_rendered_ones(opened: pycdlib.PyCdlib, cfg) -> None:
    from image.stages.boot.bootmenu import render_grub, render_isolinux

    assert _read(opened, rr_path="/isolinux/isolinux.cfg").decode() == render_isolinux(cfg)
    assert _read(opened, rr_path="/boot/grub/grub.cfg").decode() == render_grub(cfg)


@pytest.mark.network
def test_boot_packages_are_recorded(opened: pycdlib.PyCdlib, built: iso.IsoResult) -> None:
    text = _read(opened, rr_path="/.disk/boot-packages").decode()
    for pkg in ("isolinux", "syslinux-common", *bootloader.EFI_PACKAGES):
        assert re.search(rf"^{re.escape(pkg)} \S+$", text, re.M), pkg
        assert f"{pkg} {built.boot_packages[pkg]}\n" in text


@pytest.mark.network
def test_boot_loader_versions_are_the_bootloader_stages(loaders: bootloader.BootLoaders, built: iso.IsoResult) -> None:
    assert {p: built.boot_packages[p] for p in bootloader.EFI_PACKAGES} == loaders.versions


@pytest.mark.network
def test_dates_are_source_date_epoch_in_utc(opened: pycdlib.PyCdlib) -> None:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(EPOCH)).encode()
    for vd in (opened.pvd, opened.joliet_vd):
        assert vd.volume_creation_date.date_str.startswith(stamp)
        assert vd.volume_modification_date.date_str.startswith(stamp)
        assert vd.volume_creation_date.gmtoffset == 0
    rec = opened.get_record(rr_path="/live/vmlinuz")
    d = rec.date
    assert (d.years_since_1900 + 1900, d.month, d.day_of_month, d.hour, d.minute, d.gmtoffset) == (
        2023,
        11,
        14,
        22,
        13,
        0,
    )


# --- El Torito ---------------------------------------------------------------------------------


@pytest.mark.network
def test_el_torito_bios_and_efi_entries(opened: pycdlib.PyCdlib, built: iso.IsoResult) -> None:
    cat = opened.eltorito_boot_catalog
    assert cat is not None
    assert cat.validation_entry.platform_id == 0  # x86 BIOS
    bios = cat.initial_entry
    assert bios.boot_indicator == 0x88 and bios.sector_count == 4 and bios.boot_media_type == 0
    isolinux_rec = opened.get_record(rr_path="/isolinux/isolinux.bin")
    assert bios.get_rba() == isolinux_rec.extent_location()
    efi_secs = [s for s in cat.sections if s.platform_id == 0xEF]
    assert len(efi_secs) == 1 and len(efi_secs[0].section_entries) == 1
    uefi = efi_secs[0].section_entries[0]
    efi_rec = opened.get_record(rr_path="/boot/grub/efi.img")
    assert uefi.boot_indicator == 0x88 and uefi.boot_media_type == 0
    assert uefi.get_rba() == efi_rec.extent_location()
    assert uefi.sector_count == efi_rec.get_data_length() // 512 == built.efi_image_size // 512


@pytest.mark.network
def test_boot_info_table(built: iso.IsoResult, opened: pycdlib.PyCdlib) -> None:
    rec = opened.get_record(rr_path="/isolinux/isolinux.bin")
    with built.path.open("rb") as f:
        f.seek(rec.extent_location() * 2048)
        data = f.read(rec.get_data_length())
    pvd_lba, file_lba, length, csum = struct.unpack_from("<IIII", data, 8)
    assert (pvd_lba, file_lba, length) == (16, rec.extent_location(), rec.get_data_length())
    words = struct.unpack_from(f"<{(len(data) - 64) // 4}I", data, 64)
    assert csum == sum(words) & 0xFFFFFFFF
    original = iso.ISOLINUX_BIN.read_bytes()
    assert data[:8] == original[:8] and data[64:] == original[64:]


@pytest.mark.network
def test_efi_image_holds_shim_and_grub(
    built: iso.IsoResult, opened: pycdlib.PyCdlib, cache: Path, tmp_path: Path
) -> None:
    img = tmp_path / "efi.img"
    img.write_bytes(_read(opened, rr_path="/boot/grub/efi.img"))
    assert img.stat().st_size < efi.MAX_IMAGE_BYTES
    listing = run(["mdir", "-i", img, "-b", "::/EFI/BOOT"], capture=True, env=MTOOLS_ENV).stdout.split()
    assert {"::/EFI/BOOT/BOOTX64.EFI", "::/EFI/BOOT/grubx64.efi", "::/EFI/BOOT/mmx64.efi"} <= set(listing)
    run(["mcopy", "-n", "-i", img, "::/EFI/BOOT/BOOTX64.EFI", tmp_path / "bootx64"], env=MTOOLS_ENV)
    shim = next(cache.glob("efi/shim-signed_*/usr/lib/shim/shimx64.efi.signed"))
    assert (tmp_path / "bootx64").read_bytes() == shim.read_bytes()


# --- isohybrid: MBR and GPT ----------------------------------------------------------------------


@pytest.mark.network
def test_mbr_is_syslinux_isohdpfx_with_our_partitions(built: iso.IsoResult, opened: pycdlib.PyCdlib) -> None:
    data = built.path.read_bytes()
    mbr = data[:512]
    assert mbr[:432] == iso.ISOHDPFX_BIN.read_bytes()[:432]
    isolinux_lba = opened.get_record(rr_path="/isolinux/isolinux.bin").extent_location()
    assert struct.unpack_from("<I", mbr, 432)[0] == isolinux_lba * 4  # where isohdpfx finds isolinux.bin
    assert struct.unpack_from("<I", mbr, 440)[0] == iso.derive_mbr_id(iso.derive_seed("DRSFAILBACK", EPOCH))
    assert mbr[510:] == b"\x55\xaa"
    parts = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
    (boot1, _, type1, _, start1, size1), (boot2, _, type2, _, start2, size2) = parts[0], parts[1]
    assert (boot1, type1, start1) == (0x80, 0x00, 0)  # whole image, active, type 0 (UEFI skips it)
    assert size1 * 512 <= len(data) and len(data) - size1 * 512 < 1024 * 1024
    efi_rec = opened.get_record(rr_path="/boot/grub/efi.img")
    assert (boot2, type2, start2, size2) == (0, 0xEF, efi_rec.extent_location() * 4, efi_rec.get_data_length() // 512)
    assert parts[2][4:] == parts[3][4:] == (0, 0)


@pytest.mark.network
def test_gpt_is_consistent_and_sgdisk_accepts_it(built: iso.IsoResult) -> None:
    assert gpt.check_gpt(built.path) == []
    out = run(["sgdisk", "-v", built.path], capture=True, check=False)
    text = out.stdout + out.stderr
    assert "CRC" not in text and "mismatch" not in text.lower()
    problems = [ln.strip() for ln in text.splitlines() if ln.startswith(("Problem", "Warning", "Caution"))]
    # The only remark is the isohybrid MBR's nested partitions, by design (see image/stages/boot/gpt.py).
    assert problems == ["Problem: MBR partitions 1 and 2 overlap!"]
    data = built.path.read_bytes()
    header = gpt._read_header(data, 1)
    entries = gpt.read_entries(data, header)
    esp = next(e for e in entries if e.index == 2)
    mbr_efi_start = struct.unpack_from("<I", data, 446 + 16 + 8)[0]
    assert esp.first_lba == mbr_efi_start
    assert esp.type_guid == gpt.EFI_SYSTEM_PARTITION  # as archiso: firmware may boot only an ESP from USB
    assert header.disk_guid == gpt.derive_guid(iso.derive_seed("DRSFAILBACK", EPOCH), "disk")


@pytest.mark.network
def test_pycdlib_still_reads_the_result_as_hybrid(opened: pycdlib.PyCdlib) -> None:
    assert opened.isohybrid_mbr is not None and opened.isohybrid_mbr.efi


# --- reproducibility -------------------------------------------------------------------------------


@pytest.mark.network
def test_two_builds_are_identical_and_epoch_matters(
    cfg, inputs: IsoInputs, cache: Path, loaders: bootloader.BootLoaders, built: iso.IsoResult, tmp_path: Path
) -> None:
    again = assemble_iso(cfg, inputs, tmp_path / "b.iso", cache, loaders)
    assert again.path.read_bytes() == built.path.read_bytes()
    later = assemble_iso(
        cfg, dataclasses.replace(inputs, source_date_epoch=EPOCH + 86400), tmp_path / "c.iso", cache, loaders
    )
    assert later.path.read_bytes() != built.path.read_bytes()
    assert gpt.check_gpt(later.path) == []


@pytest.mark.network
def test_build_does_not_depend_on_local_time_zone(
    cfg,
    inputs: IsoInputs,
    cache: Path,
    loaders: bootloader.BootLoaders,
    built: iso.IsoResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "America/St_Johns")  # UTC-3:30: any local-time leak changes dates
    time.tzset()
    try:
        other = assemble_iso(cfg, inputs, tmp_path / "tz.iso", cache, loaders)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert other.path.read_bytes() == built.path.read_bytes()


@pytest.mark.network
def test_clock_is_restored_after_build(built: iso.IsoResult) -> None:
    import pycdlib.headervd

    assert pycdlib.headervd.time is time


@pytest.mark.network
def test_backup_gpt_never_overwrites_data(
    cfg, inputs: IsoInputs, cache: Path, loaders: bootloader.BootLoaders, tmp_path: Path
) -> None:
    """pycdlib puts the backup GPT on the last 33 sectors even when they hold data; size the kernel so
    the ISO9660 data ends exactly on a 1 MiB boundary and check every file survives."""
    first = assemble_iso(cfg, inputs, tmp_path / "probe.iso", cache, loaders)
    with iso.open_iso(first.path) as pc:
        used = pc.pvd.space_size * 2048
    if "/.disk/gpt-room" in first.files:
        pytest.fail("the probe build already needed the filler; change the dummy sizes")
    grow = -used % (1024 * 1024)  # kernel sizes are whole sectors here, so the data grows by exactly this
    kernel = _write(tmp_path / "vmlinuz-big", (inputs.kernel.stat().st_size + 2047) // 2048 * 2048 + grow, 9)
    tight = assemble_iso(cfg, dataclasses.replace(inputs, kernel=kernel), tmp_path / "tight.iso", cache, loaders)
    assert iso.GPT_ROOM_PATH in tight.files
    assert gpt.check_gpt(tight.path) == []
    with iso.open_iso(tight.path) as pc:
        assert _read(pc, rr_path="/live/vmlinuz") == kernel.read_bytes()
        for layer in inputs.layers:
            assert _read(pc, rr_path=f"/live/{layer.name}") == layer.read_bytes()
        assert _read(pc, rr_path="/live/initrd.img") == inputs.initrd.read_bytes()


def test_gpt_room_filler() -> None:
    mib = 1024 * 1024
    assert iso.gpt_room_filler(10 * mib - 40 * 512) == 0
    assert iso.gpt_room_filler(10 * mib) == 128 * 128 + 512
    assert iso.gpt_room_filler(10 * mib - 2048) == 2048 + 128 * 128 + 512


# --- names and bad input ---------------------------------------------------------------------------


def test_iso9660_names() -> None:
    assert iso.iso9660_file_name("vmlinuz") == "VMLINUZ.;1"
    assert iso.iso9660_file_name("initrd.img") == "INITRD.IMG;1"
    assert iso.iso9660_file_name("00-base.squashfs") == "00_BASE.SQUASHFS;1"
    assert iso.iso9660_file_name(".hidden") == "_HIDDEN.;1"
    assert len(iso.iso9660_file_name("x" * 40 + ".squashfs")) == 30 + 3  # name + ext <= 30, "." and ";1"
    assert iso.iso9660_dir_name(".disk") == "_DISK"


def test_missing_kernel_is_named(cfg, inputs: IsoInputs, tmp_path: Path, no_loaders: bootloader.BootLoaders) -> None:
    with pytest.raises(IsoError, match=r"^kernel: .*nope does not exist"):
        assemble_iso(
            cfg, dataclasses.replace(inputs, kernel=tmp_path / "nope"), tmp_path / "x.iso", tmp_path, no_loaders
        )
    assert not (tmp_path / "x.iso").exists()


def test_layer_must_be_squashfs(cfg, inputs: IsoInputs, tmp_path: Path, no_loaders: bootloader.BootLoaders) -> None:
    bad = _write(tmp_path / "layer.img", 4096, 0)
    with pytest.raises(IsoError, match=r"layers\[1\]: layer.img must end in .squashfs"):
        assemble_iso(
            cfg, dataclasses.replace(inputs, layers=(inputs.layers[0], bad)), tmp_path / "x.iso", tmp_path, no_loaders
        )


def test_extra_file_may_not_replace_ours(
    cfg, inputs: IsoInputs, tmp_path: Path, no_loaders: bootloader.BootLoaders
) -> None:
    extra = {**inputs.extra_files, "/live/vmlinuz": inputs.kernel}
    with pytest.raises(IsoError, match=r"extra_files\['/live/vmlinuz'\]: the ISO stage writes that path"):
        assemble_iso(cfg, dataclasses.replace(inputs, extra_files=extra), tmp_path / "x.iso", tmp_path, no_loaders)


def test_iso9660_name_clash_is_refused(
    cfg, inputs: IsoInputs, tmp_path: Path, no_loaders: bootloader.BootLoaders
) -> None:
    f = _write(tmp_path / "f", 10, 0)
    extra = {"/live/a-b.txt": f, "/live/a_b.txt": f}
    with pytest.raises(IsoError, match=r"get the same ISO9660 name /LIVE/A_B.TXT;1"):
        assemble_iso(cfg, dataclasses.replace(inputs, extra_files=extra), tmp_path / "x.iso", tmp_path, no_loaders)
    assert not list(tmp_path.glob("x.iso*"))  # a failed build leaves no partial image behind


def test_bad_extra_path(cfg, inputs: IsoInputs, tmp_path: Path, no_loaders: bootloader.BootLoaders) -> None:
    with pytest.raises(IsoError, match=r"extra_files\['live/x'\]: must be an absolute path"):
        assemble_iso(
            cfg,
            dataclasses.replace(inputs, extra_files={"live/x": inputs.kernel}),
            tmp_path / "x.iso",
            tmp_path,
            no_loaders,
        )


# --- real boots (QEMU, TCG) --------------------------------------------------------------------------

BOOT_MARKER = "failback-iso-test-marker"


def _kernel(cache: Path) -> Path:
    """Debian's signed kernel: the pipeline's (build/cache/boot/vmlinuz) if built, else downloaded."""
    built_kernel = Path(__file__).resolve().parent.parent / "build" / "cache" / "boot" / "vmlinuz"
    if built_kernel.is_file():
        return built_kernel
    deps = run(["apt-cache", "depends", "linux-image-amd64"], capture=True).stdout
    m = re.search(r"Depends: (linux-image-\S+-amd64)\b", deps)
    assert m, deps
    _version, tree = bootloader.fetch_package(m.group(1), cache)
    return next(tree.glob("boot/vmlinuz-*"))


@pytest.fixture(scope="module")
def boot_iso(cache: Path, loaders: bootloader.BootLoaders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from image.vm import initramfs

    d = tmp_path_factory.mktemp("boot-iso")
    initrd = initramfs.write_marker_initramfs(d / "initrd.img")
    layer = _write(d / "00-base.squashfs", 100_000, 5)
    base = load_config()
    # Not `quiet`: the kernel's own "Secure boot enabled" line is part of the check.
    boot = BootConfig(
        timeout=1,
        default="test",
        entries=(
            BootEntry(id="test", label="test", cmdline="console=ttyS0,115200n8 panic=-1"),
            BootEntry(id="disk", label="disk", local_disk=True),
        ),
    )
    cfg = dataclasses.replace(base, kernel_cmdline="boot=live", boot=boot)
    return assemble_iso(
        cfg, IsoInputs(_kernel(cache), initrd, (layer,), {}, EPOCH), d / "boot.iso", cache, loaders
    ).path


@pytest.mark.slow
@pytest.mark.boot
@pytest.mark.network
@pytest.mark.parametrize(
    "way_name", ["seabios-cd", "seabios-disk", "ovmf-cd", "ovmf-disk", "ovmf-secureboot-cd", "ovmf-secureboot-disk"]
)
def test_boots_to_the_kernel(way_name: str, boot_iso: Path, tmp_path: Path) -> None:
    from image.vm import initramfs, media, qemu

    way = qemu.boot_way(way_name)
    image = media.disk_copy(boot_iso, tmp_path / "disk.img") if way.medium == "disk" else boot_iso
    firmware = vars_file = None
    if way.firmware == "uefi":
        firmware = qemu.select_uefi_firmware(qemu.load_firmware_descriptors(), secure_boot=way.secure_boot)
        vars_file = qemu.copy_vars(firmware, tmp_path / "vars.fd")
    serial = tmp_path / "serial.log"
    qmp = qemu.short_socket_path(way_name)
    try:
        argv = qemu.iso_argv(
            way, image=image, serial_log=serial, qmp_socket=qmp, firmware=firmware, vars_file=vars_file
        )
        result = qemu.watch_boot(
            argv, serial_log=serial, qmp_socket=qmp, pattern=re.compile(re.escape(initramfs.BARE_MARKER)), timeout=300
        )
    finally:
        shutil.rmtree(qmp.parent, ignore_errors=True)
    assert result.outcome == "matched", f"{way_name}: {result.outcome} {result.match}\n{result.tail()}"
    console = qemu.clean_console(serial.read_bytes())
    assert ("Secure boot enabled" in console) == way.secure_boot, result.tail(60)
    assert ("efi: EFI v" in console) == (way.firmware == "uefi"), result.tail(60)
    assert "boot=live console=ttyS0,115200n8 panic=-1" in console  # the menu's default entry ran
