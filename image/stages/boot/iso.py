"""The ISO stage: kernel, initrd, squashfs layers and boot loaders -> one hybrid BIOS/UEFI image.

Written with pycdlib only: ISO9660 (level 3) + Rock Ridge 1.09 + Joliet, an El Torito catalogue with
a BIOS entry (isolinux, no emulation, 4 sectors, boot info table) and a UEFI entry (platform 0xEF,
the FAT image from efi.py, holding the bootloader stage's signed binaries), and isohybrid MBR + GPT
(`add_isohybrid(efi=True)`) so the same file written to a USB stick boots BIOS (MBR code -> isolinux)
and UEFI (EFI system partition = the FAT image).

Layout on the medium (what the initrd's boot script and the loaders look for):
    /live/vmlinuz, /live/initrd.img, /live/<layer>.squashfs..., extra files (the pipeline's:
               filesystem.module, filesystem.packages, bootloader.packages)
    /isolinux/{isolinux.bin, boot.cat, ldlinux.c32, menu.c32, libutil.c32, libcom32.c32, isolinux.cfg,
               localdisk.bs (BIOS "boot from first local disk", knows this image's MBR id)}
    /boot/grub/{grub.cfg, efi.img}
    /.disk/info (GRUB's search target), /.disk/boot-packages (loader package versions)

Reproducibility: pycdlib reads the clock (time.time(), local time) for every date it writes, draws
the GPT GUIDs with uuid4() and the MBR id at random. Dates are pinned to SOURCE_DATE_EPOCH in UTC
(see _pinned_clock: pycdlib has no API for it), the MBR id is passed in, the GPT GUIDs are rewritten
after writing (gpt.py). pycdlib's 432-byte MBR boot code is replaced by syslinux's isohdpfx.bin,
the code that matches the isolinux.bin we ship.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from time import struct_time
from typing import TYPE_CHECKING, Any

import pycdlib

from image.core.errors import ImageError
from image.core.run import run
from image.stages.boot import bootmenu, efi, gpt, localdisk
from image.stages.bootloader import BootLoaders

if TYPE_CHECKING:
    from image.stages.config import ImageConfig

log = logging.getLogger(__name__)

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
ISOHDPFX_BIN = Path("/usr/lib/ISOLINUX/isohdpfx.bin")
SYSLINUX_MODULES = Path("/usr/lib/syslinux/modules/bios")
# ldlinux.c32 is isolinux's second stage; menu.c32 (text menu: works on screen and serial) needs
# libutil.c32 and libcom32.c32.
ISOLINUX_MODULES = ("ldlinux.c32", "menu.c32", "libutil.c32", "libcom32.c32")
HOST_BOOT_PACKAGES = ("isolinux", "syslinux-common")
# The ISO stage's code: this sub-package (boot sector source included) and the boot menus' templates; the
# image modules they import (templating, config, core) join by themselves.
CODE = (
    "image/stages/boot",
    "image/stages/templates/grub.cfg.j2",
    "image/stages/templates/isolinux.cfg.j2",
)

EFI_IMAGE_ISO_PATH = "/boot/grub/efi.img"
MBR_CODE_BYTES = 432  # boot code area of the MBR; bytes 432.. hold the isolinux LBA, MBR id, partitions
_FILE_MODE = 0o100444
_DIR_MODE = 0o040555
_ISO_PATH_RE = re.compile(r"^(/[A-Za-z0-9._+-]+)+$")


class IsoError(ImageError, ValueError):
    """Bad input for the ISO stage; the message names the input and how to fix it."""


@dataclass(frozen=True)
class IsoInputs:
    kernel: Path
    initrd: Path
    layers: tuple[Path, ...]  # squashfs files in stacking order (base first) -> /live/<basename>
    extra_files: Mapping[str, Path]  # ISO path -> host file, e.g. "/live/filesystem.module"
    source_date_epoch: int


@dataclass(frozen=True)
class IsoResult:
    path: Path
    size: int
    efi_image_size: int
    boot_packages: dict[str, str]  # package -> version of the boot loaders in the image
    write_seconds: float  # pycdlib write + post-write fixes
    files: dict[str, int] = field(default_factory=dict)  # ISO path -> size


# --- ISO9660 names ---------------------------------------------------------------------------


def iso9660_dir_name(name: str) -> str:
    """ISO9660 directory identifier for a Rock Ridge/Joliet directory name (d-characters only)."""
    return re.sub(r"[^A-Z0-9_]", "_", name.upper())[:31]


def iso9660_file_name(name: str) -> str:
    """ISO9660 level-3 file identifier (NAME.EXT;1, 30 characters at most) for a file name."""
    stem, dot, ext = name.upper().rpartition(".")
    if not dot or not stem:  # no extension, or a leading dot only (".foo")
        stem, ext = name.upper(), ""
    stem = re.sub(r"[^A-Z0-9_]", "_", stem)
    ext = re.sub(r"[^A-Z0-9_]", "_", ext)[:8]
    stem = stem[: 30 - len(ext)] or "_"
    return f"{stem}.{ext};1"


def _iso_path(path: PurePosixPath, is_dir: bool) -> str:
    parts = [iso9660_dir_name(p) for p in path.parts[1:-1]]
    parts.append(iso9660_dir_name(path.name) if is_dir else iso9660_file_name(path.name))
    return "/" + "/".join(parts)


# --- reproducible dates ------------------------------------------------------------------------


class _FixedTime:
    """Stands in for the `time` module inside pycdlib: the clock is SOURCE_DATE_EPOCH, local time is UTC."""

    def __init__(self, epoch: int) -> None:
        self._epoch = float(epoch)

    def time(self) -> float:
        return self._epoch

    def localtime(self, secs: float | None = None) -> struct_time:  # (`time` is the method here)
        return time.gmtime(self._epoch if secs is None else secs)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def _pinned_clock(epoch: int) -> Iterator[None]:
    """Make pycdlib date everything at `epoch` in UTC.

    pycdlib 1.22 has no parameter for the dates it writes (volume descriptors, directory records,
    Rock Ridge TF entries): each calls time.time() and time.localtime() of its module's `time`.
    Only pycdlib's module-level `time` names are swapped, and only for the duration of the build.
    """
    import pycdlib.dates
    import pycdlib.headervd
    import pycdlib.inplaceeditor
    import pycdlib.pycdlib
    import pycdlib.udf
    import pycdlib.utils

    modules = [pycdlib.dates, pycdlib.headervd, pycdlib.inplaceeditor, pycdlib.pycdlib, pycdlib.udf, pycdlib.utils]
    saved = [(m, m.time) for m in modules]
    fixed = _FixedTime(epoch)
    try:
        for m in modules:
            m.time = fixed  # type: ignore[attr-defined]  # mypy sees a module object, not pycdlib's `time` name
        yield
    finally:
        for m, orig in saved:
            m.time = orig  # type: ignore[attr-defined]  # as above


def derive_seed(volume_label: str, epoch: int) -> str:
    return f"{volume_label}:{epoch}"


def derive_mbr_id(seed: str) -> int:
    return int.from_bytes(hashlib.sha256(f"mbr-id:{seed}".encode()).digest()[:4], "little")


# --- the tree --------------------------------------------------------------------------------


def _host_package_version(package: str) -> str:
    out = run(["dpkg-query", "-W", "-f=${Version}", package], capture=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise IsoError(f"the build host lacks the Debian package {package}: run ./install-deps.sh")
    return out.stdout.strip()


def _disk_info(cfg: ImageConfig, epoch: int) -> str:
    stamp = time.strftime("%Y%m%d-%H:%M", time.gmtime(epoch))
    return f"AWS DRS Failback Client LiveCD - Debian {cfg.debian.suite} {cfg.debian.architecture} {stamp}\n"


def _need_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise IsoError(f"{what}: {path} does not exist or is not a regular file")


def _input_files(inputs: IsoInputs) -> dict[str, Path]:
    """The pipeline's files by ISO path (Rock Ridge spelling), checked before any work is done."""
    _need_file(inputs.kernel, "kernel")
    _need_file(inputs.initrd, "initrd")
    if not inputs.layers:
        raise IsoError("layers: at least one squashfs layer is needed (the initrd has nothing to mount otherwise)")
    tree: dict[str, Path] = {
        bootmenu.KERNEL_PATH: inputs.kernel,
        bootmenu.INITRD_PATH: inputs.initrd,
    }
    for i, layer in enumerate(inputs.layers):
        _need_file(layer, f"layers[{i}]")
        if not layer.name.endswith(".squashfs"):
            raise IsoError(f"layers[{i}]: {layer.name} must end in .squashfs (the initrd mounts those from /live)")
        dest = f"/live/{layer.name}"
        if dest in tree:
            raise IsoError(f"layers[{i}]: two layers are named {layer.name}; give each layer its own file name")
        tree[dest] = layer
    for iso_path, host in sorted(inputs.extra_files.items()):
        if not _ISO_PATH_RE.match(iso_path) or any(part in {".", ".."} for part in iso_path.split("/")):
            raise IsoError(
                f"extra_files[{iso_path!r}]: must be an absolute path of letters, digits, '.', '_', '+' and '-'"
            )
        if iso_path in tree or iso_path in _RESERVED or iso_path.startswith(_RESERVED_DIRS):
            raise IsoError(f"extra_files[{iso_path!r}]: the ISO stage writes that path itself; choose another")
        _need_file(Path(host), f"extra_files[{iso_path!r}]")
        tree[iso_path] = Path(host)
    return tree


