"""`inv lint` fails on a planted error of each kind it checks, naming the check and the file.

The lint task runs in a copy of the tracked tree with one planted error per check: an unused import (ruff
check), a wrong return type (mypy), an unformatted file (ruff format --check) and an unquoted variable in
an overlay shell script (shellcheck). The copy uses this checkout's .venv, as `inv lint` does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PLANTS = {
    "ruff check": ("image/core/planted_unused.py", '"""Planted."""\n\nimport os\n'),
    "mypy": ("image/core/planted_type.py", '"""Planted."""\n\n\ndef size() -> int:\n    return "one"\n'),
    "ruff format --check": ("image/core/planted_format.py", '"""Planted."""\n\nSIZE = {  "a":1 }\n'),
    "shellcheck": ("overlay/usr/lib/failback/planted-check", "#!/bin/sh\n# Planted.\nrm -rf $1\n"),
}


def _copy_tracked(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file() or src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def _lint(repo: Path) -> subprocess.CompletedProcess[str]:
    # mypy's cache is the checkout's (.venv/mypy-cache): the copy gets its own, so it neither reuses nor
    # overwrites the checkout's entries.
    env = {**os.environ, "MYPY_CACHE_DIR": str(repo.parent / "mypy-cache")}
    return subprocess.run(
        [str(REPO / ".venv/bin/inv"), "lint"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _sections(stdout: str) -> dict[str, str]:
    """What each check printed, by the `lint: <check>` line the task prints before it."""
    sections: dict[str, str] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("lint: ") and line[6:] in PLANTS:
            current = line[6:]
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


@pytest.mark.slow
def test_lint_fails_on_a_planted_error_of_each_kind_naming_check_and_file(tmp_path: Path) -> None:
    repo = _copy_tracked(tmp_path / "repo")
    for rel, text in PLANTS.values():
        (repo / rel).write_text(text)
    (repo / PLANTS["shellcheck"][0]).chmod(0o755)
    result = _lint(repo)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "lint: failed: ruff check, mypy, ruff format --check, shellcheck" in out, out
    sections = _sections(result.stdout)
    assert set(sections) == set(PLANTS), sections.keys()
    # Each check names its own plant and none of the others'.
    for check in PLANTS:
        named = {c for c, (other, _) in PLANTS.items() if Path(other).name in sections[check]}
        assert named == {check}, f"{check} named the plants of {sorted(named)}:\n{sections[check]}"
    assert "F401" in sections["ruff check"]
    assert 'Incompatible return value type (got "str", expected "int")' in sections["mypy"]
    assert "would be reformatted" in sections["ruff format --check"]
    assert "SC2086" in sections["shellcheck"]


@pytest.mark.slow
def test_lint_passes_the_same_copy_without_the_plants(tmp_path: Path) -> None:
    """The copy is a faithful stand-in: unplanted, it passes (so the failures above are the plants')."""
    result = _lint(_copy_tracked(tmp_path / "repo"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lint: passed (ruff check, mypy, ruff format --check, shellcheck)" in result.stdout
