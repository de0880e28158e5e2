"""client/README.md's module table names every module of failback_client (and of convert/), and nothing gone."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "client" / "failback_client"
README = PACKAGE.parent / "README.md"


def _table() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Modules") :]
    return section[: section.index("\n## ", 1)]


def test_module_table_matches_the_package() -> None:
    table = _table()
    present = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.endswith(".pyc")}
    missing = sorted(n for n in present if f"`{n}`" not in table and f"`{n}/`" not in table)
    assert not missing, f"client/README.md's module table lacks {missing}"
    named = set(re.findall(r"^\| `([a-z_]+(?:\.py|/))`", table, re.M))
    gone = sorted(n for n in named if n.rstrip("/") not in present)
    assert not gone, f"client/README.md's module table names modules that do not exist: {gone}"


def test_convert_modules_are_all_named() -> None:
    row = next(line for line in _table().splitlines() if line.startswith("| `convert/`"))
    missing = sorted(p.name for p in (PACKAGE / "convert").glob("*.py") if f"`{p.name}`" not in row)
    assert not missing, f"client/README.md's convert/ row lacks {missing}"