# Paths the ISO stage writes itself (besides the kernel, initrd and layers).
_RESERVED = frozenset({"/boot/grub/grub.cfg", EFI_IMAGE_ISO_PATH, "/.disk/info", "/.disk/boot-packages"})
_RESERVED_DIRS = ("/isolinux/", "/.disk/")


def _collect_tree(
    cfg: ImageConfig, inputs: IsoInputs, efi_img: Path, boot_packages: dict[str, str], mbr_id: int
) -> dict[str, Path | bytes]:
    """ISO path (Rock Ridge spelling) -> host file or content."""
    tree: dict[str, Path | bytes] = dict(_input_files(inputs))
    tree["/isolinux/isolinux.bin"] = ISOLINUX_BIN
    for mod in ISOLINUX_MODULES:
        tree[f"/isolinux/{mod}"] = SYSLINUX_MODULES / mod
    tree["/isolinux/isolinux.cfg"] = bootmenu.render_isolinux(cfg).encode()
    tree[localdisk.ISO_PATH] = localdisk.boot_sector(mbr_id)
    tree["/boot/grub/grub.cfg"] = bootmenu.render_grub(cfg).encode()
    tree[EFI_IMAGE_ISO_PATH] = efi_img
    tree["/.disk/info"] = _disk_info(cfg, inputs.source_date_epoch).encode()
    tree["/.disk/boot-packages"] = "".join(f"{p} {v}\n" for p, v in sorted(boot_packages.items())).encode()
    for p in (ISOLINUX_BIN, ISOHDPFX_BIN, *(SYSLINUX_MODULES / m for m in ISOLINUX_MODULES)):
        if not p.is_file():
            raise IsoError(
                f"{p} is missing on the build host (packages isolinux, syslinux-common): run ./install-deps.sh"
            )
    return tree


