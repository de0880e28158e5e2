"""The BIOS "boot from first local disk" boot sector (image/stages/boot/localdisk.S, image/stages/boot/localdisk.py)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from image.core.run import run
from image.stages.boot import localdisk


def _assemble(source: Path, workdir: Path) -> bytes:
    obj, out = workdir / "localdisk.o", workdir / "localdisk.bin"
    run(["as", "--32", "-o", obj, source], capture=True)
    run(["ld", "-m", "elf_i386", "-Ttext=0x600", "--oformat", "binary", "-o", out, obj], capture=True)
    return out.read_bytes()


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None, reason="needs GNU as/ld (binutils)")
def test_the_bytes_are_the_source_assembled(tmp_path: Path) -> None:
    assert _assemble(localdisk.SOURCE, tmp_path) == localdisk.CODE
    # The comparison can fail: a one-instruction change in the source gives other bytes.
    changed = tmp_path / "changed.S"
    changed.write_text(localdisk.SOURCE.read_text().replace("movb\t$0x80, %dl", "movb\t$0x81, %dl"))
    assert _assemble(changed, tmp_path) != localdisk.CODE


def test_layout() -> None:
    code = localdisk.CODE
    assert len(code) == localdisk.SIZE == 512 and code[510:] == b"\x55\xaa"
    assert code[localdisk.OWN_ID_OFFSET : localdisk.OWN_ID_OFFSET + 4] == bytes(4)
    # `cmpl own_id, %eax` (66 3B 06 disp16) addresses own_id where it is linked (0x600 + offset).
    assert struct.pack("<H", 0x600 + localdisk.OWN_ID_OFFSET) in code[: localdisk.OWN_ID_OFFSET]
    assert b"no local hard disk to boot" in code


def test_boot_sector_carries_the_id() -> None:
    bs = localdisk.boot_sector(0x1234ABCD)
    assert struct.unpack_from("<I", bs, localdisk.OWN_ID_OFFSET)[0] == 0x1234ABCD
    assert bs[: localdisk.OWN_ID_OFFSET] == localdisk.CODE[: localdisk.OWN_ID_OFFSET]
    assert bs[localdisk.OWN_ID_OFFSET + 4 :] == localdisk.CODE[localdisk.OWN_ID_OFFSET + 4 :]


@pytest.mark.parametrize("bad", [0, -1, 2**32])
def test_unusable_ids_are_refused(bad: int) -> None:
    with pytest.raises(localdisk.LocalDiskError, match="non-zero 32-bit"):
        localdisk.boot_sector(bad)
