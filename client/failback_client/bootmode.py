"""How a disk boots, from its first blocks: GPT with an EFI System partition = UEFI, MBR with an active
partition = BIOS. Used before replication (the recovery volumes' first blocks against this machine's boot
mode: a Windows server must be failed back in the mode it was made for) and by conversion."""

from __future__ import annotations

import struct
import uuid

SECTOR = 512
HEAD_BYTES = 1024 * 1024  # enough for the MBR, the GPT header and 128 partition entries at 512 or 4096 B
ESP_GUID = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
MBR_ESP, MBR_PROTECTIVE = 0xEF, 0xEE


def _gpt_has_esp(head: bytes, sector: int) -> bool | None:
    """None when there is no GPT header at LBA 1 for this sector size."""
    hdr = head[sector:sector + 92]
    if len(hdr) < 92 or hdr[:8] != b"EFI PART":
        return None
    entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
    if size < 128 or count > 4096:
        return None
    for i in range(count):
        off = entries_lba * sector + i * size
        entry = head[off:off + 16]
        if len(entry) < 16:
            break
        if uuid.UUID(bytes_le=entry) == ESP_GUID:
            return True
    return False


def layout_boot_mode(head: bytes) -> str:
    """"uefi", "bios", or "" (cannot tell: no table, a GPT without ESP, an MBR without active partition)."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return ""
    parts = [head[446 + 16 * i:446 + 16 * (i + 1)] for i in range(4)]
    if any(p[4] == MBR_PROTECTIVE for p in parts):
        for sector in (SECTOR, 4096):
            has = _gpt_has_esp(head, sector)
            if has is not None:
                return "uefi" if has else ""
        return ""
    if any(p[4] == MBR_ESP for p in parts):
        return "uefi"
    return "bios" if any(p[0] == 0x80 and p[4] for p in parts) else ""


def disk_boot_mode(path: str) -> str:
    """layout_boot_mode of the disk or image at `path` ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return layout_boot_mode(f.read(HEAD_BYTES))
    except OSError:
        return ""
