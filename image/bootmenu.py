"""Boot menus rendered from the image definition's `boot` section: isolinux (BIOS) and GRUB (UEFI).

Both menus list the same entries in the same order, with the same default and timeout; each live
entry boots /live/vmlinuz with `kernel_cmdline` + the entry's own `cmdline`, and `local_disk`
entries hand over to the first local disk (isolinux `LOCALBOOT 0x80`, GRUB `exit` back to the
firmware's next boot option). Both menus run on the screen and on the first serial port at 115200.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

if TYPE_CHECKING:
    from image.config import ImageConfig

TEMPLATES = Path(__file__).resolve().parent / "templates"
KERNEL_PATH = "/live/vmlinuz"
INITRD_PATH = "/live/initrd.img"
MENU_TITLE = "AWS DRS Failback Client"

# Words GRUB's parser takes literally; anything else is single-quoted.
_GRUB_PLAIN = re.compile(r"^[A-Za-z0-9_./,:=+@%^-]+$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BootMenuError(ValueError):
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
        if any(c in e.cmdline for c in "\r\n"):
            raise BootMenuError(f"{key}.cmdline: must be a single line")
        full = "" if e.local_disk else " ".join(f"{cfg.kernel_cmdline} {e.cmdline}".split())
        out.append(MenuEntry(e.id, e.label, e.local_disk, full))
    if cfg.boot.default not in {e.id for e in out}:
        raise BootMenuError(f"{src}: boot.default: {cfg.boot.default!r} is not the id of an entry")
    return out


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["grub_quote"] = grub_quote
    env.filters["grub_words"] = grub_words
    return env


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
    }


def render_isolinux(cfg: ImageConfig) -> str:
    """isolinux.cfg for the BIOS boot (CD and USB)."""
    return _env().get_template("isolinux.cfg.j2").render(_values(cfg))


def render_grub(cfg: ImageConfig) -> str:
    """grub.cfg for the UEFI boot (CD and USB, Secure Boot on or off)."""
    return _env().get_template("grub.cfg.j2").render(_values(cfg))