def _add_tree(iso: pycdlib.PyCdlib, tree: Mapping[str, Path | bytes], opened: contextlib.ExitStack) -> None:
    dirs: set[PurePosixPath] = set()
    for name in tree:
        dirs.update(PurePosixPath(name).parents)
    dirs.discard(PurePosixPath("/"))
    files = {PurePosixPath(p) for p in tree}
    if clash := sorted(str(d) for d in dirs & files):
        raise IsoError(f"{clash[0]} is both a file and a directory in the ISO tree")

    seen: dict[str, str] = {}  # ISO9660 path -> Rock Ridge path, to refuse two names mapping to one

    def claim(iso_path: str, rr_path: str) -> None:
        if iso_path in seen:
            raise IsoError(f"{rr_path} and {seen[iso_path]} get the same ISO9660 name {iso_path}; rename one of them")
        seen[iso_path] = rr_path

    for d in sorted(dirs, key=lambda d: (len(d.parts), str(d))):
        iso_path = _iso_path(d, is_dir=True)
        claim(iso_path, str(d))
        iso.add_directory(iso_path, rr_name=d.name, joliet_path=str(d), file_mode=_DIR_MODE)
    for p in sorted(files, key=str):
        iso_path = _iso_path(p, is_dir=False)
        claim(iso_path, str(p))
        src = tree[str(p)]
        if isinstance(src, bytes):
            iso.add_fp(io.BytesIO(src), len(src), iso_path, rr_name=p.name, joliet_path=str(p), file_mode=_FILE_MODE)
        else:
            fp = opened.enter_context(src.open("rb"))
            iso.add_fp(fp, src.stat().st_size, iso_path, rr_name=p.name, joliet_path=str(p), file_mode=_FILE_MODE)


