"""The post-write GPT fixes (image/stages/boot/gpt.py) on images written by pycdlib's add_isohybrid(efi=True)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pycdlib
import pytest

from image.core.run import run
from image.stages.boot import gpt

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")


def _raw_pycdlib_hybrid(path: Path, payload: int = 300_000) -> Path:
    """A hybrid image exactly as pycdlib writes it, without any of our fixes."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", joliet=3, vol_ident="GPTTEST")
    iso.add_directory("/ISOLINUX", rr_name="isolinux", joliet_path="/isolinux")
    boot = ISOLINUX_BIN.read_bytes()
    iso.add_fp(
        io.BytesIO(boot),
        len(boot),
        "/ISOLINUX/ISOLINUX.BIN;1",
        rr_name="isolinux.bin",
        joliet_path="/isolinux/isolinux.bin",
    )
    efi = b"\xeb\x3c\x90" + bytes(128 * 1024 - 3)
    iso.add_fp(io.BytesIO(efi), len(efi), "/EFI.IMG;1", rr_name="efi.img", joliet_path="/efi.img")
    data = bytes(range(256)) * (payload // 256)
    iso.add_fp(io.BytesIO(data), len(data), "/DATA.BIN;1", rr_name="data.bin", joliet_path="/data.bin")
    iso.add_eltorito(
        "/ISOLINUX/ISOLINUX.BIN;1", bootcatfile="/ISOLINUX/BOOT.CAT;1", boot_load_size=4, boot_info_table=True
    )
    iso.add_eltorito("/EFI.IMG;1", efi=True)
    iso.add_isohybrid(efi=True, mbr_id=0x12345678)
    iso.write(str(path))
    iso.close()
    return path


def _sgdisk_problems(path: Path) -> list[str]:
    out = run(["sgdisk", "-v", path], capture=True, check=False)
    text = out.stdout + out.stderr
    return [line.strip() for line in text.splitlines() if line.startswith(("Problem", "Warning", "Caution"))]


def test_pycdlib_defects_are_still_there(tmp_path: Path) -> None:
    """What normalise_gpt exists for. If pycdlib fixes these, this test says the fixes can go."""
    img = _raw_pycdlib_hybrid(tmp_path / "raw.iso")
    problems = gpt.check_gpt(img)
    assert "primary partition array CRC is wrong" in problems
    assert "backup partition array CRC is wrong" in problems
    assert any(p.startswith("disk GUIDs differ") for p in problems)
    assert "primary and backup partition arrays differ" in problems
    assert any("partitions 1 and 2 overlap" in p for p in problems)
    assert (
        f"partition 2 (the EFI image) is typed {gpt.BASIC_DATA_PARTITION}, not EFI System "
        f"{gpt.EFI_SYSTEM_PARTITION}" in problems
    )
    assert any("CRC" in p for p in _sgdisk_problems(img))


def test_normalise_makes_a_gpt_sgdisk_accepts(tmp_path: Path) -> None:
    img = _raw_pycdlib_hybrid(tmp_path / "fixed.iso")
    before = img.read_bytes()
    gpt.normalise_gpt(img, "seed-1")
    after = img.read_bytes()
    assert gpt.check_gpt(img) == []
    # Only the MBR's own isohybrid overlap is left (by design, see gpt.py); nothing about the GPT.
    assert _sgdisk_problems(img) == ["Problem: MBR partitions 1 and 2 overlap!"]

    primary = gpt._read_header(after, 1)
    assert primary.disk_guid == gpt.derive_guid("seed-1", "disk")
    entries = gpt.read_entries(after, primary)
    assert [e.part_guid for e in entries] == [gpt.derive_guid("seed-1", f"partition {i}") for i in (1, 2)]
    iso_part, esp = entries
    assert iso_part.first_lba >= gpt.ISO_PARTITION_START_LBA
    # The EFI partition keeps its place and name, and is typed EFI System (as archiso's): it is what
    # firmware boots, and some firmware boots only an ESP-typed partition from USB.
    old_esp = gpt.read_entries(before, gpt._read_header(before, 1))[1]
    assert old_esp.type_guid == gpt.BASIC_DATA_PARTITION  # pycdlib's
    assert (esp.type_guid, esp.first_lba, esp.last_lba, esp.name) == (
        gpt.EFI_SYSTEM_PARTITION,
        old_esp.first_lba,
        old_esp.last_lba,
        old_esp.name,
    )
    assert iso_part.type_guid == gpt.BASIC_DATA_PARTITION
    backup = gpt._read_header(after, primary.backup_lba)
    assert [e.type_guid for e in gpt.read_entries(after, backup)] == [e.type_guid for e in entries]
    # Nothing outside the two GPT areas changed.
    area = primary.backup_lba - 32
    assert before[:512] == after[:512]
    assert before[34 * 512 : area * 512] == after[34 * 512 : area * 512]


def test_normalise_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = _raw_pycdlib_hybrid(tmp_path / "a.iso")
    b = _raw_pycdlib_hybrid(tmp_path / "b.iso")
    c = _raw_pycdlib_hybrid(tmp_path / "c.iso")
    assert a.read_bytes()[512:1024] != b.read_bytes()[512:1024]  # pycdlib's random GUIDs
    for p in (a, b):
        gpt.normalise_gpt(p, "same")
    gpt.normalise_gpt(c, "other")

    def areas(p: Path) -> bytes:
        data = p.read_bytes()
        return data[512 : 34 * 512] + data[-33 * 512 :]

    assert areas(a) == areas(b)
    assert areas(a) != areas(c)


def test_check_detects_a_corrupted_header(tmp_path: Path) -> None:
    img = _raw_pycdlib_hybrid(tmp_path / "x.iso")
    gpt.normalise_gpt(img, "s")
    with img.open("r+b") as f:
        f.seek(512 + 40)  # first usable LBA: inside the header CRC's range
        f.write(struct.pack("<Q", 35))
    assert "primary header CRC is wrong" in gpt.check_gpt(img)


def test_no_gpt_is_a_clear_error(tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(bytes(64 * 1024))
    with pytest.raises(gpt.GptError, match="no GPT header at LBA 1"):
        gpt.normalise_gpt(img, "s")


def test_derive_guid() -> None:
    assert gpt.derive_guid("a", "disk") == gpt.derive_guid("a", "disk")
    assert gpt.derive_guid("a", "disk") != gpt.derive_guid("b", "disk")
    assert gpt.derive_guid("a", "disk") != gpt.derive_guid("a", "partition 1")


def test_pycdlib_opens_the_esp_typed_image_only_through_the_helper(tmp_path: Path) -> None:
    img = _raw_pycdlib_hybrid(tmp_path / "esp.iso")
    gpt.normalise_gpt(img, "s")
    pc = pycdlib.PyCdlib()
    with pytest.raises(pycdlib.pycdlibexception.PyCdlibInvalidISO, match="Invalid Partition Type UUID"):
        pc.open(str(img))
    with gpt.pycdlib_reads_esp():
        pc = pycdlib.PyCdlib()
        pc.open(str(img))
    buf = io.BytesIO()
    pc.get_file_from_iso_fp(buf, rr_path="/data.bin")
    pc.close()
    assert buf.getvalue() == bytes(range(256)) * (300_000 // 256)
    # Restored on leaving: pycdlib's own check is back.
    with pytest.raises(pycdlib.pycdlibexception.PyCdlibInvalidISO):
        pycdlib.PyCdlib().open(str(img))


def test_check_names_an_esp_typed_otherwise(tmp_path: Path) -> None:
    img = _raw_pycdlib_hybrid(tmp_path / "x.iso")
    gpt.normalise_gpt(img, "s")
    data = bytearray(img.read_bytes())
    hdr = gpt._read_header(data, 1)
    data[hdr.entries_lba * 512 + 128 : hdr.entries_lba * 512 + 144] = gpt.BASIC_DATA_PARTITION.bytes_le
    gpt._seal(data, 1)
    img.write_bytes(bytes(data))
    problems = gpt.check_gpt(img)
    assert any(p.startswith("partition 2 (the EFI image) is typed ebd0a0a2") for p in problems), problems
