"""Every exit status of the client is in one place (failback_client.errors), and `--help` and client/README.md
list exactly those, with the same numbers."""

from __future__ import annotations

import re
from pathlib import Path

from failback_client import errors
from failback_client.cli import build_parser

README = Path(__file__).resolve().parents[1] / "client" / "README.md"


def _statuses() -> dict[str, int]:
    return {name: value for name, value in vars(errors).items() if name.startswith("EXIT_") and isinstance(value, int)}


def _readme_rows() -> dict[str, int]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Exit status") :]
    section = section[: section.index("\n## ", 1)]
    return {name: int(status) for status, name in re.findall(r"^\| (\d+) \|.*\| `(EXIT_\w+)` \|$", section, re.M)}


def test_readme_lists_every_exit_status_with_its_number() -> None:
    assert _readme_rows() == _statuses()


def test_help_lists_every_exit_status() -> None:
    epilog = build_parser().epilog or ""
    shown = epilog[epilog.index("exit status:") :]
    numbers = {int(n) for n in re.findall(r"(?:^|\s{2,})(\d+) [a-zA-Z(]", shown, re.M)}
    assert numbers == set(_statuses().values())


def test_statuses_are_distinct() -> None:
    values = list(_statuses().values())
    assert len(values) == len(set(values))
