"""The bootloader stage (image/stages/bootloader.py): Debian's signed shim/GRUB/MokManager fetched from the image's
mirror into the cache, the manifest of what was fetched, and the checks the ISO stage makes against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from image.core.paths import BuildPaths
from image.stages import bootloader
from image.stages.config import apt_sources, load_config


@pytest.fixture(scope="module")
def efi_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the real packages fetched once for this module (apt-get download, ~2 MB)."""
    cache = tmp_path_factory.mktemp("bootloader-cache")
    bootloader.fetch_boot_loaders(cache, bootloader.AptSources.from_config(load_config()))
    return cache


@pytest.mark.network
def test_manifest_names_package_version_arch_and_sha256_of_each_file(efi_cache: Path, tmp_path: Path) -> None:
    sources = bootloader.AptSources.from_config(load_config())
    paths = BuildPaths(tmp_path)
    paths.cache.mkdir(parents=True)
    (paths.cache / "efi").symlink_to(efi_cache / "efi")  # the fetched trees (and the private apt state)
    candidates = bootloader.candidate_versions(list(bootloader.EFI_PACKAGES), sources, paths.cache)
    loaders = bootloader.build_bootloader(paths, sources, candidates)
    data = json.loads(paths.boot_loader_manifest.read_text())
    assert [p["package"] for p in data["packages"]] == sorted(bootloader.EFI_PACKAGES)
    for entry in data["packages"]:
        assert entry["architecture"] == "amd64"
        assert set(entry["files"]) == set(bootloader.EFI_PACKAGES[entry["package"]])
    assert paths.boot_loader_packages.read_text() == "".join(
        f"{p['package']}\t{p['version']}\tamd64\n" for p in data["packages"]
    )
    # The ISO stage's view: the same files, checked against the manifest, without apt.
    again = bootloader.load_boot_loaders(paths.boot_loader_manifest, paths.cache)
    assert again.files == loaders.files and again.versions == loaders.versions
    trees = [bootloader.package_tree(paths.cache, e["package"], e["version"]) for e in data["packages"]]
    assert bootloader.manifest_files(paths.boot_loader_manifest, paths.cache) == [
        tree / m for tree, e in zip(trees, data["packages"], strict=True) for m in e["files"]
    ]


def _fake_cache(cache: Path) -> Path:
    """An unpacked tree per package with small stand-in files, and the manifest describing them."""
    packages = []
    for package, members in sorted(bootloader.EFI_PACKAGES.items()):
        tree = bootloader.package_tree(cache, package, "1.0")
        files = {}
        for member in members:
            (tree / member).parent.mkdir(parents=True, exist_ok=True)
            (tree / member).write_bytes(f"{package} {member}".encode())
            files[member] = bootloader._sha256(tree / member)
        packages.append({"package": package, "version": "1.0", "architecture": "amd64", "files": files})
    manifest = cache / "bootloader.json"
    manifest.write_text(json.dumps({"packages": packages}))
    return manifest


def test_iso_stage_refuses_files_that_do_not_match_the_manifest(tmp_path: Path) -> None:
    manifest = _fake_cache(tmp_path)
    loaders = bootloader.load_boot_loaders(manifest, tmp_path)
    assert set(loaders.files) == {"EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi", "EFI/BOOT/mmx64.efi"}
    shim = loaders.files["EFI/BOOT/BOOTX64.EFI"]
    shim.write_bytes(b"tampered")
    with pytest.raises(bootloader.BootLoaderError, match=r"shim-signed 1.0 usr/lib/shim/shimx64.efi.signed is not"):
        bootloader.load_boot_loaders(manifest, tmp_path)
    shim.unlink()
    with pytest.raises(bootloader.BootLoaderError, match="inv bootloader --force"):
        bootloader.load_boot_loaders(manifest, tmp_path)
    with pytest.raises(bootloader.BootLoaderError, match=r"is missing: run the bootloader stage"):
        bootloader.load_boot_loaders(tmp_path / "nope.json", tmp_path)


