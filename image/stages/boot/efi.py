"""The UEFI side of the ISO: Debian's signed shim + GRUB in a small FAT image (the El Torito EFI entry
and, on a USB stick, the EFI system partition).

Secure Boot chain: firmware (Microsoft UEFI CA) -> shim (signed by Microsoft, embeds Debian's CA) ->
GRUB for CDs (`gcdx64.efi`, signed by Debian) -> Debian's signed kernel. Only signed binaries taken
unchanged from Debian's packages can do that, so nothing here is built with grub-mkimage.

The packages are fetched and unpacked into the build cache by the bootloader stage
(image/stages/bootloader.py); this module only puts those local files into the image.
The FAT image is made without mounting (mkfs.vfat --invariant + mtools with SOURCE_DATE_EPOCH), so
the same inputs give the same bytes.

How GRUB finds its menu: Debian's gcdx64.efi has the prefix `/boot/grub` on the device it was loaded
from, and a built-in early config that, when that prefix is missing, runs
`search --file --set=root /.disk/info` and sources `($root)/boot/grub/grub.cfg`. Booted as a CD, the
device is the ISO9660 filesystem itself and the menu (written by iso.py) is found directly. Booted
from the EFI partition of a USB stick, the device is this FAT image: probing the missing /boot/grub
there prints "error: file `/boot/' not found" before the search succeeds, so the image carries a
small /boot/grub/grub.cfg (BRIDGE_CFG) that does the same search and sources the ISO's menu. The FAT
image must not hold a `.disk/info` (the search would stop at the FAT image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from image.core.errors import ImageError
from image.core.run import run
from image.stages.bootloader import EFI_PACKAGES, BootLoaders

log = logging.getLogger(__name__)

# Read by gcdx64.efi when started from the EFI partition of a USB stick (see above).
BRIDGE_CFG_PATH = "boot/grub/grub.cfg"
BRIDGE_CFG = """\
# Booted from the EFI partition: the menu is on the ISO9660 filesystem of the same disk.
search --no-floppy --set=root --file /.disk/info
set prefix=($root)/boot/grub
source $prefix/grub.cfg
"""

FAT_LABEL = "EFIBOOT"
# Fixed FAT volume id: mkfs.vfat would otherwise derive one from the clock.
FAT_VOLUME_ID = "2b8d0f1e"
# El Torito counts the image in 512-byte sectors with a 16-bit field: the image must stay below 32 MiB.
MAX_IMAGE_BYTES = 65535 * 512
# Room left for FAT tables, directories and cluster rounding on top of the files' sizes.
_SLACK_BYTES = 512 * 1024


class EfiError(ImageError, RuntimeError):
    """The FAT image could not be made."""


@dataclass(frozen=True)
class EfiImage:
    path: Path
    versions: dict[str, str]  # Debian package -> version whose files are in the image
    files: dict[str, Path | bytes]  # path inside the FAT image -> host file it was copied from, or content


def _size(src: Path | bytes) -> int:
    return len(src) if isinstance(src, bytes) else src.stat().st_size


def _image_size_kib(files: dict[str, Path | bytes]) -> int:
    total = sum(_size(p) for p in files.values()) + _SLACK_BYTES
    mib = 1024 * 1024
    return -(-total // mib) * 1024  # whole MiB, in KiB for mkfs.vfat


def make_fat_image(files: dict[str, Path | bytes], output: Path, source_date_epoch: int) -> Path:
    """Write a FAT image at `output` holding `files` ({path inside the image: host file or content})."""
    size_kib = _image_size_kib(files)
    if size_kib * 1024 > MAX_IMAGE_BYTES:
        raise EfiError(f"EFI image would be {size_kib} KiB; El Torito allows at most {MAX_IMAGE_BYTES // 1024} KiB")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        output.unlink()
    env = {
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "MTOOLS_SKIP_CHECK": "1",
        "TZ": "UTC",
        # Keep a user's ~/.mtoolsrc (drive letters, name mangling) out of the build.
        "MTOOLSRC": os.devnull,
    }
    run(
        ["mkfs.vfat", "--invariant", "-i", FAT_VOLUME_ID, "-n", FAT_LABEL, "-C", output, str(size_kib)],
        env=env,
        capture=True,
    )
    made: set[str] = set()
    for fat_path in sorted(files):
        parts = fat_path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                run(["mmd", "-i", output, f"::/{d}"], env=env)
                made.add(d)
        src = files[fat_path]
        if isinstance(src, bytes):
            # Written from stdin: mtools dates it at SOURCE_DATE_EPOCH.
            run(["mcopy", "-i", output, "-", f"::/{fat_path}"], env=env, input=src)
        else:
            # -m keeps the source's modification time (the package's), not the clock's.
            run(["mcopy", "-m", "-i", output, src, f"::/{fat_path}"], env=env)
    return output


def _tool_versions() -> str:
    out = run(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "dosfstools", "mtools"], capture=True, check=False)
    return out.stdout


def build_efi_image(loaders: BootLoaders, output: Path, source_date_epoch: int) -> EfiImage:
    """Put the bootloader stage's signed shim/GRUB/MokManager into a FAT image at `output`."""
    versions = loaders.versions
    files: dict[str, Path | bytes] = {**loaders.files, BRIDGE_CFG_PATH: BRIDGE_CFG.encode()}
    # The image is a pure function of these: reuse it when they have not changed.
    key = hashlib.sha256(
        json.dumps(
            {
                "versions": versions,
                "epoch": source_date_epoch,
                "bridge": BRIDGE_CFG,
                "label": FAT_LABEL,
                "volume_id": FAT_VOLUME_ID,
                "layout": {k: str(v) for k, v in EFI_PACKAGES.items()},
                "tools": _tool_versions(),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    stamp = output.with_name(output.name + ".key")
    if output.is_file() and stamp.is_file() and stamp.read_text() == key:
        log.info("EFI image %s is up to date", output)
    else:
        stamp.unlink(missing_ok=True)
        make_fat_image(files, output, source_date_epoch)
        stamp.write_text(key)
    log.info(
        "EFI image %s: %d KiB, %s",
        output,
        output.stat().st_size // 1024,
        ", ".join(f"{p} {v}" for p, v in versions.items()),
    )
    return EfiImage(path=output, versions=versions, files=files)
