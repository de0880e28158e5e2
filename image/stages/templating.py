"""The build's own Jinja2 templates (image/stages/templates/): the initramfs settings the rootfs stage
writes and the boot menus the ISO stage writes, rendered by one environment (strict: an undefined
value is an error, not an empty string). The overlay's templates have their own (overlay.py names the
template and line of an undefined value)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"


def environment(filters: dict[str, Callable[..., Any]] | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # shell, GRUB and isolinux text, not HTML
    )
    env.filters.update(filters or {})
    return env
