"""Where every stage puts its products and caches under the build directory (default `build/`).

Stages skip their work when the key of their inputs equals the one stamped after their last
successful run; the stamp is written last, so an interrupted stage simply runs again. Every key
includes `code_digest` of the stage's own code and data files and of the image modules they import,
so editing a stage or the code it uses rebuilds it (and what comes after it) without anyone bumping a
version number or keeping a list.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUILD = REPO / "build"


@dataclass(frozen=True)
class BuildPaths:
    root: Path  # build/ (or build/repro-a, ...)
    # Where downloads (.debs, wheels) are kept; None = this build's own cache. Downloads are
    # inputs, not products: the reproducibility builds share the main build's.
    downloads: Path | None = None

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def stamps(self) -> Path:
        return self.cache / "stamps"

    # rootfs stage
    @property
    def rootfs(self) -> Path:
        return self.cache / "rootfs"

    @property
    def manifest(self) -> Path:  # dpkg-query of the rootfs: "package<TAB>version<TAB>arch"
        return self.cache / "filesystem.packages"

    @property
    def kernel(self) -> Path:
        return self.cache / "boot" / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.cache / "boot" / "initrd.img"

    # overlay + client stages
    @property
    def overlay(self) -> Path:  # rendered overlay/ tree
        return self.cache / "overlay"

    @property
    def client(self) -> Path:  # tree holding the client's own files in <cfg.client.venv>
        return self.cache / "client"

    @property
    def client_deps(self) -> Path:  # tree holding <cfg.client.venv> with the locked dependencies only
        return self.cache / "client-deps"

    @property
    def client_full(self) -> Path:  # tree holding the complete venv (dependencies + client)
        return self.cache / "client-full"

    @property
    def wheels(self) -> Path:  # downloaded dependency wheels, one directory per lock-file hash
        return (self.downloads or self.cache) / "wheels"

    @property
    def apt_cache(self) -> Path:  # downloaded .debs
        return (self.downloads or self.cache) / "apt"

    # squashfs stage
    @property
    def layers(self) -> Path:
        return self.cache / "layers"

    @property
    def base_layer(self) -> Path:
        return self.layers / "00-base.squashfs"

    @property
    def deps_layer(self) -> Path:
        return self.layers / "05-deps.squashfs"

    @property
    def overlay_layer(self) -> Path:
        return self.layers / "10-overlay.squashfs"

    @property
    def module_file(self) -> Path:  # the list of layers the initrd stacks, lowest first
        return self.layers / "filesystem.module"

    # bootloader stage: Debian's signed shim/GRUB/MokManager, unpacked in cache/efi/<package>_<version>/
    @property
    def boot_loader_manifest(self) -> Path:  # JSON: package, version, arch, sha256 of each file used
        return self.cache / "bootloader.json"

    @property
    def boot_loader_packages(self) -> Path:  # the same packages as "package<TAB>version<TAB>arch" lines
        return self.cache / "bootloader.packages"

    @property
    def iso_cache(self) -> Path:
        return self.cache / "iso"

    def artifact(self, name: str) -> Path:
        return self.out / name

    def out_manifest(self, artifact_name: str) -> Path:
        return self.out / (Path(artifact_name).stem + ".packages")

    def out_boot_loader_packages(self, artifact_name: str) -> Path:
        return self.out / (Path(artifact_name).stem + ".bootloader.packages")

    # stamps
    def stamp(self, stage: str) -> Path:
        return self.stamps / f"{stage}.key"

    def is_fresh(self, stage: str, key: str) -> bool:
        try:
            return self.stamp(stage).read_text().strip() == key
        except FileNotFoundError:
            return False

    def mark_done(self, stage: str, key: str) -> None:
        self.stamps.mkdir(parents=True, exist_ok=True)
        tmp = self.stamp(stage).with_suffix(".tmp")
        tmp.write_text(key + "\n")
        tmp.replace(self.stamp(stage))

    def invalidate(self, stage: str) -> None:
        self.stamp(stage).unlink(missing_ok=True)


def digest(*parts: Any) -> str:
    """A stable key (sha256 hex) of JSON-able values."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tree_digest(root: Path, *, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over a directory tree: relative paths, modes, symlink targets and file contents."""
    h = hashlib.sha256()
    if not root.exists():
        return h.hexdigest()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(part in exclude for part in path.relative_to(root).parts):
            continue
        st = path.lstat()
        h.update(f"{rel}\0{st.st_mode:o}\0".encode())
        if path.is_symlink():
            h.update(str(path.readlink()).encode())
        elif path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        h.update(b"\n")
    return h.hexdigest()


CODE_EXCLUDE = ("__pycache__",)


def _module_file(name: str, repo: Path) -> Path | None:
    """The file of module `name` under `repo` (image.stages.rootfs -> image/stages/rootfs.py), if it is ours."""
    parts = name.split(".")
    if parts[0] != "image":
        return None
    base = repo.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_files(path: Path, repo: Path) -> set[Path]:
    """The files of every image module `path` imports, at the top or inside a function, and of the packages
    above them (Python runs a package's __init__ before its modules)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from image.stages import templating` imports a module; `from image.core.run import run` does
            # not (image/core/run/run.py does not exist), so trying both is safe.
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    files = set()
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            found = _module_file(".".join(parts[:depth]), repo)
            if found is not None:
                files.add(found)
    return files


def owns_a_key(path: Path) -> bool:
    """A module that declares `CODE = (...)` at its top level is a stage (or a fixture) with a key of its own."""
    return any(
        isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Tuple)
        and any(isinstance(t, ast.Name) and t.id == "CODE" for t in node.targets)
        for node in ast.parse(path.read_bytes(), str(path)).body
    )


def code_closure(roots: set[Path], repo: Path) -> set[Path]:
    """`roots` and, for the Python files among them, every image module they import, transitively, except
    modules that own a key (another stage's code reaches this key through that stage's key or products,
    as the pipeline wires them). So shared code (config, run, mounts, templating, ...) is in the key of every
    stage that uses it, and no one keeps that list by hand."""
    found = set(roots)
    todo = [f for f in roots if f.suffix == ".py"]
    while todo:
        for imported in _imported_files(todo.pop(), repo):
            if imported not in found and not owns_a_key(imported):
                found.add(imported)
                todo.append(imported)
    return found


def code_digest(*paths: str, repo: Path = REPO) -> str:
    """sha256 of a stage's own code and data: `paths` are repo-relative files, directories (every file
    under them) or glob patterns, e.g. "image/stages/rootfs.py", "image/stages/templates/initramfs-*",
    and the image modules their Python files import (`code_closure`).

    Only repo-relative names, the executable bit and contents go in (no mtimes, no absolute paths), so
    two checkouts of one commit agree; __pycache__ is left out. A path that matches nothing is an
    error: a renamed module must not silently drop out of a key."""
    files: set[Path] = set()
    for pattern in paths:
        matches = sorted(repo.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"code_digest: {pattern} matches nothing under {repo}")
        for m in matches:
            found = [m] if m.is_file() else [f for f in m.rglob("*") if f.is_file()]
            files.update(f for f in found if not any(part in CODE_EXCLUDE for part in f.relative_to(repo).parts))
    h = hashlib.sha256()
    for f in sorted(code_closure(files, repo), key=lambda f: f.relative_to(repo).as_posix()):
        executable = "x" if f.stat().st_mode & 0o111 else "-"
        h.update(f"{f.relative_to(repo).as_posix()}\0{executable}\0".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()
