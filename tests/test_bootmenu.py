"""Boot menus rendered from the image definition (image/stages/boot/bootmenu.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from image.core.run import run
from image.stages import bootloader
from image.stages.boot import bootmenu
from image.stages.boot.bootmenu import BootMenuError, grub_quote, grub_words, render_grub, render_isolinux
from image.stages.config import BootConfig, BootEntry, load_config

REPO = Path(__file__).resolve().parent.parent


def _cfg(timeout: int = 3, default: str = "live", cmdline_extra: str = "console=ttyS0,115200n8"):
    base = load_config()
    boot = BootConfig(
        timeout=timeout,
        default=default,
        entries=(
            BootEntry(id="live", label="Failback Client", cmdline=f"console=tty0 {cmdline_extra}"),
            BootEntry(id="serial", label="Serial only", cmdline="console=ttyS0,115200n8"),
            BootEntry(id="disk", label="Boot from first local disk", local_disk=True),
        ),
    )
    return dataclasses.replace(base, kernel_cmdline="boot=live  components quiet", boot=boot)


def test_isolinux_menu_exact() -> None:
    assert (
        render_isolinux(_cfg())
        == """\
# Generated from image/image.yaml by image/bootmenu.py: edit the image definition, not this file.
# SERIAL must come first: it makes the menu usable on COM1 (IPMI SOL) as well as on the screen.
SERIAL 0 115200
UI menu.c32
PROMPT 0
TIMEOUT 30
DEFAULT live
MENU TITLE AWS DRS Failback Client

LABEL live
  MENU LABEL Failback Client
  MENU DEFAULT
  KERNEL /live/vmlinuz
  APPEND initrd=/live/initrd.img boot=live components quiet console=tty0 console=ttyS0,115200n8

LABEL serial
  MENU LABEL Serial only
  KERNEL /live/vmlinuz
  APPEND initrd=/live/initrd.img boot=live components quiet console=ttyS0,115200n8

LABEL disk
  MENU LABEL Boot from first local disk
  # The first BIOS hard disk whose MBR is not this image's (image/localdisk.S): 0x80 from a CD, the
  # next disk from a USB stick. LOCALBOOT 0x80 would boot the stick itself again.
  BOOT /isolinux/localdisk.bs
"""
    )


def test_grub_menu_exact() -> None:
    assert render_grub(_cfg()) == GRUB_EXACT.replace("LOADERS", " ".join(bootmenu.UEFI_LOADERS))


GRUB_EXACT = """\
# Generated from image/image.yaml by image/bootmenu.py: edit the image definition, not this file.
# Debian's signed GRUB (gcdx64.efi) finds this file by searching for /.disk/info; serial, linux,
# search, iso9660, gfxterm and chain are built into it (Secure Boot forbids loading modules).
serial --unit=0 --speed=115200
terminal_input console serial
# Firmware console redirection (OVMF always, servers for IPMI SOL) copies the firmware console onto
# this serial port in its own terminal type: PC-ANSI turns GRUB's menu borders into CP437 bytes, on
# top of the copy GRUB's own serial terminal draws. So the screen is drawn with gfxterm (straight
# into the framebuffer, which nothing copies to serial) and the serial port carries only GRUB's own,
# plain-ASCII menu (+-| borders). `loadfont unicode` takes the font from the signed GRUB's memdisk:
# Secure Boot refuses font files from the medium. No font or no framebuffer: the firmware console.
terminal_output console serial
if loadfont unicode; then
    if ! terminal_output gfxterm serial; then
        terminal_output console serial
    fi
fi
set timeout=3
set default=live

menuentry 'Failback Client' --id live {
    linux /live/vmlinuz boot=live components quiet console=tty0 console=ttyS0,115200n8
    initrd /live/initrd.img
}

menuentry 'Serial only' --id serial {
    linux /live/vmlinuz boot=live components quiet console=ttyS0,115200n8
    initrd /live/initrd.img
}

