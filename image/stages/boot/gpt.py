"""Post-write fixes to the GPT that pycdlib 1.22's `add_isohybrid(efi=True)` writes.

Measured defects (see pycdlib/isohybrid.py, GPT.record and GPTHeader.new):
- the partition-array CRC in both headers covers only the used entries, while the UEFI spec (and
  `sgdisk -v`) computes it over all NumberOfPartitionEntries × SizeOfPartitionEntry bytes;
- every header and every entry draws its own `uuid4()`, so the backup header names another disk
  GUID than the primary, the backup entries other partition GUIDs than the primary ones, and no two
  builds agree;
- partition 1 ("ISOHybrid ISO", the whole image) starts at LBA 0, on top of the MBR and the GPT
  itself, and contains partition 2 (the EFI image). GPT readers reject both. Partition 1 is shrunk
  to the larger free stretch beside the EFI partition, from LBA 64 at the earliest (the end of the
  ISO9660 system area). Nothing reads the ISO through that GPT entry: firmware that honours the GPT
  only wants the EFI partition, and Linux ignores a GPT behind a non-protective MBR (it uses the MBR
  partitions or the whole disk);
- partition 2 (the EFI image) is typed "basic data". It is retyped EFI System, as archiso's (xorriso's)
  images have it: some firmware boots only an ESP-typed GPT partition from a USB stick. pycdlib's own
  reader then refuses the image ("Invalid Partition Type UUID"): open it with `pycdlib_reads_esp`.

The MBR keeps the isohybrid layout on purpose (partition 1: whole image, type 0, active; partition 2:
type 0xEF over the EFI image). They overlap, which `sgdisk -v` reports, but UEFI firmware skips type-0
MBR entries (EDK2 PartitionValidMbr), BIOSes want the active entry, and Linux mounts the ISO9660
through partition 1.

`normalise_gpt` rewrites the GUIDs from a seed, types the EFI partition (same in both copies), recomputes both CRCs, and
`check_gpt` re-reads the result and fails loudly on anything a firmware could trip over.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from image.core.errors import ImageError

SECTOR = 512
# Where partition 1 starts once moved off the GPT structures: 32 KiB, the end of the ISO system area.
ISO_PARTITION_START_LBA = 64
GPT_SIGNATURE = b"EFI PART"
# Partition type GUIDs (UEFI spec, "GPT Partition Entry"; basic data is Microsoft's, pycdlib's choice).
EFI_SYSTEM_PARTITION = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BASIC_DATA_PARTITION = uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7")
ESP_INDEX = 2  # pycdlib's entry 2 is the EFI image (entry 1 the ISO9660 data)
_HEADER = struct.Struct("<8s4sII4xQQQQ16sQIII")  # the 92 bytes covered by the header CRC


class GptError(ImageError, RuntimeError):
    """The image holds no GPT pycdlib could have written, or the result is inconsistent."""


@dataclass(frozen=True)
class GptHeader:
    offset: int  # byte offset of the header in the image
    header_size: int
    header_crc: int
    current_lba: int
    backup_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: uuid.UUID
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int

    @property
    def entries_bytes(self) -> int:
        return self.num_entries * self.entry_size


@dataclass(frozen=True)
class GptEntry:
    index: int  # 1-based partition number
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str


def _read_header(data: bytes | bytearray, lba: int) -> GptHeader:
    off = lba * SECTOR
    raw = bytes(data[off : off + _HEADER.size])
    if len(raw) < _HEADER.size:
        raise GptError(f"no GPT header at LBA {lba}: the image ends at byte {len(data)}")
    sig, _rev, hsize, hcrc, cur, backup, first, last, guid, elba, n, esize, ecrc = _HEADER.unpack(raw)
    if sig != GPT_SIGNATURE:
        raise GptError(f"no GPT header at LBA {lba} (signature {sig!r})")
    if esize != 128 or not 1 <= n <= 1024:
        raise GptError(f"GPT header at LBA {lba}: unexpected entry layout {n} × {esize} bytes")
    return GptHeader(off, hsize, hcrc, cur, backup, first, last, uuid.UUID(bytes_le=guid), elba, n, esize, ecrc)


def _header_crc(data: bytes | bytearray, hdr: GptHeader) -> int:
    block = bytearray(data[hdr.offset : hdr.offset + hdr.header_size])
    block[16:20] = b"\0\0\0\0"
    return zlib.crc32(block)


def _entries(data: bytes | bytearray, hdr: GptHeader) -> bytes:
    off = hdr.entries_lba * SECTOR
    return bytes(data[off : off + hdr.entries_bytes])


def read_entries(data: bytes | bytearray, hdr: GptHeader) -> list[GptEntry]:
    """The used (non-zero type GUID) entries of the array `hdr` points at."""
    out = []
    raw = _entries(data, hdr)
    for i in range(hdr.num_entries):
        e = raw[i * hdr.entry_size : (i + 1) * hdr.entry_size]
        if e[:16] == b"\0" * 16:
            continue
        first, last, attrs = struct.unpack_from("<QQQ", e, 32)
        name = e[56:128].decode("utf-16-le").rstrip("\0")
        out.append(GptEntry(i + 1, uuid.UUID(bytes_le=e[:16]), uuid.UUID(bytes_le=e[16:32]), first, last, attrs, name))
    return out


def derive_guid(seed: str, what: str) -> uuid.UUID:
    """A stable GUID for `what` (e.g. "disk", "partition 2") of the image identified by `seed`."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"failback-livecd:{seed}:{what}")


