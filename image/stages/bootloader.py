"""Stage 5, bootloader: Debian's signed shim, GRUB and MokManager, fetched from the image definition's
mirror and unpacked into the build cache, with a manifest of what was fetched.

Secure Boot needs the binaries exactly as Debian signed them (see boot/efi.py), so they come from
Debian's packages: fetched with `apt-get download` and unpacked with `dpkg-deb -x` into
build/cache/efi/<package>_<version>/, never installed on the build host (their maintainer scripts
would touch the host's own boot set-up). They come from the image definition's mirror (a snapshot
pins them) through a private apt state in the cache (AptSources), checked against the host's Debian
archive keyring; without AptSources, from the host's own apt sources.

This is the only stage after the rootfs that reaches the mirror: the ISO stage reads the manifest
(build/cache/bootloader.json: package, version, architecture and the sha256 of each file used),
checks the files against it and assembles local files only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from image.core.errors import ImageError
from image.core.paths import REPO, BuildPaths, code_digest, digest
from image.core.run import CommandError, run

if TYPE_CHECKING:
    from image.stages.config import ImageConfig

log = logging.getLogger(__name__)

# package -> {path inside the package: path inside the FAT image (boot/efi.py)}
EFI_PACKAGES: dict[str, dict[str, str]] = {
    "shim-signed": {"usr/lib/shim/shimx64.efi.signed": "EFI/BOOT/BOOTX64.EFI"},
    # shim loads `grubx64.efi` from its own directory; gcdx64 is Debian's GRUB build for CD/USB media.
    "grub-efi-amd64-signed": {"usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed": "EFI/BOOT/grubx64.efi"},
    # MokManager: shim starts it when a MOK enrolment or a verification failure needs the user.
    "shim-helpers-amd64-signed": {"usr/lib/shim/mmx64.efi.signed": "EFI/BOOT/mmx64.efi"},
}
# This stage's code: editing it changes the stage's key.
CODE = ("image/stages/bootloader.py",)


class BootLoaderError(ImageError, RuntimeError):
    """The boot loader packages could not be fetched, or the cache does not match the manifest."""


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
            raise BootLoaderError(
                f"{cfg.path}: debian.architecture: {cfg.debian.architecture!r} is not supported by the "
                "ISO's UEFI boot (shimx64/grubx64 are amd64 only)"
            )
        return cls(tuple(apt_sources(cfg)), cfg.debian.architecture)

    @property
    def snapshot(self) -> bool:
        return any("snapshot.debian.org" in line for line in self.lines)

    def state_dir(self, cache_dir: Path) -> Path:
        digest = hashlib.sha256("\n".join((*self.lines, self.architecture)).encode()).hexdigest()[:16]
        # Absolute: apt reads a relative Dir:: option against its own root, not our working directory.
        return cache_dir.resolve() / "efi" / "apt" / digest


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


def _complete(tree: Path) -> bool:
    # .complete is written last; trees unpacked before the architecture was recorded are fetched again.
    return (tree / ".complete").exists() and (tree / ".architecture").exists()


def fetch_package(
    package: str, cache_dir: Path, version: str | None = None, sources: AptSources | None = None
) -> tuple[str, Path]:
    """Download `package` (apt's candidate, or `version`) and unpack it under cache_dir/efi/.

    Returns (version, unpacked tree; its .architecture file holds the package's architecture). An already
    unpacked version is reused without network access; when apt knows no candidate, the single version
    already in the cache is used.
    """
    efi_cache = cache_dir / "efi"
    efi_cache.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = candidate_version(package, sources, cache_dir)
    if version is None:  # apt knows none: fall back on the cache
        cached = sorted(p for p in efi_cache.glob(f"{package}_*") if p.is_dir() and _complete(p))
        if len(cached) != 1:
            raise BootLoaderError(
                f"apt knows no version of {package} and the cache {efi_cache} holds {len(cached)} unpacked "
                "versions of it: check the mirror in the image definition, or run `apt-get update` when the "
                "host's apt sources are used"
            )
        return (cached[0] / ".complete").read_text().strip(), cached[0]
    tree = efi_cache / f"{package}_{_safe_version(version)}"
    if _complete(tree):
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
        raise BootLoaderError(f"apt-get download {package}={version} left {len(debs)} .deb files in {download_dir}")
    if tree.exists():
        shutil.rmtree(tree)
    tmp = tree.with_name(tree.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    run(["dpkg-deb", "-x", debs[0], tmp])
    arch = run(["dpkg-deb", "--field", debs[0], "Architecture"], capture=True).stdout.strip()
    (tmp / ".architecture").write_text(arch + "\n")
    (tmp / ".complete").write_text(version + "\n")
    tmp.rename(tree)
    debs[0].unlink()
    return version, tree


def package_tree(cache_dir: Path, package: str, version: str) -> Path:
    return cache_dir / "efi" / f"{package}_{_safe_version(version)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BootLoaders:
    """The fetched boot loaders: the manifest and the unpacked files it describes."""

    # {"packages": [{"package", "version", "architecture", "files": {path in the package: sha256}}]}, sorted
    manifest: dict[str, Any]
    files: dict[str, Path]  # path inside the FAT image -> unpacked file

    @property
    def versions(self) -> dict[str, str]:
        return {p["package"]: p["version"] for p in self.manifest["packages"]}

    def packages_text(self) -> str:
        """The packages as the rootfs manifest lists its own: "package<TAB>version<TAB>arch" lines, sorted."""
        return "".join(f"{p['package']}\t{p['version']}\t{p['architecture']}\n" for p in self.manifest["packages"])


def resolve_candidates(sources: AptSources, cache_dir: Path) -> dict[str, str | None]:
    """The versions the stage would fetch now (for its key): the private lists are refreshed at most once
    a day. Offline, the lists (or the cache, see fetch_package) as they are must do."""
    try:
        refresh_lists(sources, cache_dir)
    except CommandError as exc:
        log.warning("bootloader: apt-get update failed (%s); using the package lists as they are", exc.summary())
    return candidate_versions(list(EFI_PACKAGES), sources, cache_dir)


def bootloader_key(sources: AptSources, candidates: dict[str, str | None], repo: Path = REPO) -> str:
    """Changes with this stage's code, the sources, the packages and files taken, and a new candidate version."""
    return digest(
        "bootloader", code_digest(*CODE, repo=repo), sources.lines, sources.architecture, EFI_PACKAGES, candidates
    )


def fetch_boot_loaders(
    cache_dir: Path, sources: AptSources | None = None, candidates: dict[str, str | None] | None = None
) -> BootLoaders:
    """Fetch (or reuse from cache_dir/efi/) the signed boot binaries and describe them."""
    if candidates is None:
        refresh_lists(sources, cache_dir)
        candidates = candidate_versions(list(EFI_PACKAGES), sources, cache_dir)
    packages = []
    files: dict[str, Path] = {}
    for package, members in sorted(EFI_PACKAGES.items()):
        version, tree = fetch_package(package, cache_dir, candidates.get(package), sources)
        used = {}
        for member, fat_path in sorted(members.items()):
            src = tree / member
            if not src.is_file():
                raise BootLoaderError(f"{package} {version} has no {member} (looked in {tree})")
            used[member] = _sha256(src)
            files[fat_path] = src
        arch = (tree / ".architecture").read_text().strip()
        packages.append({"package": package, "version": version, "architecture": arch, "files": used})
    return BootLoaders({"packages": packages}, files)


def write_manifest(loaders: BootLoaders, manifest: Path, packages: Path) -> None:
    """The stage's products: the JSON manifest and the package list the ISO carries."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(loaders.manifest, indent=1, sort_keys=True) + "\n")
    packages.write_text(loaders.packages_text())


def load_boot_loaders(manifest: Path, cache_dir: Path) -> BootLoaders:
    """The boot loaders the manifest names, from cache_dir/efi/, each file checked against its sha256
    (the ISO stage's input: no apt, no network)."""
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise BootLoaderError(f"{manifest} is missing: run the bootloader stage (`inv bootloader`)") from None
    files: dict[str, Path] = {}
    for entry in data["packages"]:
        package, version = entry["package"], entry["version"]
        tree = package_tree(cache_dir, package, version)
        for member, sha in entry["files"].items():
            fat_path = EFI_PACKAGES.get(package, {}).get(member)
            src = tree / member
            if fat_path is None or not src.is_file() or _sha256(src) != sha:
                raise BootLoaderError(
                    f"{manifest}: {package} {version} {member} is not in {tree} as the manifest says: "
                    "run `inv bootloader --force`"
                )
            files[fat_path] = src
    if set(files) != {f for members in EFI_PACKAGES.values() for f in members.values()}:
        raise BootLoaderError(f"{manifest} does not name every boot loader file: run `inv bootloader --force`")
    return BootLoaders(data, files)


def manifest_files(manifest: Path, cache_dir: Path) -> list[Path]:
    """The unpacked files a manifest names (none when it is missing): products of the stage."""
    try:
        data = json.loads(manifest.read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [
        package_tree(cache_dir, e["package"], e["version"]) / member for e in data["packages"] for member in e["files"]
    ]


def build_bootloader(paths: BuildPaths, sources: AptSources, candidates: dict[str, str | None]) -> BootLoaders:
    """The stage: fetch into paths.cache/efi/, then write the manifest and the package list."""
    loaders = fetch_boot_loaders(paths.cache, sources, candidates)
    write_manifest(loaders, paths.boot_loader_manifest, paths.boot_loader_packages)
    log.info("bootloader: %s", ", ".join(f"{p} {v}" for p, v in loaders.versions.items()))
    return loaders
