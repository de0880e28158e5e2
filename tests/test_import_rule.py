"""The import rule of image/ (README, "Where new code goes"): who may import whom.

- image.core imports no other image package (it is what everything else stands on);
- image.stages (the build stages, boot media included) import only image.core and image.stages;
- image.release may import core, stages and the client; image.vm and image.bench may import anything.
Imports are read with ast (top-level and inside functions alike), so a lazy import counts too.
The client package (failback_client) imports nothing its ISO venv lacks: not the downloaded replication
software, nor the test agent or control plane.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# package -> the image packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "stages": {"core"},
    "release": {"core", "stages"},
}
PACKAGES = ("core", "stages", "release", "vm", "bench")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "image":  # from image import x: x is the package
                out += [(node.lineno, f"image.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def violations(image_dir: Path) -> list[str]:
    """`file:line imports X` for every import that breaks the rule, under `image_dir`."""
    bad = []
    for path in sorted(image_dir.rglob("*.py")):
        rel = path.relative_to(image_dir)
        if len(rel.parts) < 2:
            continue  # image/__init__.py
        own = rel.parts[0]
        allowed = ALLOWED.get(own)
        if allowed is None:
            continue  # vm, bench: anything
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "image":
                continue
            target = parts[1] if len(parts) > 1 else ""
            if target != own and target not in allowed:
                bad.append(f"image/{rel.as_posix()}:{line} imports {name}")
    return bad


def test_every_module_is_in_a_package() -> None:
    loose = [p.name for p in (REPO / "image").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules directly in image/ (put them in one of {PACKAGES}): {loose}"
    assert {p.name for p in (REPO / "image").iterdir() if (p / "__init__.py").exists()} == set(PACKAGES)


def test_image_follows_the_import_rule() -> None:
    assert not violations(REPO / "image")


def test_a_planted_violation_is_named(tmp_path: Path) -> None:
    """The check can fail: a stage that imports release, and core importing a stage, are both reported."""
    for pkg in ("core", "stages/boot", "release", "vm"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "stages/boot/iso.py").write_text(
        "from image.core.run import run\nfrom image.stages import config\n"
        "def f():\n    from image.release.publish import cli\n"
    )
    (tmp_path / "core/paths.py").write_text("import image.stages.config\n")
    (tmp_path / "vm/qemu.py").write_text("from image.bench import boot\nfrom image import release\n")
    (tmp_path / "release/assets.py").write_text("from image import vm\nimport failback_client\n")
    assert violations(tmp_path) == [
        "image/core/paths.py:1 imports image.stages.config",
        "image/release/assets.py:1 imports image.vm",
        "image/stages/boot/iso.py:4 imports image.release.publish",
    ]


# Not in the ISO's client venv (image/stages/clientenv.py): the replication software is downloaded at run time,
# the agent and the control plane are test harnesses. The dev venv has them all, so only this check would notice
# the client importing one (on the LiveCD: ModuleNotFoundError at the first import of that module).
NOT_IN_THE_CLIENT_VENV = ("failback_replicator", "drs_agent", "drs_controlplane")


def client_violations(client_dir: Path) -> list[str]:
    """`file:line imports X` for every import in the client package of a package its venv does not hold."""
    return [
        f"{path.relative_to(client_dir.parent).as_posix()}:{line} imports {name}"
        for path in sorted(client_dir.rglob("*.py"))
        for line, name in _imports(path)
        if name.split(".")[0] in NOT_IN_THE_CLIENT_VENV
    ]


def test_the_client_imports_only_what_its_venv_holds() -> None:
    assert not client_violations(REPO / "client" / "failback_client")


def test_a_client_importing_the_replicator_is_named(tmp_path: Path) -> None:
    pkg = tmp_path / "failback_client"
    pkg.mkdir()
    (pkg / "bootmode.py").write_text("import struct\ndef f():\n    from failback_replicator.wire import FRAME_JSON\n")
    (pkg / "pairing.py").write_text("import drs_agent.pki\nfrom failback_client import errors\n")
    assert client_violations(pkg) == [
        "failback_client/bootmode.py:3 imports failback_replicator.wire",
        "failback_client/pairing.py:1 imports drs_agent.pki",
    ]
