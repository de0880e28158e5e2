"""The UEFI side of the ISO: Debian's signed shim + GRUB in a small FAT image (the El Torito EFI entry
and, on a USB stick, the EFI system partition).

Secure Boot chain: firmware (Microsoft UEFI CA) -> shim (signed by Microsoft, embeds Debian's CA) ->
GRUB for CDs (`gcdx64.efi`, signed by Debian) -> Debian's signed kernel. Only signed binaries taken
unchanged from Debian's packages can do that, so nothing here is built with grub-mkimage.

The packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into the cache,
never installed on the build host (their maintainer scripts would touch the host's own boot set-up).
They come from the image definition's mirror (a snapshot pins them) through a private apt state in
the cache (AptSources), checked against the host's Debian archive keyring; without AptSources, from
the host's own apt sources.
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
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from image.core.errors import ImageError
from image.core.run import run

if TYPE_CHECKING:
    from image.stages.config import ImageConfig

log = logging.getLogger(__name__)

# package -> {path inside the package: path inside the FAT image}
EFI_PACKAGES: dict[str, dict[str, str]] = {
    "shim-signed": {"usr/lib/shim/shimx64.efi.signed": "EFI/BOOT/BOOTX64.EFI"},
    # shim loads `grubx64.efi` from its own directory; gcdx64 is Debian's GRUB build for CD/USB media.
    "grub-efi-amd64-signed": {"usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed": "EFI/BOOT/grubx64.efi"},
    # MokManager: shim starts it when a MOK enrolment or a verification failure needs the user.
    "shim-helpers-amd64-signed": {"usr/lib/shim/mmx64.efi.signed": "EFI/BOOT/mmx64.efi"},
}

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
    """The EFI boot files could not be fetched or the FAT image could not be made."""


@dataclass(frozen=True)
class EfiImage:
    path: Path
    versions: dict[str, str]  # Debian package -> version whose files are in the image
    files: dict[str, Path | bytes]  # path inside the FAT image -> host file it was copied from, or content


@dataclass(frozen=True)
class AptSources:
    """Where the boot loader packages come from: one-line apt sources (`deb URL SUITE COMPONENTS`)."""

    lines: tuple[str, ...]
    architecture: str = "amd64"
    # apt refreshes its package lists when they are older than this (a snapshot mirror never changes).
    max_list_age_seconds: int = 24 * 3600

    @classmethod
    def from_config(cls, cfg: ImageConfig) -> AptSources:
        from image.stages.config import apt_sources  # the same sources the rootfs is built from

        if cfg.debian.architecture != "amd64":
            raise EfiError(
                f"{cfg.path}: debian.architecture: {cfg.debian.architecture!r} is not supported by the "
                "ISO's UEFI boot (shimx64/grubx64 are amd64 only)"
            )
        return cls(tuple(apt_sources(cfg)), cfg.debian.architecture)

    @property
    def snapshot(self) -> bool:
        return any("snapshot.debian.org" in line for line in self.lines)

    def state_dir(self, cache_dir: Path) -> Path:
        digest = hashlib.sha256("\n".join((*self.lines, self.architecture)).encode()).hexdigest()[:16]
        return cache_dir / "efi" / "apt" / digest


def _apt_options(sources: AptSources | None, cache_dir: Path) -> list[str]:
    """apt-get/apt-cache options for a private apt state (lists, caches, an empty dpkg status) in the
    cache, reading only `sources`; none for the host's apt."""
    if sources is None:
        return []
    root = sources.state_dir(cache_dir)
    for d in ("lists/partial", "archives/partial", "sources.list.d", "preferences.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # Rewritten only when changed: apt rebuilds its package cache whenever these files are newer.
    listing = "".join(f"{line}\n" for line in sources.lines)
    if not (root / "sources.list").is_file() or (root / "sources.list").read_text() != listing:
        (root / "sources.list").write_text(listing)
    if not (root / "status").exists():
        (root / "status").touch()
    opts = {
        "Dir::Etc::SourceList": root / "sources.list",
        "Dir::Etc::SourceParts": root / "sources.list.d",
        "Dir::Etc::Preferences": root / "preferences",
        "Dir::Etc::PreferencesParts": root / "preferences.d",
        "Dir::State": root,
        "Dir::State::Lists": root / "lists",
        "Dir::State::status": root / "status",
        "Dir::Cache": root,
        "Dir::Cache::archives": root / "archives",
        "Dir::Cache::pkgcache": root / "pkgcache.bin",
        "Dir::Cache::srcpkgcache": root / "srcpkgcache.bin",
        "APT::Architecture": sources.architecture,
        "APT::Architectures": sources.architecture,
        "Acquire::Retries": 3,
        "Acquire::Languages": "none",
        # Unprivileged _apt cannot write into a cache owned by the building user.
        "APT::Sandbox::User": "root",
    }
    if sources.snapshot:
        opts["Acquire::Check-Valid-Until"] = "false"  # snapshot Release files are old on purpose
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def refresh_lists(sources: AptSources | None, cache_dir: Path) -> None:
    """`apt-get update` of the private state when its lists are missing or older than allowed."""
    if sources is None:
        return
    lists = sources.state_dir(cache_dir) / "lists"
    stamp = lists / ".updated"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < sources.max_list_age_seconds:
        return
    run(["apt-get", *_apt_options(sources, cache_dir), "update", "-q"])
    stamp.touch()


def _safe_version(version: str) -> str:
    """A package version usable as a directory name (Debian versions may hold ':' and '~')."""
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def candidate_versions(
    packages: list[str], sources: AptSources | None = None, cache_dir: Path | None = None
) -> dict[str, str | None]:
    """The versions apt would download, None for a package apt knows no version of. One apt-cache call."""
    opts = _apt_options(sources, cache_dir) if sources is not None and cache_dir is not None else []
    out = run(["apt-cache", *opts, "policy", *packages], capture=True, check=False).stdout
    found: dict[str, str | None] = dict.fromkeys(packages)
    current = None
    for line in out.splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            current = line[:-1].split(":")[0]  # "pkg:" (or "pkg:amd64:" on multi-arch hosts)
        elif current in found and (m := re.match(r"^\s+Candidate:\s*(\S+)", line)) and m.group(1) != "(none)":
            found[current] = m.group(1)
    return found


def candidate_version(package: str, sources: AptSources | None = None, cache_dir: Path | None = None) -> str | None:
    """The version apt would download for `package`, or None when apt knows none (no `apt-get update`)."""
    return candidate_versions([package], sources, cache_dir)[package]


def fetch_package(
    package: str, cache_dir: Path, version: str | None = None, sources: AptSources | None = None
) -> tuple[str, Path]:
    """Download `package` (apt's candidate, or `version`) and unpack it under cache_dir/efi/.

    Returns (version, unpacked tree). An already unpacked version is reused without network access;
    when apt knows no candidate, the single version already in the cache is used.
    """
    efi_cache = cache_dir / "efi"
    efi_cache.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = candidate_version(package, sources, cache_dir)
    if version is None:  # apt knows none: fall back on the cache
        cached = sorted(p for p in efi_cache.glob(f"{package}_*") if p.is_dir() and (p / ".complete").exists())
        if len(cached) != 1:
            raise EfiError(
                f"apt knows no version of {package} and the cache {efi_cache} holds {len(cached)} unpacked "
                "versions of it: check the mirror in the image definition, or run `apt-get update` when the "
                "host's apt sources are used"
            )
        return (cached[0] / ".complete").read_text().strip(), cached[0]
    tree = efi_cache / f"{package}_{_safe_version(version)}"
    if (tree / ".complete").exists():
        return version, tree
    download_dir = efi_cache / "debs"
    download_dir.mkdir(exist_ok=True)
    for old in download_dir.glob(f"{package}_*.deb"):
        old.unlink()
    # `apt-get download` writes into the current directory; it verifies the .deb against the signed
    # archive index, so the bytes are Debian's.
    run(["apt-get", *_apt_options(sources, cache_dir), "download", "-q", f"{package}={version}"], cwd=download_dir)
    debs = sorted(download_dir.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise EfiError(f"apt-get download {package}={version} left {len(debs)} .deb files in {download_dir}")
    if tree.exists():
        shutil.rmtree(tree)
    tmp = tree.with_name(tree.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    run(["dpkg-deb", "-x", debs[0], tmp])
    (tmp / ".complete").write_text(version + "\n")
    tmp.rename(tree)
    debs[0].unlink()
    return version, tree


def fetch_efi_files(cache_dir: Path, sources: AptSources | None = None) -> tuple[dict[str, str], dict[str, Path]]:
    """Fetch the signed boot binaries. Returns ({package: version}, {FAT path: host file})."""
    versions: dict[str, str] = {}
    files: dict[str, Path] = {}
    refresh_lists(sources, cache_dir)
    candidates = candidate_versions(list(EFI_PACKAGES), sources, cache_dir)
    for package, members in EFI_PACKAGES.items():
        version, tree = fetch_package(package, cache_dir, candidates[package], sources)
        versions[package] = version
        for member, fat_path in members.items():
            src = tree / member
            if not src.is_file():
                raise EfiError(f"{package} {version} has no {member} (looked in {tree})")
            files[fat_path] = src
    return versions, files


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


def build_efi_image(
    cache_dir: Path, output: Path, source_date_epoch: int, sources: AptSources | None = None
) -> EfiImage:
    """Fetch Debian's signed shim/GRUB/MokManager and put them into a FAT image at `output`."""
    versions, binaries = fetch_efi_files(cache_dir, sources)
    files: dict[str, Path | bytes] = {**binaries, BRIDGE_CFG_PATH: BRIDGE_CFG.encode()}
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
