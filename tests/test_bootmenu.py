"""Boot menus rendered from the image definition (image/bootmenu.py)."""

from __future__ import annotations

import dataclasses

import pytest

from image.bootmenu import BootMenuError, grub_quote, grub_words, render_grub, render_isolinux
from image.config import BootConfig, BootEntry, load_config


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
    assert render_isolinux(_cfg()) == """\
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
  LOCALBOOT 0x80
"""


def test_grub_menu_exact() -> None:
    assert render_grub(_cfg()) == """\
# Generated from image/image.yaml by image/bootmenu.py: edit the image definition, not this file.
# Debian's signed GRUB (gcdx64.efi) finds this file by searching for /.disk/info; serial, linux,
# search and iso9660 are built into it (Secure Boot forbids loading modules).
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
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
    # Hand control back to the firmware, which boots its next boot option (the local disk).
    exit
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
