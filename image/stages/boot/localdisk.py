"""The BIOS "boot from first local disk" boot sector isolinux runs (source and rule: localdisk.S).

isolinux's own `LOCALBOOT 0x80` boots BIOS drive 0x80, which from a USB stick is the stick itself.
localdisk.bs instead boots the first BIOS hard disk whose MBR does not carry this ISO's disk id, so
it skips the medium it was started from, CD or USB. The bytes below are localdisk.S assembled with
GNU as/ld (tests/test_localdisk.py re-assembles it and compares), so the build needs no assembler.
"""

from __future__ import annotations

import struct
from pathlib import Path

from image.core.errors import ImageError

SOURCE = Path(__file__).resolve().with_name("localdisk.S")
ISO_PATH = "/isolinux/localdisk.bs"
OWN_ID_OFFSET = 0x7C  # `own_id` in localdisk.S: where the ISO's MBR disk id goes
SIZE = 512

# as --32 localdisk.S; ld -m elf_i386 -Ttext=0x600 --oformat binary (own_id = 0)
CODE = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfbfcbe007cbf0006b90001f3a5ea1e060000b280a07504048038c2732d52b80102b90100"
    "30f6bb007ccd135a7218813efe7d55aa751066a1b87d663b067c067405ea007c0000fec2ebcabe8006ac84c07419b40e"
    "bb0700cd1088c4bafd03eca82074fb88e0baf803eeebe2cd18f4ebfb000000006661696c6261636b3a206e6f206c6f63"
    "616c2068617264206469736b20746f20626f6f7420286f74686572207468616e2074686973206d656469756d290d0a00"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000055aa"
)


class LocalDiskError(ImageError, ValueError):
    """The boot sector cannot be made (bad disk id)."""


def boot_sector(own_mbr_id: int) -> bytes:
    """localdisk.bs for an ISO whose MBR disk id is `own_mbr_id` (the disk it must skip)."""
    if not 0 < own_mbr_id < 2**32:
        raise LocalDiskError(
            f"MBR disk id {own_mbr_id:#x} must be a non-zero 32-bit number (a zero id would match disks that have none)"
        )
    code = bytearray(CODE)
    struct.pack_into("<I", code, OWN_ID_OFFSET, own_mbr_id)
    return bytes(code)
