"""image/stages/squashfs.py: reproducible mksquashfs, layer order for live-boot, tree merging, keys."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from image.stages import squashfs
from image.stages.config import SquashfsConfig
from image.stages.hashes import sha512_file

ZSTD = SquashfsConfig("zstd", 3)
EPOCH = 1700000000


def tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("drs-failback\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("#!/bin/sh\n")
    os.chmod(root / "usr/bin/tool", 0o755)
    (root / "etc/link").symlink_to("hostname")
    return root


def listing(image: Path) -> str:
    return subprocess.run(["unsquashfs", "-lln", str(image)], capture_output=True, text=True, check=True).stdout


def test_compression_args() -> None:
    assert squashfs.compression_args(SquashfsConfig("zstd", 19)) == ["-comp", "zstd", "-Xcompression-level", "19"]
    assert squashfs.compression_args(SquashfsConfig("zstd", None)) == ["-comp", "zstd"]
    assert squashfs.compression_args(SquashfsConfig("xz", None)) == ["-comp", "xz"]
    with pytest.raises(ValueError, match=r"squashfs\.compression"):
        squashfs.compression_args(SquashfsConfig("lzo", None))


@pytest.mark.parametrize("sq", [ZSTD, SquashfsConfig("xz", None)], ids=["zstd", "xz"])
def test_mksquashfs_is_reproducible_and_stamps_epoch(
    tmp_path: Path, sq: SquashfsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SOURCE_DATE_EPOCH in the environment (CI sets one) must not clash with the flags.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    src = tree(tmp_path / "src")
    a, b = tmp_path / "a.squashfs", tmp_path / "b.squashfs"
    squashfs.mksquashfs(src, a, sq, EPOCH)
    os.utime(src / "etc/hostname", (0, 0))  # mtimes do not matter: every timestamp is the epoch
    squashfs.mksquashfs(src, b, sq, EPOCH)
    assert sha512_file(a) == sha512_file(b)
    out = listing(a)
    assert "2023-11-14 22:13" in out  # 1700000000 in UTC
    assert "squashfs-root/usr/bin/tool" in out and "squashfs-root/etc/link -> hostname" in out
    squashfs.mksquashfs(src, b, sq, EPOCH + 60)
    assert sha512_file(a) != sha512_file(b)


def test_base_layer_leaves_boot_out(tmp_path: Path) -> None:
    src = tree(tmp_path / "rootfs")
    (src / "boot").mkdir()
    (src / "boot/vmlinuz-6.1").write_bytes(b"k" * 1000)
    out = tmp_path / "base.squashfs"
    squashfs.build_base_layer(src, out, ZSTD, EPOCH)
    text = listing(out)
    assert "squashfs-root/boot\n" in text, "the (empty) /boot directory stays"
    assert "vmlinuz" not in text


@pytest.mark.root
def test_overlay_layer_merges_overlay_and_client_owned_by_root(tmp_path: Path) -> None:
    ovl = tree(tmp_path / "overlay")
    client = tmp_path / "client"
    (client / "opt/failback-client/bin").mkdir(parents=True)
    (client / "opt/failback-client/bin/failback-client").write_text("#!/opt/failback-client/bin/python\n")
    os.chown(client / "opt/failback-client/bin/failback-client", 1234, 1234)
    out = tmp_path / "10-overlay.squashfs"
    squashfs.build_overlay_layer(ovl, client, out, ZSTD, EPOCH)
    text = listing(out)
    assert "squashfs-root/opt/failback-client/bin/failback-client" in text
    assert "squashfs-root/etc/hostname" in text
    assert all(line.split()[1] == "0/0" for line in text.splitlines()), text  # numeric uid/gid
    assert not (tmp_path / "overlay-layer-tree").exists(), "the staging tree is removed"


def test_merge_trees_refuses_a_file_in_both(tmp_path: Path) -> None:
    a = tree(tmp_path / "a")
    b = tmp_path / "b"
    (b / "etc").mkdir(parents=True)
    (b / "etc/hostname").write_text("x\n")
    with pytest.raises(FileExistsError, match="etc/hostname is in both"):
        squashfs.merge_trees(tmp_path / "out", a, b)


def test_module_file_lists_base_first(tmp_path: Path) -> None:
    mod = tmp_path / "filesystem.module"
    squashfs.write_module_file(
        mod, [tmp_path / "00-base.squashfs", tmp_path / "05-deps.squashfs", tmp_path / "10-overlay.squashfs"]
    )
    # live-boot stacks the last listed on top: the overlay must come after the base.
    assert mod.read_text() == "00-base.squashfs\n05-deps.squashfs\n10-overlay.squashfs\n"


def test_layer_keys() -> None:
    base = squashfs.base_layer_key("rootfs1", ZSTD, "4.5.1")
    assert base == squashfs.base_layer_key("rootfs1", ZSTD, "4.5.1")
    assert base != squashfs.base_layer_key("rootfs2", ZSTD, "4.5.1")
    assert base != squashfs.base_layer_key("rootfs1", SquashfsConfig("xz", None), "4.5.1")
    deps = squashfs.deps_layer_key("deps1", ZSTD, EPOCH, "4.5.1")
    assert deps != squashfs.deps_layer_key("deps2", ZSTD, EPOCH, "4.5.1")
    assert deps != squashfs.deps_layer_key("deps1", ZSTD, EPOCH + 1, "4.5.1")
    top = squashfs.overlay_layer_key("ovl", "client1", ZSTD, EPOCH, "4.5.1")
    assert top != squashfs.overlay_layer_key("ovl", "client2", ZSTD, EPOCH, "4.5.1")
    assert top != squashfs.overlay_layer_key("ovl2", "client1", ZSTD, EPOCH, "4.5.1")
    assert top != squashfs.overlay_layer_key("ovl", "client1", ZSTD, EPOCH + 1, "4.5.1")