def _write_guid(data: bytearray, off: int, guid: uuid.UUID) -> None:
    data[off : off + 16] = guid.bytes_le


def _seal(data: bytearray, hdr_lba: int) -> None:
    """Recompute the entries CRC (all entries) and the header CRC of the header at `hdr_lba`."""
    hdr = _read_header(data, hdr_lba)
    struct.pack_into("<I", data, hdr.offset + 88, zlib.crc32(_entries(data, hdr)))
    hdr = _read_header(data, hdr_lba)
    struct.pack_into("<I", data, hdr.offset + 16, _header_crc(data, hdr))


def _separate_iso_partition(buf: bytearray, hdr: GptHeader) -> None:
    """Shrink entry 1 (the whole ISO) so it neither covers the GPT nor contains entry 2 (EFI image)."""
    entries = {e.index: e for e in read_entries(buf, hdr)}
    if set(entries) != {1, 2}:
        raise GptError(f"expected the two GPT entries pycdlib writes, found {sorted(entries)}")
    iso, esp = entries[1], entries[2]
    start = max(ISO_PARTITION_START_LBA, hdr.first_usable_lba)
    end = min(iso.last_lba, hdr.last_usable_lba)
    before = (start, esp.first_lba - 1)
    after = (max(start, esp.last_lba + 1), end)
    first, last = max(before, after, key=lambda r: r[1] - r[0])
    if last < first:
        raise GptError(f"no room for the ISO partition beside the EFI partition ({esp.first_lba}-{esp.last_lba})")
    struct.pack_into("<QQ", buf, hdr.entries_lba * SECTOR + 32, first, last)


def _type_esp(buf: bytearray, hdr: GptHeader) -> None:
    """Type entry 2 (the EFI image) EFI System."""
    _write_guid(buf, hdr.entries_lba * SECTOR + (ESP_INDEX - 1) * hdr.entry_size, EFI_SYSTEM_PARTITION)


def normalise_gpt(path: Path, seed: str) -> None:
    """Pin the GUIDs of the primary and backup GPT of the image at `path` to values derived from `seed`,
    type the EFI partition EFI System and make both CRCs cover the whole partition array. Edits the
    file in place (only the GPT areas)."""
    size = path.stat().st_size
    if size % SECTOR:
        raise GptError(f"{path}: size {size} is not a multiple of {SECTOR}")
    with path.open("r+b") as f:
        head = bytearray(f.read(64 * SECTOR))
        primary = _read_header(head, 1)
        if primary.backup_lba * SECTOR + SECTOR != size:
            raise GptError(
                f"{path}: primary GPT puts the backup header at LBA {primary.backup_lba}, "
                f"but the image has {size // SECTOR} sectors"
            )
        backup_area_lba = primary.backup_lba - primary.entries_bytes // SECTOR
        f.seek(backup_area_lba * SECTOR)
        tail = bytearray(f.read(size - backup_area_lba * SECTOR))
        # Offsets in `tail` are relative to backup_area_lba: read the header through a shifted view.
        tail_view = bytearray(backup_area_lba * SECTOR) + tail
        backup = _read_header(tail_view, primary.backup_lba)
        if backup.entries_lba != backup_area_lba or backup.num_entries != primary.num_entries:
            raise GptError(
                f"{path}: backup GPT entries at LBA {backup.entries_lba} ({backup.num_entries}), "
                f"expected LBA {backup_area_lba} ({primary.num_entries})"
            )

        disk_guid = derive_guid(seed, "disk")
        for buf, hdr in ((head, primary), (tail_view, backup)):
            _write_guid(buf, hdr.offset + 56, disk_guid)
            for entry in read_entries(buf, hdr):
                off = hdr.entries_lba * SECTOR + (entry.index - 1) * hdr.entry_size
                _write_guid(buf, off + 16, derive_guid(seed, f"partition {entry.index}"))
            _separate_iso_partition(buf, hdr)
            _type_esp(buf, hdr)
        if _entries(head, primary) != _entries(tail_view, backup):
            raise GptError(f"{path}: primary and backup GPT partition entries differ beyond their GUIDs")
        _seal(head, 1)
        _seal(tail_view, primary.backup_lba)

        f.seek(0)
        f.write(head)
        f.seek(backup_area_lba * SECTOR)
        f.write(tail_view[backup_area_lba * SECTOR :])


