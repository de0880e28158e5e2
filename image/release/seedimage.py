"""`inv seed`: a seed volume (label FBSEED, holding failback-seed.env) for an unattended failback.

The values come from a seed file (env or YAML format) and/or `--set KEY=VALUE` (which win), and are checked
with the client's own seed reader (client/SEED.md) before anything is written: a bad key or value stops the
build naming it. Two volume kinds, neither needs mounting or root:
- fat: a 1 MiB FAT12 image (mkfs.vfat -n FBSEED, the file copied in with mtools) for a USB stick (`dd`) or a
  virtual disk;
- iso: an ISO 9660 image (pycdlib, Rock Ridge + Joliet names) for a second CD drive.
The image holds credentials when the seed does: it is written mode 0600 and the values are never logged.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from failback_client import seed as seedmod

from image.core.errors import ImageError
from image.core.run import run

FAT_BYTES = 1024 * 1024
SEED_NAME = "failback-seed.env"
Kind = Literal["fat", "iso"]


class SeedImageError(ImageError, ValueError):
    """Bad seed input (key, value, file) or output path; the message names the bad part."""


@dataclass(frozen=True)
class SeedImage:
    path: Path
    kind: Kind
    keys: tuple[str, ...]

    def describe(self) -> str:
        shown = ", ".join(f"{k}=****" if k in seedmod.SECRET_KEYS else k for k in self.keys)
        return f"{self.path} ({self.kind}, label {seedmod.SEED_LABEL}): {shown}"


def parse_sets(sets: Iterable[str]) -> list[tuple[str, str]]:
    """`KEY=VALUE` words into pairs; the key is checked here, the value with the rest of the seed."""
    pairs = []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SeedImageError(f"--set {key or item!r}: write --set KEY=VALUE (e.g. --set AWS_REGION=eu-west-1)")
        problem = seedmod.key_problem(key)
        if problem:
            raise SeedImageError(f"--set {key}: {problem}")
        pairs.append((key, value))
    return pairs


def _quote(value: str) -> str:
    """A double-quoted env-format value (the client's reader undoes \\\\ and \\")."""
    if "\n" in value or "\r" in value:
        raise SeedImageError("seed values are single lines")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'


def seed_text(values: dict[str, str]) -> str:
    """The canonical failback-seed.env for `values` (already checked)."""
    lines = ["# failback seed (client/SEED.md), written by `inv seed`"]
    lines += [f"{k}={_quote(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def collect(seed_file: Path | None, sets: Iterable[str]) -> dict[str, str]:
    """The seed's values: the file's, overridden by --set; checked as the client checks them."""
    values: dict[str, str] = {}
    if seed_file is not None:
        try:
            data = seed_file.read_bytes()
        except OSError as e:
            raise SeedImageError(f"seed file {seed_file}: {e.strerror}") from None
        source = f"file {seed_file}"
        try:
            text = seedmod._decode(data, source)
            parsed = seedmod.parse(text, source, yaml_format=seed_file.suffix in (".yaml", ".yml"))
        except seedmod.SeedError as e:
            raise SeedImageError(str(e)) from None
        values.update(parsed.env())
    set_pairs = parse_sets(sets)
    seen: set[str] = set()
    for key, value in set_pairs:
        if key in seen:
            raise SeedImageError(f"--set {key}: given twice")
        problem = seedmod.value_problem(key, value)
        if problem:
            raise SeedImageError(f"--set {key}: {problem}")
        seen.add(key)
        values[key] = value
    if not values:
        raise SeedImageError(
            "the seed is empty: give --file F and/or --set KEY=VALUE (keys: " + ", ".join(seedmod.KEYS) + ")"
        )
    text = seed_text(values)
    try:
        seedmod.parse_env(text, "to write")  # the client's own checks, on exactly what is written
    except seedmod.SeedError as e:
        raise SeedImageError(str(e)) from None
    return values


def _private_file(path: Path) -> None:
    """Create (or truncate) `path` with mode 0600 before anything secret goes in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def write_fat(out: Path, text: str) -> None:
    tmp = out.with_name(out.name + ".tmp")
    _private_file(tmp)
    with tmp.open("r+b") as f:
        f.truncate(FAT_BYTES)
    run(["mkfs.vfat", "-n", seedmod.SEED_LABEL, "-i", "5eed0001", str(tmp)], capture=True)
    with tempfile.TemporaryDirectory(prefix="fbseed-") as d:
        src = Path(d) / SEED_NAME
        _private_file(src)
        src.write_text(text)
        # -D o: overwrite silently; MTOOLS_SKIP_CHECK: image files have no partition table to check.
        run(
            ["mcopy", "-i", str(tmp), "-D", "o", str(src), f"::/{SEED_NAME}"],
            env={"MTOOLS_SKIP_CHECK": "1"},
            capture=True,
        )
    tmp.replace(out)


def write_iso(out: Path, text: str) -> None:
    import pycdlib

    data = text.encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=seedmod.SEED_LABEL)
    try:
        iso.add_fp(io.BytesIO(data), len(data), "/FAILBACK_SEED.ENV;1", rr_name=SEED_NAME, joliet_path=f"/{SEED_NAME}")
        tmp = out.with_name(out.name + ".tmp")
        _private_file(tmp)
        with tmp.open("r+b") as f:
            iso.write_fp(f)
    finally:
        iso.close()
    tmp.replace(out)


def build_seed_image(
    out: Path, *, seed_file: Path | None = None, sets: Iterable[str] = (), kind: Kind = "fat"
) -> SeedImage:
    """Check the values and write the seed volume image to `out` (mode 0600)."""
    if kind not in ("fat", "iso"):
        raise SeedImageError(f"--format {kind!r}: use fat (USB stick / disk) or iso (CD)")
    if out.is_dir():
        raise SeedImageError(f"--out {out} is a directory; give the image file's path, e.g. {out}/seed.img")
    values = collect(seed_file, sets)
    text = seed_text(values)
    (write_fat if kind == "fat" else write_iso)(out, text)
    return SeedImage(out, kind, tuple(values))
