"""image/stages/pipeline.py: stage skipping by input keys; the full default build and its reproducibility (slow)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from image.core.paths import DEFAULT_BUILD, BuildPaths
from image.stages import bootloader
from image.stages.config import DEFAULT_CONFIG, load_config
from image.stages.hashes import sha512_file
from image.stages.pipeline import BuildError, Pipeline, ReproducibilityError, clean, compare_builds, compared_files

CFG = load_config(DEFAULT_CONFIG)


class Counter:
    def __init__(self, product: Path) -> None:
        self.calls = 0
        self.product = product

    def __call__(self) -> str:
        self.calls += 1
        self.product.write_text(str(self.calls))
        return "made"


def test_stage_runs_once_per_key(tmp_path: Path) -> None:
    paths = BuildPaths(tmp_path / "build")
    product = tmp_path / "product"
    work = Counter(product)

    Pipeline(CFG, paths)._stage("rootfs", "k1", [product], work)
    assert work.calls == 1 and paths.is_fresh("rootfs", "k1")
    Pipeline(CFG, paths)._stage("rootfs", "k1", [product], work)
    assert work.calls == 1, "same inputs: skipped"
    Pipeline(CFG, paths)._stage("rootfs", "k2", [product], work)
    assert work.calls == 2, "changed inputs: rebuilt"
    product.unlink()
    Pipeline(CFG, paths)._stage("rootfs", "k2", [product], work)
    assert work.calls == 3, "missing product: rebuilt"
    Pipeline(CFG, paths)._stage("rootfs", "k2", [product], work, force=True)
    assert work.calls == 4, "forced"
    pipe = Pipeline(CFG, paths)
    pipe._stage("rootfs", "k2", [product], work)
    assert [(r.stage, r.skipped) for r in pipe.report.results] == [("rootfs", True)]
    assert "up to date" in pipe.report.format()


def test_failed_stage_leaves_no_stamp(tmp_path: Path) -> None:
    paths = BuildPaths(tmp_path / "build")
    product = tmp_path / "product"
    Pipeline(CFG, paths)._stage("overlay", "k1", [product], Counter(product))

    def broken() -> str:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Pipeline(CFG, paths)._stage("overlay", "k2", [product], broken)
    assert not paths.stamp("overlay").exists(), "an interrupted stage runs again next time"
    assert not paths.is_fresh("overlay", "k1")


def test_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown stage 'nope'"):
        Pipeline(CFG, BuildPaths(tmp_path)).build("nope")


def _fake_build(root: Path, content: bytes) -> Pipeline:
    pipe = Pipeline(CFG, BuildPaths(root))
    for i, path in enumerate(compared_files(pipe).values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content + bytes([i]))
    return pipe


def test_compare_builds_names_the_differing_file(tmp_path: Path) -> None:
    a, b = _fake_build(tmp_path / "a", b"x"), _fake_build(tmp_path / "b", b"x")
    sums = compare_builds(a, b)
    assert sums[f"out/{CFG.iso.artifact}"] == sha512_file(a.artifact)
    b.paths.overlay_layer.write_bytes(b"different")
    with pytest.raises(ReproducibilityError) as err:
        compare_builds(a, b)
    assert "layers/10-overlay.squashfs" in str(err.value)
    assert CFG.iso.artifact not in str(err.value)


def test_clean(tmp_path: Path) -> None:
    root = tmp_path / "build"
    for d in ("out", "cache/stamps", "repro-a"):
        (root / d).mkdir(parents=True)
    assert clean(root) == [root / "out"]
    assert (root / "cache").exists()
    assert set(clean(root, everything=True)) == {root / "cache", root / "repro-a"}
    assert list(root.iterdir()) == []


# --- the real build (root, slow) --------------------------------------------------------------


def _iso_file(iso: Path, path: str) -> bytes:
    from image.stages.boot.iso import open_iso

    with open_iso(iso) as cd:
        buf = io.BytesIO()
        cd.get_file_from_iso_fp(buf, rr_path=path)
        return buf.getvalue()


@pytest.mark.slow
@pytest.mark.root
def test_default_build_products(built_pipeline, built_iso: Path) -> None:
    p = built_pipeline.paths
    assert built_iso == DEFAULT_BUILD / "out" / CFG.iso.artifact and built_iso.is_file()
    size = built_iso.stat().st_size
    print(
        f"ISO {size / 2**20:.1f} MiB; layers "
        + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in built_pipeline.layer_sizes().items())
    )
    assert size <= 200 * 2**20, f"ISO is {size / 2**20:.1f} MiB, over the 200 MiB target"
    manifest = built_iso.with_name(Path(CFG.iso.artifact).stem + ".packages")
    assert manifest.read_bytes() == p.manifest.read_bytes()
    assert "busybox\t" in manifest.read_text()
    # Inside the ISO: the manifest, the layer list and both layers, byte for byte.
    assert _iso_file(built_iso, "/live/filesystem.packages") == manifest.read_bytes()
    # The boot loaders on the medium (the bootloader stage's), listed apart in the same format.
    loaders = built_iso.with_name(Path(CFG.iso.artifact).stem + ".bootloader.packages")
    assert (
        loaders.read_bytes() == p.boot_loader_packages.read_bytes() == _iso_file(built_iso, "/live/bootloader.packages")
    )
    assert {line.split("\t")[0] for line in loaders.read_text().splitlines()} == set(bootloader.EFI_PACKAGES)
    module = b"00-base.squashfs\n05-deps.squashfs\n10-overlay.squashfs\n"
    assert _iso_file(built_iso, "/live/filesystem.module") == module
    for layer in built_pipeline.layers:
        assert len(_iso_file(built_iso, f"/live/{layer.name}")) == layer.stat().st_size
    # Hashes beside it, checked by the real tool.
    assert built_iso.with_name(built_iso.name + ".sha512").read_text() == sha512_file(built_iso) + "\n"
    check = subprocess.run(
        ["sha512sum", "-c", "--strict", "SHA512SUMS"], cwd=built_iso.parent, capture_output=True, text=True
    )
    assert check.returncode == 0 and f"{CFG.iso.artifact}: OK" in check.stdout, check.stdout + check.stderr


@pytest.mark.slow
@pytest.mark.root
def test_second_build_is_a_no_op(built_pipeline) -> None:
    again = Pipeline(
        built_pipeline.cfg, built_pipeline.paths, epochs=(built_pipeline.base_epoch, built_pipeline.epoch)
    )  # a commit may land meanwhile
    again.build()
    assert [r.stage for r in again.report.results if not r.skipped] == []
    assert sha512_file(again.artifact) == sha512_file(built_pipeline.artifact)


@pytest.mark.slow
@pytest.mark.root
def test_cold_rebuild_gives_the_same_bytes(built_pipeline) -> None:
    """A second build from cold (own caches, shared downloads) gives the same ISO and layers."""
    root = DEFAULT_BUILD / "repro-test"
    if root.exists():
        shutil.rmtree(root)
    cold = Pipeline(
        built_pipeline.cfg,
        BuildPaths(root, downloads=DEFAULT_BUILD / "cache"),
        epochs=(built_pipeline.base_epoch, built_pipeline.epoch),
    )
    cold.build()
    try:
        sums = compare_builds(built_pipeline, cold)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert sums[f"out/{CFG.iso.artifact}"] == sha512_file(built_pipeline.artifact)
