"""The stages' keys hold their own code (image.core.paths.code_digest of each module's CODE): editing a stage
changes its key and those of the stages that use its products, not the others; and a key does not depend on
where the repository is checked out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from image.core.paths import REPO, BuildPaths, code_digest
from image.stages import bootloader, rootfs, squashfs
from image.stages.config import DEFAULT_CONFIG, load_config
from image.stages.pipeline import Pipeline

CFG = load_config(DEFAULT_CONFIG)
KEYS = (
    "rootfs_key",
    "overlay_key",
    "deps_key",
    "client_key",
    "base_layer_key",
    "deps_layer_key",
    "overlay_layer_key",
    "bootloader_key",
    "iso_key",
    "hashes_key",
)
# What the key functions read from the repository.
_COPIED = ("image", "overlay", "client")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".pytest_cache")

AFTER_ROOTFS = {"rootfs_key", "deps_key", "client_key", "base_layer_key", "deps_layer_key", "overlay_layer_key"}
LATER = {"iso_key", "hashes_key"}
# edited file -> the keys that must change (every other key must not)
EDITS = {
    "image/stages/rootfs.py": AFTER_ROOTFS | LATER,
    "image/stages/templates/initramfs-boot.j2": AFTER_ROOTFS | LATER,
    "image/stages/overlay.py": {"overlay_key", "overlay_layer_key"} | LATER,
    "image/stages/clientenv.py": {"deps_key", "client_key", "deps_layer_key", "overlay_layer_key"} | LATER,
    "image/stages/squashfs.py": {"base_layer_key", "deps_layer_key", "overlay_layer_key"} | LATER,
    # The ISO's key holds what the stage fetched (its manifest), not the stage's key: see below.
    "image/stages/bootloader.py": {"bootloader_key"},
    "image/stages/boot/efi.py": LATER,
    "image/stages/boot/localdisk.S": LATER,
    "image/stages/templates/grub.cfg.j2": LATER,
    "image/stages/pipeline.py": LATER,
    "image/stages/hashes.py": {"hashes_key"},
    # Shared code, in no CODE tuple: it joins the key of every stage that imports it.
    "image/stages/templating.py": AFTER_ROOTFS | LATER,
    "image/stages/config.py": set(KEYS),
    "image/core/run.py": set(KEYS),
    "image/core/mounts.py": AFTER_ROOTFS | LATER,
    "image/core/paths.py": set(KEYS),
    "image/stages/__init__.py": set(KEYS),  # a package runs its __init__ before its modules
}


@pytest.fixture(autouse=True)
def no_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys without running mmdebstrap/mksquashfs or asking the mirror: those inputs are held fixed."""
    monkeypatch.setattr(rootfs, "mmdebstrap_version", lambda: "mmdebstrap 1.3.5")
    monkeypatch.setattr(squashfs, "mksquashfs_version", lambda: "mksquashfs version 4.5.1")
    monkeypatch.setattr(bootloader, "resolve_candidates", lambda *a: dict.fromkeys(bootloader.EFI_PACKAGES, "1.0"))


def _checkout(dest: Path) -> Path:
    for name in _COPIED:
        shutil.copytree(REPO / name, dest / name, ignore=_IGNORED, symlinks=True)
    return dest


def _keys(repo: Path, build: Path, manifest: str = '{"packages": []}') -> dict[str, str]:
    paths = BuildPaths(build)
    paths.cache.mkdir(parents=True, exist_ok=True)
    paths.boot_loader_manifest.write_text(manifest)
    pipe = Pipeline(CFG, paths, repo=repo, epochs=(1_700_000_000, 1_700_000_100))
    return {k: getattr(pipe, k) for k in KEYS}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkout(tmp_path_factory.mktemp("checkout-a") / "repo")


def test_keys_do_not_depend_on_the_checkouts_path_or_its_caches(checkout: Path, tmp_path: Path) -> None:
    other = _checkout(tmp_path / "elsewhere" / "failback")
    # Python's byte code beside the sources (iso.CODE names the whole boot/ directory).
    (other / "image/stages/boot/__pycache__").mkdir(exist_ok=True)
    (other / "image/stages/boot/__pycache__/iso.cpython-311.pyc").write_bytes(b"compiled here")
    assert _keys(other, tmp_path / "b2") == _keys(checkout, tmp_path / "b1")


@pytest.mark.parametrize("edited", sorted(EDITS))
def test_editing_a_stage_changes_its_key_and_those_after_it_only(edited: str, checkout: Path, tmp_path: Path) -> None:
    before = _keys(checkout, tmp_path / "b1")
    repo = _checkout(tmp_path / "edited")
    with (repo / edited).open("a") as f:
        f.write("\n")  # one byte more: even a blank line counts
    after = _keys(repo, tmp_path / "b2")
    changed = {k for k in KEYS if before[k] != after[k]}
    assert changed == EDITS[edited], f"{edited}: changed {sorted(changed)}"


def test_a_new_helper_module_joins_the_key_of_the_stage_that_imports_it(checkout: Path, tmp_path: Path) -> None:
    """No list to keep: a stage that starts importing a new module (here lazily, inside a function) has that
    module's code in its key; editing the helper then changes the stage's key and those after it."""
    repo = _checkout(tmp_path / "repo")
    (repo / "image/stages/helper.py").write_text("SIZE = 1\n")
    with (repo / "image/stages/overlay.py").open("a") as f:
        f.write("\n\ndef _uses_helper() -> int:\n    from image.stages.helper import SIZE\n\n    return SIZE\n")
    before = _keys(repo, tmp_path / "b1")
    (repo / "image/stages/helper.py").write_text("SIZE = 2\n")
    after = _keys(repo, tmp_path / "b2")
    assert {k for k in KEYS if before[k] != after[k]} == {"overlay_key", "overlay_layer_key"} | LATER


def test_rootfs_key_follows_the_apt_sources_as_written(
    checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside config.py's code, the lines config.apt_sources gives mmdebstrap are in the key."""
    before = _keys(checkout, tmp_path / "b1")
    monkeypatch.setattr(rootfs, "apt_sources", lambda cfg: ["deb http://deb.debian.org/debian bookworm main contrib"])
    after = _keys(checkout, tmp_path / "b2")
    assert {k for k in KEYS if before[k] != after[k]} == AFTER_ROOTFS | LATER


def test_iso_key_follows_the_boot_loader_manifest(checkout: Path, tmp_path: Path) -> None:
    one = _keys(checkout, tmp_path / "b1", json.dumps({"packages": [{"package": "shim-signed", "version": "1"}]}))
    two = _keys(checkout, tmp_path / "b2", json.dumps({"packages": [{"package": "shim-signed", "version": "2"}]}))
    assert {k for k in KEYS if one[k] != two[k]} == LATER


def test_every_stage_module_is_in_a_key() -> None:
    """Each stage module's CODE names files that exist (a renamed module cannot drop out of its key)."""
    from image.stages import clientenv, hashes, overlay
    from image.stages.boot import iso

    for module in (rootfs, overlay, clientenv, squashfs, bootloader, iso, hashes):
        assert code_digest(*module.CODE)
    with pytest.raises(FileNotFoundError, match=r"image/stages/renamed\.py matches nothing"):
        code_digest("image/stages/renamed.py")