def check_gpt(path: Path) -> list[str]:
    """Problems a strict reader would report in the GPT of `path` (empty list: none)."""
    size = path.stat().st_size
    problems: list[str] = []
    with path.open("rb") as f:
        head = f.read(64 * SECTOR)
        primary = _read_header(head, 1)
        last_lba = size // SECTOR - 1
        if primary.backup_lba != last_lba:
            problems.append(f"backup header LBA {primary.backup_lba} is not the last sector {last_lba}")
            return problems
        area = primary.backup_lba - primary.entries_bytes // SECTOR
        f.seek(area * SECTOR)
        tail_view = bytes(area * SECTOR) + f.read()
    backup = _read_header(tail_view, primary.backup_lba)
    for name, buf, hdr in (("primary", head, primary), ("backup", tail_view, backup)):
        if _header_crc(buf, hdr) != hdr.header_crc:
            problems.append(f"{name} header CRC is wrong")
        if zlib.crc32(_entries(buf, hdr)) != hdr.entries_crc:
            problems.append(f"{name} partition array CRC is wrong")
    if primary.disk_guid != backup.disk_guid:
        problems.append(f"disk GUIDs differ: primary {primary.disk_guid}, backup {backup.disk_guid}")
    if _entries(head, primary) != _entries(tail_view, backup):
        problems.append("primary and backup partition arrays differ")
    if backup.backup_lba != 1 or backup.current_lba != primary.backup_lba:
        problems.append("backup header does not point back at the primary")
    entries = read_entries(head, primary)
    for e in entries:
        if not primary.first_usable_lba <= e.first_lba <= e.last_lba <= primary.last_usable_lba:
            problems.append(
                f"partition {e.index} ({e.first_lba}-{e.last_lba}) lies outside the usable LBAs "
                f"{primary.first_usable_lba}-{primary.last_usable_lba}"
            )
    for a in entries:
        for b in entries:
            if a.index < b.index and a.first_lba <= b.last_lba and b.first_lba <= a.last_lba:
                problems.append(f"partitions {a.index} and {b.index} overlap")
    esp = next((e for e in entries if e.index == ESP_INDEX), None)
    if esp is None or esp.type_guid != EFI_SYSTEM_PARTITION:
        found = "missing" if esp is None else f"typed {esp.type_guid}"
        problems.append(f"partition {ESP_INDEX} (the EFI image) is {found}, not EFI System {EFI_SYSTEM_PARTITION}")
    return problems


@contextlib.contextmanager
def pycdlib_reads_esp() -> Iterator[None]:
    """While active, pycdlib 1.22 opens images whose EFI partition is typed EFI System.

    Its GPT reader accepts only the two types it writes itself (basic data, HFS) and raises "Invalid
    Partition Type UUID" on anything else. Reading only: an EFI System entry is parsed as if it were
    basic data (pycdlib keeps the type but uses it for nothing but writing it back).
    """
    from pycdlib import isohybrid

    cls = isohybrid.GPTPartHeader
    original = cls.parse
    esp = EFI_SYSTEM_PARTITION.bytes_le

    def parse(self: isohybrid.GPTPartHeader, instr: bytes) -> int:
        if bytes(instr[:16]) == esp:
            instr = cls.BASIC_PARTITION + bytes(instr[16:])
        return original(self, instr)

    cls.parse = parse  # type: ignore[method-assign]  # patched for this build only, restored below
    try:
        yield
    finally:
        cls.parse = original  # type: ignore[method-assign]