# pycdlib pads the image to whole 1 MiB "cylinders" (64 heads x 32 sectors) and writes the backup
# GPT (32 sectors of entries + 1 header) over the last 33 sectors, whether or not they are padding.
_CYLINDER = 64 * 32 * 512
_BACKUP_GPT_BYTES = (128 * 128) + 512
GPT_ROOM_PATH = "/.disk/gpt-room"


def gpt_room_filler(iso_bytes: int) -> int:
    """Bytes of filler needed so the padding after `iso_bytes` of ISO9660 can hold the backup GPT."""
    padding = -iso_bytes % _CYLINDER
    return 0 if padding >= _BACKUP_GPT_BYTES else padding + _BACKUP_GPT_BYTES


def _leave_room_for_backup_gpt(iso: pycdlib.PyCdlib) -> int:
    """Keep pycdlib's backup GPT from overwriting the end of the last file.

    Without this, an image whose data ends less than 33 sectors before a 1 MiB boundary loses its
    last bytes to the backup GPT. A zero-filled file pushes the data past the boundary.
    """
    needed = gpt_room_filler(iso.pvd.space_size * iso.logical_block_size)
    if needed:
        filler = b"\0" * needed
        iso.add_fp(
            io.BytesIO(filler),
            len(filler),
            _iso_path(PurePosixPath(GPT_ROOM_PATH), is_dir=False),
            rr_name=PurePosixPath(GPT_ROOM_PATH).name,
            joliet_path=GPT_ROOM_PATH,
            file_mode=_FILE_MODE,
        )
        if gpt_room_filler(iso.pvd.space_size * iso.logical_block_size):
            raise IsoError("could not leave room for the backup GPT at the end of the image")
    return needed


def _install_mbr_code(path: Path) -> None:
    """Replace pycdlib's 432 bytes of MBR boot code with syslinux's isohdpfx.bin (same header layout:
    bytes 0-31 are the isohybrid signature pycdlib itself checks on reading; 432-439 the isolinux LBA)."""
    code = ISOHDPFX_BIN.read_bytes()[:MBR_CODE_BYTES]
    if len(code) != MBR_CODE_BYTES:
        raise IsoError(f"{ISOHDPFX_BIN} is {len(code)} bytes, expected {MBR_CODE_BYTES}")
    with path.open("r+b") as f:
        current = f.read(MBR_CODE_BYTES)
        if current[:32] != code[:32]:
            raise IsoError(f"{path}: MBR header {current[:4].hex()} is not the isohybrid one pycdlib writes")
        f.seek(0)
        f.write(code)


