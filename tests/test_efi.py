"""The EFI boot image (image/stages/boot/efi.py): Debian's signed shim + GRUB in a FAT image made without mounting
(the fetching is the bootloader stage's: tests/test_bootloader.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from image.core.run import run
from image.stages import bootloader
from image.stages.boot import efi
from image.stages.config import load_config

MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull}


def mdir(img: Path, path: str) -> str:
    return run(["mdir", "-i", img, "-b", f"::/{path}"], capture=True, env=MTOOLS_ENV).stdout


def mread(img: Path, path: str, dest: Path) -> bytes:
    run(["mcopy", "-n", "-i", img, f"::/{path}", dest], env=MTOOLS_ENV)
    return dest.read_bytes()


@pytest.fixture(scope="module")
def efi_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the real packages fetched once for this module (the bootloader stage's work, ~2 MB)."""
    cache = tmp_path_factory.mktemp("efi-cache")
    bootloader.fetch_boot_loaders(cache, bootloader.AptSources.from_config(load_config()))
    return cache


def test_fat_image_from_small_files(tmp_path: Path) -> None:
    a = tmp_path / "a.bin"
    a.write_bytes(b"A" * 5000)
    img = efi.make_fat_image(
        {"EFI/BOOT/BOOTX64.EFI": a, "boot/grub/grub.cfg": b"echo hi\n"}, tmp_path / "x.img", 1_700_000_000
    )
    assert img.stat().st_size == 1024 * 1024  # 5 KB + slack, rounded up to whole MiB
    assert "::/EFI/BOOT/BOOTX64.EFI" in mdir(img, "EFI/BOOT")
    assert mread(img, "EFI/BOOT/BOOTX64.EFI", tmp_path / "out1") == a.read_bytes()
    assert mread(img, "boot/grub/grub.cfg", tmp_path / "out2") == b"echo hi\n"
    info = run(["minfo", "-i", img, "::"], capture=True, env=MTOOLS_ENV).stdout
    assert "EFIBOOT" in info
    assert "2B8D-0F1E" in run(["mdir", "-i", img, "::/"], capture=True, env=MTOOLS_ENV).stdout


def test_fat_image_is_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(os.urandom(20000))
    os.utime(src, (1_600_000_000, 1_600_000_000))
    files = {"EFI/BOOT/BOOTX64.EFI": src, "boot/grub/grub.cfg": b"x\n"}
    one = efi.make_fat_image(files, tmp_path / "1.img", 1_700_000_000).read_bytes()
    two = efi.make_fat_image(files, tmp_path / "2.img", 1_700_000_000).read_bytes()
    other = efi.make_fat_image(files, tmp_path / "3.img", 1_700_086_400).read_bytes()
    assert one == two
    assert one != other  # directory and grub.cfg dates follow SOURCE_DATE_EPOCH


def test_too_big_for_el_torito(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(40 * 1024 * 1024)  # sparse: the size check comes before any copying
    with pytest.raises(efi.EfiError, match="El Torito allows at most"):
        efi.make_fat_image({"EFI/BOOT/BOOTX64.EFI": big}, tmp_path / "x.img", 0)


@pytest.mark.network
def test_build_efi_image_holds_debian_signed_binaries(efi_cache: Path, tmp_path: Path) -> None:
    loaders = bootloader.fetch_boot_loaders(efi_cache, bootloader.AptSources.from_config(load_config()))
    image = efi.build_efi_image(loaders, tmp_path / "efi.img", 1_700_000_000)
    assert set(image.versions) == set(bootloader.EFI_PACKAGES)
    assert image.path.stat().st_size < efi.MAX_IMAGE_BYTES
    shim = next(efi_cache.glob("efi/shim-signed_*/usr/lib/shim/shimx64.efi.signed")).read_bytes()
    gcd = next(efi_cache.glob("efi/grub-efi-amd64-signed_*/usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed"))
    assert mread(image.path, "EFI/BOOT/BOOTX64.EFI", tmp_path / "shim") == shim
    assert mread(image.path, "EFI/BOOT/grubx64.efi", tmp_path / "grub") == gcd.read_bytes()
    assert mread(image.path, "EFI/BOOT/mmx64.efi", tmp_path / "mm")[:2] == b"MZ"
    assert mread(image.path, "boot/grub/grub.cfg", tmp_path / "cfg").decode() == efi.BRIDGE_CFG
    # Authenticode-signed PE files: a security directory (certificate table) is present.
    assert shim[:2] == b"MZ" and b"Microsoft Corporation UEFI CA" in shim
    # The FAT image must not satisfy GRUB's `search --file /.disk/info` itself.
    assert "info" not in run(["mdir", "-i", image.path, "-/", "-b", "::/"], capture=True, env=MTOOLS_ENV).stdout
    # The versions recorded are those of the unpacked trees.
    for pkg, version in image.versions.items():
        tree = next(efi_cache.glob(f"efi/{pkg}_*"))
        assert (tree / ".complete").read_text().strip() == version
