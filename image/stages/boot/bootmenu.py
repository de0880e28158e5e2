"""Boot menus rendered from the image definition's `boot` section: isolinux (BIOS) and GRUB (UEFI).

Both menus list the same entries in the same order, with the same default and timeout; each live
entry boots /live/vmlinuz with `kernel_cmdline` + the entry's own `cmdline`, and `local_disk`
entries boot the first local disk that is not the medium the menu was started from (CD or USB):
isolinux runs localdisk.bs (image/stages/boot/localdisk.S), GRUB looks for a UEFI boot loader on the first
disk that is not its own and falls back to `exit` (the firmware's next boot option).
Both menus run on the screen and on the first serial port at 115200; GRUB draws the screen with
gfxterm so that the firmware's own serial redirection (which mirrors the firmware console, not the
framebuffer) carries no second, box-drawn copy of the menu: see grub.cfg.j2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from image.core.errors import ImageError
from image.stages import templating
from image.stages.boot import localdisk

if TYPE_CHECKING:
    from image.stages.config import ImageConfig

KERNEL_PATH = "/live/vmlinuz"
INITRD_PATH = "/live/initrd.img"
MENU_TITLE = "AWS DRS Failback Client"
# Where GRUB's "boot from first local disk" looks for a UEFI boot loader on each partition, in this
# order: the installed systems' own loaders first (the removable-media path on RHEL-likes starts
# shim's fallback, which rewrites the firmware's boot entries), the removable-media path last.
UEFI_LOADERS = (
    "/EFI/Microsoft/Boot/bootmgfw.efi",
    "/EFI/debian/shimx64.efi",
    "/EFI/ubuntu/shimx64.efi",
    "/EFI/redhat/shimx64.efi",
    "/EFI/centos/shimx64.efi",
    "/EFI/rocky/shimx64.efi",
    "/EFI/almalinux/shimx64.efi",
    "/EFI/amzn/shimx64.efi",
    "/EFI/opensuse/shim.efi",
    "/EFI/sles/shim.efi",
    "/EFI/BOOT/BOOTX64.EFI",
)
MAX_DISKS = 8  # GRUB's hd0..hd7
MAX_PARTITIONS = 8  # partitions 1..8 of each

# Words GRUB's parser takes literally; anything else is single-quoted.
_GRUB_PLAIN = re.compile(r"^[A-Za-z0-9_./,:=+@%^-]+$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BootMenuError(ImageError, ValueError):
    """The boot section cannot be expressed in a boot menu; the message names the key."""


@dataclass(frozen=True)
class MenuEntry:
    id: str
    label: str
    local_disk: bool
    full_cmdline: str  # kernel_cmdline + the entry's cmdline ("" for local_disk entries)


def grub_quote(word: str) -> str:
    """`word` as one GRUB shell word (single quotes; a ' inside is written '\\'')."""
    return "'" + word.replace("'", "'\\''") + "'"


def grub_words(cmdline: str) -> str:
    """A kernel command line as GRUB words: plain words stay as they are, others are quoted."""
    return " ".join(w if _GRUB_PLAIN.match(w) else grub_quote(w) for w in cmdline.split())


def _entries(cfg: ImageConfig) -> list[MenuEntry]:
    src = getattr(cfg, "path", "image definition")
    out = []
    for i, e in enumerate(cfg.boot.entries):
        key = f"{src}: boot.entries[{i}]"
        if not _ID.match(e.id):
            raise BootMenuError(f"{key}.id: {e.id!r} must be letters, digits, '-', '_' or '.' (it is a menu label)")
        if not e.label.strip() or any(c in e.label for c in "\r\n"):
            raise BootMenuError(f"{key}.label: must be a non-empty single line")
        if not e.label.isascii():
            odd = next(c for c in e.label if not c.isascii())
            raise BootMenuError(
                f"{key}.label: {e.label!r} must be plain ASCII ({odd!r} is not): serial consoles "
                "and GRUB's font show other characters as stray bytes or boxes"
            )
        if any(c in e.cmdline for c in "\r\n"):
            raise BootMenuError(f"{key}.cmdline: must be a single line")
        full = "" if e.local_disk else " ".join(f"{cfg.kernel_cmdline} {e.cmdline}".split())
        out.append(MenuEntry(e.id, e.label, e.local_disk, full))
    if cfg.boot.default not in {e.id for e in out}:
        raise BootMenuError(f"{src}: boot.default: {cfg.boot.default!r} is not the id of an entry")
    return out


def _env() -> jinja2.Environment:
    return templating.environment({"grub_quote": grub_quote, "grub_words": grub_words})


def _values(cfg: ImageConfig) -> dict[str, object]:
    path = getattr(cfg, "path", None)
    return {
        "source": f"image/{path.name}" if isinstance(path, Path) else "the image definition",
        "entries": _entries(cfg),
        "default": cfg.boot.default,
        "timeout": cfg.boot.timeout,
        # isolinux counts tenths of a second and takes 0 as "wait forever": a 0 s timeout becomes 0.1 s.
        "timeout_tenths": max(1, cfg.boot.timeout * 10),
        "title": MENU_TITLE,
        "kernel": KERNEL_PATH,
        "initrd": INITRD_PATH,
        "localdisk": localdisk.ISO_PATH,
        "uefi_loaders": UEFI_LOADERS,
        "max_disks": MAX_DISKS,
        "max_partitions": MAX_PARTITIONS,
    }


def render_isolinux(cfg: ImageConfig) -> str:
    """isolinux.cfg for the BIOS boot (CD and USB)."""
    return _env().get_template("isolinux.cfg.j2").render(_values(cfg))


def render_grub(cfg: ImageConfig) -> str:
    """grub.cfg for the UEFI boot (CD and USB, Secure Boot on or off)."""
    return _env().get_template("grub.cfg.j2").render(_values(cfg))