menuentry 'Boot from first local disk' --id disk {
    # The first disk that is not this medium ($root is where /.disk/info was found: cdN from a CD,
    # hdN from a USB stick), and on it the first FAT partition with a known UEFI boot loader.
    # None found: hand control back to the firmware, which boots its next boot option.
    regexp --set=1:medium '^([^,]+)' "$root"
    set found=
    set loader=
    for d in hd0 hd1 hd2 hd3 hd4 hd5 hd6 hd7; do
        if [ -n "$found" -o "$d" = "$medium" ]; then continue; fi
        for p in 1 2 3 4 5 6 7 8; do
            # (GRUB's script has no &&: one if per condition.)
            if [ -n "$found" ]; then break; fi
            set fs=
            if probe --set=fs --fs ($d,$p); then true; fi
            if [ "$fs" != fat ]; then continue; fi
            for f in LOADERS; do
                if [ -z "$found" -a -f ($d,$p)$f ]; then set found=$d,$p; set loader=$f; fi
            done
        done
    done
    if [ -n "$found" ]; then
        echo "Booting ($found)$loader"
        # chainloader hands the loader the device of $root (not of the file) as its own.
        set root=$found
        chainloader $loader
    else
        echo "No local disk with a UEFI boot loader: handing back to the firmware"
        sleep 3
        exit
    fi
}
"""


def test_default_image_definition_menus_list_every_entry() -> None:
    cfg = load_config()
    iso, grub = render_isolinux(cfg), render_grub(cfg)
    for e in cfg.boot.entries:
        assert f"LABEL {e.id}\n  MENU LABEL {e.label}\n" in iso
        assert f"menuentry '{e.label}' --id {e.id} {{" in grub
    assert f"DEFAULT {cfg.boot.default}\n" in iso
    assert f"set default={cfg.boot.default}\n" in grub
    assert f"TIMEOUT {cfg.boot.timeout * 10}\n" in iso
    assert iso.startswith("#") and iso.splitlines()[2] == "SERIAL 0 115200"


def test_zero_timeout_does_not_mean_wait_forever_in_isolinux() -> None:
    cfg = _cfg(timeout=0)
    assert "TIMEOUT 1\n" in render_isolinux(cfg)  # isolinux: 0 would wait forever
    assert "set timeout=0\n" in render_grub(cfg)


def test_grub_quoting() -> None:
    assert grub_quote("it's") == "'it'\\''s'"
    assert grub_words("boot=live  a;b $x console=ttyS0,115200n8") == "boot=live 'a;b' '$x' console=ttyS0,115200n8"
    cfg = _cfg(cmdline_extra="live-config.hooks=a;b")
    assert "console=tty0 'live-config.hooks=a;b'\n" in render_grub(cfg)
    assert "console=tty0 live-config.hooks=a;b\n" in render_isolinux(cfg)  # isolinux takes the line as is


def test_bad_default_is_named() -> None:
    with pytest.raises(BootMenuError, match=r"boot\.default: 'nope' is not the id of an entry"):
        render_grub(_cfg(default="nope"))


def test_bad_entry_id_is_named() -> None:
    cfg = _cfg()
    bad = dataclasses.replace(cfg.boot, entries=(BootEntry(id="two words", label="x"), *cfg.boot.entries))
    with pytest.raises(BootMenuError, match=r"boot\.entries\[0\]\.id"):
        render_isolinux(dataclasses.replace(cfg, boot=bad))


# --- serial console and "boot from first local disk" (issue 18, item 5) -----------------------------


def test_menus_are_plain_ascii_and_labels_must_be() -> None:
    """A serial console shows anything else as stray characters."""
    cfg = load_config()
    for text in (render_isolinux(cfg), render_grub(cfg)):
        assert text.isascii()
    bad = dataclasses.replace(cfg.boot, entries=(BootEntry(id="x", label="Récupération"), *cfg.boot.entries))
    with pytest.raises(BootMenuError, match=r"boot\.entries\[0\]\.label: .*ASCII.*'é'"):
        render_grub(dataclasses.replace(cfg, boot=bad))


def test_grub_draws_the_screen_with_gfxterm_and_falls_back_to_the_firmware_console() -> None:
    grub = render_grub(_cfg())
    # The screen through the framebuffer, the serial port through GRUB's own ASCII terminal; the
    # firmware console (which firmware redirection copies onto the same port) only as a fallback.
    assert "serial --unit=0 --speed=115200\n" in grub
    assert (
        "\nif loadfont unicode; then\n    if ! terminal_output gfxterm serial; then\n"
        "        terminal_output console serial\n    fi\nfi\n" in grub
    )
    # The memdisk font by name: a path to a font file is refused under Secure Boot.
    assert "loadfont /" not in grub and "loadfont (" not in grub and "$prefix/fonts" not in grub
    assert grub.index("terminal_output console serial") < grub.index("if loadfont")
    assert grub.index("fi\nset timeout") > grub.index("terminal_output gfxterm serial")


def _local_disk_block(grub: str) -> str:
    m = re.search(r"menuentry 'Boot from first local disk' --id disk \{\n(.*?)\n\}\n", grub, re.S)
    assert m, grub
    return m.group(1)


def test_grub_local_disk_skips_the_medium_and_chainloads_from_its_own_partition() -> None:
    block = _local_disk_block(render_grub(_cfg()))
    assert "exit" not in block.split("else")[0]  # the firmware's next boot option is only the fallback
    assert "regexp --set=1:medium '^([^,]+)' \"$root\"" in block  # cd0 / hd1 from cd0 / hd1,msdos1
    assert f"for d in {' '.join(f'hd{n}' for n in range(bootmenu.MAX_DISKS))}; do" in block
    assert 'if [ -n "$found" -o "$d" = "$medium" ]; then continue; fi' in block
    assert f"for p in {' '.join(str(n) for n in range(1, bootmenu.MAX_PARTITIONS + 1))}; do" in block
    assert 'if [ "$fs" != fat ]; then continue; fi' in block
    assert f"for f in {' '.join(bootmenu.UEFI_LOADERS)}; do" in block
    assert bootmenu.UEFI_LOADERS[-1] == "/EFI/BOOT/BOOTX64.EFI"  # the removable-media path comes last
    # GRUB gives a chainloaded image the device of $root, not that of the file: set root first.
    assert block.index("set root=$found") < block.index("chainloader $loader")
    assert block.rstrip().endswith("exit\n    fi")


def test_isolinux_local_disk_runs_the_boot_sector_that_skips_the_medium() -> None:
    iso = render_isolinux(_cfg())
    assert "LOCALBOOT" not in iso.replace("# next disk from a USB stick. LOCALBOOT 0x80 would", "")
    assert "LABEL disk\n  MENU LABEL Boot from first local disk\n" in iso
    assert iso.rstrip().endswith("  BOOT /isolinux/localdisk.bs")


def grub_common_version(signed_version: str) -> str:
    """grub-common's version for a grub-efi-amd64-signed version: "1+2.06+13+deb12u2" is signed from
    grub2 "2.06-13+deb12u2" (Debian turns the grub2 version's '-' into '+' behind a "1+")."""
    upstream, _, revision = signed_version.removeprefix("1+").partition("+")
    return f"{upstream}-{revision}"


def test_grub_common_version() -> None:
    assert grub_common_version("1+2.06+13+deb12u2") == "2.06-13+deb12u2"


@pytest.fixture(scope="module")
def grub_script_check() -> Path:
    """GRUB's own parser from grub-common of the same grub2 build as the signed GRUB the bootloader stage
    fetched (that stage is brought up to date in build/ first), unpacked into the same cache."""
    from image.stages.pipeline import Pipeline

    pipe = Pipeline.from_files()
    pipe.build("bootloader")
    signed = bootloader.load_boot_loaders(pipe.paths.boot_loader_manifest, pipe.paths.cache).versions
    version = grub_common_version(signed["grub-efi-amd64-signed"])
    _version, tree = bootloader.fetch_package("grub-common", pipe.paths.cache, version, pipe.apt_sources)
    return tree / "usr/bin/grub-script-check"


@pytest.mark.network
def test_grub_menus_parse_with_grubs_own_parser(grub_script_check: Path, tmp_path: Path) -> None:
    """GRUB's script is not sh (no && or ||): what we render must parse as GRUB's."""
    for name, cfg in (("default", load_config()), ("test", _cfg())):
        path = tmp_path / f"{name}.cfg"
        path.write_text(render_grub(cfg))
        out = run([grub_script_check, path], capture=True, check=False)
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"
    # The check can fail: the sh idiom GRUB does not know.
    bad = tmp_path / "bad.cfg"
    bad.write_text(render_grub(_cfg()).replace('if [ -n "$found" ]; then break; fi', '[ -n "$found" ] && break'))
    assert run([grub_script_check, bad], capture=True, check=False).returncode != 0
