"""image/rootfs.py: cache key, mmdebstrap command, manifest, kernel/initrd; the built base (slow)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from image import rootfs
from image.config import DEFAULT_CONFIG, load_config

CFG = load_config(DEFAULT_CONFIG)
KEY = rootfs.rootfs_key(CFG, 1700000000, "mmdebstrap 1.3.5")


@pytest.mark.parametrize("changed", [
    replace(CFG, debian=replace(CFG.debian, suite="trixie")),
    replace(CFG, debian=replace(CFG.debian, mirror="http://snapshot.debian.org/archive/debian/20250520T000000Z")),
    replace(CFG, debian=replace(CFG.debian, security_mirror="")),
    replace(CFG, debian=replace(CFG.debian, components=("main",))),
    replace(CFG, packages=(*CFG.packages, "vim-tiny")),
    replace(CFG, packages=tuple(p for p in CFG.packages if p != "less")),
    replace(CFG, exclude_paths=CFG.exclude_paths[1:]),
    replace(CFG, include_paths=()),
], ids=["suite", "mirror", "security", "components", "add-package", "drop-package", "excludes", "includes"])
def test_key_changes_with_each_input(changed) -> None:
    assert rootfs.rootfs_key(changed, 1700000000, "mmdebstrap 1.3.5") != KEY


def test_key_changes_with_epoch_and_tool_but_not_other_settings() -> None:
    assert rootfs.rootfs_key(CFG, 1700000001, "mmdebstrap 1.3.5") != KEY
    assert rootfs.rootfs_key(CFG, 1700000000, "mmdebstrap 1.4.0") != KEY
    assert rootfs.rootfs_key(CFG, 1700000000, "mmdebstrap 1.3.5") == KEY
    # Boot menu, hostname, compression... belong to later stages: the base stays cached.
    assert rootfs.rootfs_key(replace(CFG, hostname="other", kernel_cmdline="boot=live x"), 1700000000,
                             "mmdebstrap 1.3.5") == KEY


def test_mmdebstrap_command(tmp_path: Path) -> None:
    cmd = rootfs.mmdebstrap_command(CFG, tmp_path / "target", tmp_path / "apt cache")
    assert cmd[0] == "mmdebstrap" and "--variant=minbase" in cmd
    [include] = [c for c in cmd if c.startswith("--include=")]
    assert include.removeprefix("--include=").split(",") == [*CFG.packages, "usr-is-merged"]
    purge = next(c for c in cmd if "apt-get purge" in c)
    assert "--no-download" in purge and " usrmerge " in purge and " perl " in purge
    assert "--components=main,non-free-firmware" in cmd
    excludes = [c for c in cmd if c.startswith("--dpkgopt=path-exclude=")]
    includes = [c for c in cmd if c.startswith("--dpkgopt=path-include=")]
    assert len(excludes) == len(CFG.exclude_paths) and len(includes) == len(CFG.include_paths)
    # dpkg applies the last matching filter: the re-includes must come after the excludes.
    assert cmd.index(includes[0]) > cmd.index(excludes[-1])
    assert cmd[-5:] == ["bookworm", str(tmp_path / "target"),
                        "deb http://deb.debian.org/debian bookworm main non-free-firmware",
                        "deb http://deb.debian.org/debian bookworm-updates main non-free-firmware",
                        "deb http://deb.debian.org/debian-security bookworm-security main non-free-firmware"]
    assert any("sync-in '" + str(tmp_path / "apt cache") + "'" in c for c in cmd), "cache path must be quoted"
    assert not any("Check-Valid-Until" in c for c in cmd)
    assert any("machine-id" in c for c in cmd)


def test_snapshot_mirror_disables_valid_until(tmp_path: Path) -> None:
    cfg = replace(CFG, debian=replace(CFG.debian, mirror="http://snapshot.debian.org/archive/debian/20250520T000000Z",
                                      security_mirror=""))
    cmd = rootfs.mmdebstrap_command(cfg, tmp_path / "t", tmp_path / "c")
    assert "--aptopt=Acquire::Check-Valid-Until \"false\"" in cmd
    assert not any("security" in c for c in cmd if c.startswith("deb "))


STATUS = """\
Package: zlib1g
Status: install ok installed
Architecture: amd64
Version: 1:1.2.13.dfsg-1

Package: adduser
Status: install ok installed
Architecture: all
Version: 3.134

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""


def test_manifest_lists_installed_packages_sorted(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(STATUS)
    (root / "var/lib/dpkg/available").write_text("")
    dest = tmp_path / "filesystem.packages"
    rootfs.write_manifest(root, dest)  # real dpkg-query on a real status database
    assert dest.read_text() == "adduser\t3.134\tall\nzlib1g\t1:1.2.13.dfsg-1\tamd64\n"


def test_boot_files_are_extracted(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "boot").mkdir(parents=True)
    (root / "boot/vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0-99-amd64").write_bytes(b"initrd")
    k, i = tmp_path / "out/vmlinuz", tmp_path / "out/initrd.img"
    rootfs.extract_boot_files(root, k, i)
    assert k.read_bytes() == b"kernel" and i.read_bytes() == b"initrd"
    assert (tmp_path / "out/kernel-version").read_text() == "6.1.0-99-amd64\n"


def test_boot_files_errors(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "boot").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="expected exactly one kernel"):
        rootfs.extract_boot_files(root, tmp_path / "k", tmp_path / "i")
    (root / "boot/vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
    with pytest.raises(RuntimeError, match="initramfs was not generated"):
        rootfs.extract_boot_files(root, tmp_path / "k", tmp_path / "i")


# --- the real base of the default build -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.root
def test_built_base(built_pipeline) -> None:
    p = built_pipeline.paths
    manifest = dict(line.split("\t")[:2] for line in p.manifest.read_text().splitlines())
    for pkg in ("live-boot", "systemd-sysv", "python3", "python3-venv", "firmware-bnx2x", "systemd-resolved"):
        assert pkg in manifest, pkg
    assert not [m for m in manifest if m.startswith(("grub", "shim"))], "boot loaders do not belong in the base"
    assert (p.rootfs / "etc/machine-id").read_bytes() == b""
    assert not list((p.rootfs / "var/cache/apt/archives").glob("*.deb")), "downloads must not stay in the base"
    assert list(p.apt_cache.glob("*.deb")), "downloads are kept for the next cold build"
    assert not list((p.rootfs / "usr/share/man").rglob("*.gz")), "man pages are excluded"
    assert (p.rootfs / "usr/share/doc/python3/copyright").is_file(), "licences are kept"
    kver = (p.kernel.parent / "kernel-version").read_text().strip()
    mods = p.rootfs / "usr/lib/modules" / kver / "kernel"
    assert (mods / "drivers/net/ethernet/broadcom").is_dir()
    assert not list((mods / "sound").rglob("*.ko")), "sound modules are excluded"
    # live-boot must be in the initramfs, or the ISO cannot find its squashfs layers.
    listing = subprocess.run(["chroot", str(p.rootfs), "lsinitramfs", f"/boot/initrd.img-{kver}"],
                             capture_output=True, text=True, check=True).stdout
    assert "scripts/live" in listing and "lib/live/boot/9990-overlay.sh" in listing
    assert "squashfs.ko" in listing and "overlay.ko" in listing
