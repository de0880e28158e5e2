"""Editing and reading built ISOs for the boots: a disk copy that firmware can only boot through its
MBR/GPT (a USB stick, not a CD), and one file taken out of the ISO (its kernel, its initrd).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from image.core.errors import ImageError

# Where the El Torito boot record's identifier sits: volume descriptor 17, after type, "CD001", version.
ELTORITO_OFFSET = 17 * 2048 + 7
ELTORITO_ID = b"EL TORITO"


class MediaError(ImageError, ValueError):
    """The ISO is not what the edit expects (no El Torito record, no such file)."""


def disable_eltorito(image: Path) -> None:
    """Make the El Torito boot record unrecognisable in place, so firmware can only boot `image` as
    a disk through its MBR/GPT (OVMF would otherwise boot El Torito from a hard disk too)."""
    with image.open("r+b") as f:
        f.seek(ELTORITO_OFFSET - 7)
        head = f.read(7 + len(ELTORITO_ID))
        if head[1:6] != b"CD001" or head[0] != 0:
            raise MediaError(f"{image}: sector 17 is not an El Torito boot record volume descriptor")
        if head[7:] != ELTORITO_ID:
            raise MediaError(f"{image}: no {ELTORITO_ID.decode()} identifier at byte {ELTORITO_OFFSET}")
        f.seek(ELTORITO_OFFSET)
        f.write(b"NO TORITO")


def disk_copy(iso: Path, dest: Path) -> Path:
    """A copy of `iso` without El Torito (reused while the ISO is unchanged)."""
    st = iso.stat()
    stamp = dest.with_name(dest.name + ".source")
    key = f"{iso.resolve()} {st.st_size} {st.st_mtime_ns}"
    if dest.is_file() and stamp.is_file() and stamp.read_text() == key:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(iso, tmp)
    disable_eltorito(tmp)
    tmp.replace(dest)
    stamp.write_text(key)
    return dest


def extract_from_iso(iso: Path, name_regex: str, dest: Path) -> Path:
    """Copy the first file of the ISO (Rock Ridge names) whose path matches `name_regex` to `dest`."""
    from image.stages.boot.iso import open_iso  # only the callers that read ISOs need pycdlib

    rx = re.compile(name_regex)
    with open_iso(iso) as pc:
        for dirpath, _dirs, files in pc.walk(rr_path="/"):
            for f in sorted(files):
                path = f"{dirpath.rstrip('/')}/{f}"
                if rx.search(path):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    pc.get_file_from_iso(os.fspath(dest), rr_path=path)
                    return dest
    raise MediaError(f"{iso}: no file matching {name_regex!r}")
