"""Stage 4: the squashfs layers the initrd stacks (boot=failback, or live-boot), and the list that orders them.

Three layers: the cached base (rootfs, big, rebuilt only when the base changes), the client's
locked dependencies (its venv without the client; rebuilt when the lock changes) and a small top
layer with the rendered overlay plus the client's own files (rebuilt when a template or client
code changes: a second or so). The initrd mounts the images named in /live/filesystem.module in order and stacks
them with overlayfs so that the LAST one listed is on top (9990-overlay.sh prepends each image
to its lower-directory list), hence: base first.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from image.core.mounts import require_no_mounts
from image.core.paths import REPO, code_digest, digest
from image.core.run import run
from image.stages.config import SquashfsConfig

log = logging.getLogger("image.stages.squashfs")

CODE = ("image/stages/squashfs.py",)  # this stage's code: editing it changes the layers' keys
# Not part of the live base: the kernel and initrd go to the ISO's /live separately.
BASE_EXCLUDES = ("boot/*",)


def mksquashfs_version() -> str:
    return run(["mksquashfs", "-version"], capture=True).stdout.splitlines()[0].strip()


def compression_args(sq: SquashfsConfig) -> list[str]:
    if sq.compression == "zstd":
        return ["-comp", "zstd", *(["-Xcompression-level", str(sq.level)] if sq.level else [])]
    if sq.compression == "xz":
        return ["-comp", "xz"]
    raise ValueError(f"squashfs.compression: unsupported {sq.compression!r} (zstd or xz)")


def mksquashfs(
    src: Path, dest: Path, sq: SquashfsConfig, epoch: int, *, excludes: tuple[str, ...] = (), all_root: bool = False
) -> float:
    """Make `dest` from `src` reproducibly: every timestamp is `epoch`. Returns the seconds taken."""
    if not src.is_dir():
        raise FileNotFoundError(f"squashfs: source tree {src} does not exist (run the earlier stages)")
    require_no_mounts(src, f"pack it into {dest.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    # mksquashfs refuses SOURCE_DATE_EPOCH together with -all-time; the flags say it all.
    cmd = [
        "env",
        "-u",
        "SOURCE_DATE_EPOCH",
        "mksquashfs",
        str(src),
        str(tmp),
        "-noappend",
        "-no-progress",
        "-quiet",
        *compression_args(sq),
        "-all-time",
        str(epoch),
        "-mkfs-time",
        str(epoch),
    ]
    if all_root:
        cmd.append("-all-root")
    if excludes:
        cmd += ["-wildcards", "-e", *excludes]
    log.info("squashfs: compressing %s -> %s (%s)...", src, dest.name, sq.compression)
    start = time.monotonic()
    run(cmd)
    elapsed = time.monotonic() - start
    tmp.replace(dest)
    log.info("squashfs: %s: %.1f MiB in %.1f s", dest.name, dest.stat().st_size / 2**20, elapsed)
    return elapsed


def base_layer_key(rootfs_key: str, sq: SquashfsConfig, tool_version: str, repo: Path = REPO) -> str:
    return digest("base-layer", code_digest(*CODE, repo=repo), rootfs_key, sq, tool_version, BASE_EXCLUDES)


def overlay_layer_key(
    overlay_key: str, client_key: str, sq: SquashfsConfig, epoch: int, tool_version: str, repo: Path = REPO
) -> str:
    return digest("overlay-layer", code_digest(*CODE, repo=repo), overlay_key, client_key, sq, epoch, tool_version)


def deps_layer_key(deps_key: str, sq: SquashfsConfig, epoch: int, tool_version: str, repo: Path = REPO) -> str:
    return digest("deps-layer", code_digest(*CODE, repo=repo), deps_key, sq, epoch, tool_version)


def build_base_layer(rootfs: Path, dest: Path, sq: SquashfsConfig, epoch: int) -> float:
    return mksquashfs(rootfs, dest, sq, epoch, excludes=BASE_EXCLUDES)


def build_deps_layer(deps_tree: Path, dest: Path, sq: SquashfsConfig, epoch: int) -> float:
    return mksquashfs(deps_tree, dest, sq, epoch, all_root=True)


def merge_trees(dest: Path, *trees: Path) -> None:
    """Copy several trees into a fresh `dest` (later ones may add to, not replace, earlier files)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for tree in trees:
        if not tree.is_dir():
            raise FileNotFoundError(f"squashfs: {tree} does not exist (run the earlier stages)")
        for item in sorted(tree.rglob("*")):
            rel = item.relative_to(tree)
            out = dest / rel
            if item.is_dir() and not item.is_symlink():
                if out.is_dir():
                    continue
                out.mkdir()
                shutil.copystat(item, out)
                continue
            if out.exists() or out.is_symlink():
                raise FileExistsError(f"squashfs: {rel} is in both the overlay and the client tree")
            if item.is_symlink():
                out.symlink_to(item.readlink())
            else:
                shutil.copy2(item, out)
    shutil.copystat(trees[0], dest)


def build_overlay_layer(overlay: Path, client: Path, dest: Path, sq: SquashfsConfig, epoch: int) -> float:
    staging = dest.with_name("overlay-layer-tree")
    merge_trees(staging, overlay, client)
    try:
        # The layer's files all belong to root (as in the rootfs), whoever checked the repo out.
        return mksquashfs(staging, dest, sq, epoch, all_root=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_module_file(dest: Path, layers: list[Path]) -> None:
    """/live/filesystem.module (live-boot's format, read by boot=failback too): image names, lowest first
    (the last is on top)."""
    dest.write_text("".join(f"{layer.name}\n" for layer in layers))