@contextlib.contextmanager
def open_iso(path: Path) -> Iterator[pycdlib.PyCdlib]:
    """The ISO at `path` opened with pycdlib for reading; closed on leaving. pycdlib alone refuses
    the ISOs made here (their EFI partition is typed EFI System, see gpt.py)."""
    pc = pycdlib.PyCdlib()
    with gpt.pycdlib_reads_esp():
        pc.open(os.fspath(path))
    try:
        yield pc
    finally:
        pc.close()


def assemble_iso(
    cfg: ImageConfig, inputs: IsoInputs, output: Path, cache_dir: Path, boot_loaders: BootLoaders
) -> IsoResult:
    """Write the hybrid ISO at `output` from local files only. The same cfg, inputs and loader packages
    give the same bytes.

    `boot_loaders`: the bootloader stage's signed EFI binaries; cache_dir keeps the FAT image made of them.
    """
    epoch = int(inputs.source_date_epoch)
    label = cfg.iso.volume_label
    # Bad input (files, boot menu) fails here, before anything is fetched or written.
    _input_files(inputs)
    bootmenu.render_isolinux(cfg)
    efi_img = efi.build_efi_image(boot_loaders, cache_dir / "iso" / "efi.img", epoch)
    boot_packages = {p: _host_package_version(p) for p in HOST_BOOT_PACKAGES} | efi_img.versions
    seed = derive_seed(label, epoch)
    tree = _collect_tree(cfg, inputs, efi_img.path, boot_packages, derive_mbr_id(seed))

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    started = time.monotonic()
    try:
        filler = _write_image(cfg, tree, tmp, epoch, seed)
        _install_mbr_code(tmp)
        gpt.normalise_gpt(tmp, seed)
        if problems := gpt.check_gpt(tmp):
            raise IsoError(f"{tmp}: GPT still inconsistent after the fixes: {'; '.join(problems)}")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when something failed
    elapsed = time.monotonic() - started
    size = output.stat().st_size
    files = {p: (len(s) if isinstance(s, bytes) else s.stat().st_size) for p, s in tree.items()}
    if filler:
        files[GPT_ROOM_PATH] = filler
    log.info(
        "ISO %s: %.1f MiB written in %.2f s (EFI image %d KiB)",
        output,
        size / 2**20,
        elapsed,
        efi_img.path.stat().st_size // 1024,
    )
    return IsoResult(
        path=output,
        size=size,
        efi_image_size=efi_img.path.stat().st_size,
        boot_packages=boot_packages,
        write_seconds=elapsed,
        files=files,
    )


def _write_image(cfg: ImageConfig, tree: Mapping[str, Path | bytes], tmp: Path, epoch: int, seed: str) -> int:
    """pycdlib's part: the ISO9660/RR/Joliet tree, El Torito and isohybrid, written to `tmp`.
    Returns the size of the filler added to keep the backup GPT off the data (0: none)."""
    with _pinned_clock(epoch), contextlib.ExitStack() as opened:
        iso = pycdlib.PyCdlib()
        iso.new(
            interchange_level=3,
            sys_ident="LINUX",
            vol_ident=cfg.iso.volume_label,
            app_ident_str="AWS DRS FAILBACK CLIENT LIVECD",
            rock_ridge="1.09",
            joliet=3,
        )
        _add_tree(iso, tree, opened)
        iso.add_eltorito(
            _iso_path(PurePosixPath("/isolinux/isolinux.bin"), is_dir=False),
            bootcatfile=_iso_path(PurePosixPath("/isolinux/boot.cat"), is_dir=False),
            rr_bootcatname="boot.cat",
            joliet_bootcatfile="/isolinux/boot.cat",
            boot_load_size=4,
            boot_info_table=True,
        )
        # Second section: platform 0xEF, no emulation; the sector count is the whole FAT image.
        iso.add_eltorito(_iso_path(PurePosixPath(EFI_IMAGE_ISO_PATH), is_dir=False), efi=True, bootable=True)
        iso.add_isohybrid(efi=True, mbr_id=derive_mbr_id(seed))
        filler = _leave_room_for_backup_gpt(iso)
        with tmp.open("wb") as out:
            iso.write_fp(out)
        iso.close()
    return filler