def test_key_follows_code_sources_and_candidates(tmp_path: Path) -> None:
    sources = bootloader.AptSources.from_config(load_config())
    cands = dict.fromkeys(bootloader.EFI_PACKAGES, "1.0")
    key = bootloader.bootloader_key(sources, cands)
    assert bootloader.bootloader_key(sources, cands) == key
    assert bootloader.bootloader_key(sources, {**cands, "shim-signed": "1.1"}) != key  # a new shim in the mirror
    other = bootloader.AptSources(("deb http://snapshot.debian.org/archive/debian/20250520T000000Z bookworm main",))
    assert bootloader.bootloader_key(other, cands) != key


@pytest.mark.network
def test_cached_packages_are_reused_offline(efi_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions, _ = _fetch(efi_cache)
    calls: list[list[str]] = []

    def no_apt(cmd, **kw):  # a second fetch must not need the network or apt
        calls.append([str(c) for c in cmd])
        raise AssertionError(f"unexpected command {cmd}")

    # apt knows nothing (no lists, no network): the unpacked trees in the cache must do.
    monkeypatch.setattr(bootloader, "candidate_versions", lambda packages, *a, **kw: dict.fromkeys(packages))
    monkeypatch.setattr(bootloader, "run", no_apt)
    again, files = _fetch(efi_cache)
    assert again == versions and calls == []
    assert all(p.is_file() for p in files.values())


def test_unknown_package_without_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootloader, "candidate_version", lambda *a, **kw: None)
    with pytest.raises(bootloader.BootLoaderError, match=r"apt knows no version of shim-signed.*check the mirror"):
        bootloader.fetch_package("shim-signed", tmp_path)


@pytest.mark.network
def test_packages_come_from_the_image_definitions_mirror(tmp_path: Path) -> None:
    """A private apt state in the cache reads only the image definition's sources (the rootfs's)."""
    cfg = load_config()
    sources = bootloader.AptSources.from_config(cfg)
    assert list(sources.lines) == apt_sources(cfg)
    versions, files = _fetch(tmp_path, sources)
    state = sources.state_dir(tmp_path)
    assert (state / "sources.list").read_text().splitlines() == apt_sources(cfg)
    assert any((state / "lists").glob("*_InRelease")), "apt-get update did not run in the private state"
    assert (state / "status").read_text() == ""  # nothing is ever installed
    for pkg, version in versions.items():
        assert bootloader.candidate_version(pkg, sources, tmp_path) == version
    assert files["EFI/BOOT/BOOTX64.EFI"].name == "shimx64.efi.signed"


def test_snapshot_mirror_turns_off_valid_until(tmp_path: Path) -> None:
    snap = bootloader.AptSources(("deb http://snapshot.debian.org/archive/debian/20250520T000000Z bookworm main",))
    plain = bootloader.AptSources(("deb http://deb.debian.org/debian bookworm main",))
    assert "Acquire::Check-Valid-Until=false" in bootloader._apt_options(snap, tmp_path)
    assert "Acquire::Check-Valid-Until=false" not in bootloader._apt_options(plain, tmp_path)
    assert snap.state_dir(tmp_path) != plain.state_dir(tmp_path)


def test_a_relative_cache_directory_gives_apt_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apt reads a relative Dir:: option against its own root, so `--build-dir build` must not reach it as is."""
    monkeypatch.chdir(tmp_path)
    sources = bootloader.AptSources(("deb http://deb.debian.org/debian bookworm main",))
    opts = bootloader._apt_options(sources, Path("build/cache"))
    dirs = [o.split("=", 1)[1] for o in opts if o.startswith("Dir::")]
    assert dirs and all(Path(d).is_absolute() for d in dirs), dirs
    assert (tmp_path / "build/cache/efi/apt").is_dir()


def test_other_architectures_are_refused() -> None:
    import dataclasses

    from image.stages.config import load_config

    cfg = load_config()
    arm = dataclasses.replace(cfg, debian=dataclasses.replace(cfg.debian, architecture="arm64"))
    with pytest.raises(bootloader.BootLoaderError, match=r"debian.architecture: 'arm64' is not supported"):
        bootloader.AptSources.from_config(arm)


def _fetch(cache: Path, sources: bootloader.AptSources | None = None) -> tuple[dict[str, str], dict[str, Path]]:
    loaders = bootloader.fetch_boot_loaders(cache, sources or bootloader.AptSources.from_config(load_config()))
    return loaders.versions, loaders.files
