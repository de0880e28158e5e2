"""One error family (image/core/errors.py) and one handler (tasks.failures): an expected failure is one line
on stderr and exit status 1; a traceback only with `inv --debug` or FAILBACK_DEBUG=1."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Exit

import tasks
from image.core.errors import ImageError
from image.core.run import CommandError, CommandTimeout, ToolNotFound, run
from image.stages.boot.iso import IsoError

REPO = Path(__file__).resolve().parent.parent


def _strays(root: Path, package: str) -> tuple[int, list[str]]:
    """(how many, which not derived from ImageError) of the classes named *Error / *Failure under root/package."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        mod = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Failure")):
                found.append((mod, node.name))
    return len(found), [
        f"{m}.{c}" for m, c in found if not issubclass(getattr(importlib.import_module(m), c), ImageError)
    ]


def test_every_error_class_in_image_derives_from_image_error() -> None:
    count, strays = _strays(REPO, "image")
    assert count >= 20  # the scan finds them (IsoError, EfiError, ConfigError, ...)
    assert not strays, f"not derived from image.core.errors.ImageError: {strays}"


def test_the_scan_names_a_planted_stray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "__init__.py").write_text("")
    (tmp_path / "planted" / "mod.py").write_text(
        "from image.core.errors import ImageError\n"
        "class GoodError(ImageError):\n    pass\n"
        "class StrayError(RuntimeError):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _strays(tmp_path, "planted") == (2, ["planted.mod.StrayError"])


def _one_line(body) -> Exit:  # type: ignore[no-untyped-def]
    with pytest.raises(Exit) as info, tasks.failures("demo"):
        body()
    assert info.value.code == 1
    assert isinstance(info.value.message, str) and "\n" not in info.value.message, info.value.message
    assert info.value.message.startswith("demo: ")
    return info.value


def test_run_raises_the_three_kinds() -> None:
    with pytest.raises(CommandError) as failed:
        run(["false"])
    assert type(failed.value) is CommandError and failed.value.returncode == 1
    with pytest.raises(CommandTimeout) as slow:
        run(["sleep", "5"], timeout=0.2)
    assert slow.value.returncode == -1 and isinstance(slow.value, CommandError)
    with pytest.raises(ToolNotFound) as missing:
        run(["no-such-tool-failback"])
    assert missing.value.returncode == 127 and isinstance(missing.value, CommandError)


@pytest.mark.parametrize(
    "cmd, timeout, words",
    [
        (["sh", "-c", "echo its-own-words >&2; exit 3"], None, "command failed with exit status 3: sh -c"),
        (["sleep", "5"], 0.2, "timed out after 0.2 s and was killed: sleep 5"),
        (["no-such-tool-failback", "--x"], None, "no-such-tool-failback: not installed"),
    ],
)
def test_a_failed_command_is_one_line(
    cmd: list[str], timeout: float | None, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_ = _one_line(lambda: run(cmd, capture=True, timeout=timeout))
    assert words in exit_.message
    if "its-own-words" in " ".join(cmd):
        assert "its-own-words" in capsys.readouterr().err  # the captured tail is shown above the line


def test_errors_tasks_stage_used_to_miss_are_one_line_too() -> None:
    """IsoError (and the other boot-media errors) reached the user as tracebacks before."""
    exit_ = _one_line(lambda: (_ for _ in ()).throw(IsoError("iso: bad thing\nsecond line; fix it")))
    assert exit_.message == "demo: iso: bad thing; second line; fix it"


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError), tasks.failures("demo"):
        1 / 0  # noqa: B018


def test_debug_mode_lets_the_error_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tasks.DEBUG_ENV, "1")
    with pytest.raises(CommandError), tasks.failures("demo"):
        run(["false"])


def _inv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / ".venv/bin/inv"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=120,
    )


def test_inv_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "image.yaml"
    bad.write_text("iso: [not, a, mapping\n")
    res = _inv("rootfs", "--config", str(bad), "--build-dir", str(tmp_path / "build"))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("rootfs: ")
    debug = _inv("rootfs", "--config", str(bad), "--build-dir", str(tmp_path / "build"), env={tasks.DEBUG_ENV: "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr
    flag = _inv("--debug", "rootfs", "--config", str(bad), "--build-dir", str(tmp_path / "build"))
    assert flag.returncode == 1 and "Traceback" in flag.stderr, flag.stderr


def test_debug_flag_is_invokes_core_option_only() -> None:
    assert tasks.debug_mode(["/x/.venv/bin/inv", "--debug", "build"])
    assert tasks.debug_mode(["inv", "-d", "bench.boot", "--way", "seabios-cd"])
    # After the task name, -d belongs to the task; under pytest (or any other program) it is not ours.
    assert not tasks.debug_mode(["inv", "seed", "-d", "x"])
    assert not tasks.debug_mode(["inv", "build"])
    assert not tasks.debug_mode(["pytest", "-d", "tests"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
