"""Stage 7: checksums beside the artifact.

`<artifact>.sha512` holds the bare lower-case hex digest and a newline (the format of the real
per-region hashes bucket); `SHA512SUMS` holds `<digest>  <name>` lines that `sha512sum -c`
accepts when run in the artifact's directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20
CODE = ("image/stages/hashes.py",)  # this stage's code: editing it changes the key


def sha512_file(path: Path | str, size: int | None = None) -> str:
    """The sha512 of a file, read in 1 MiB chunks (ISOs do not fit in memory comfortably); with `size`, of its
    first `size` bytes only (a disk image compared with a smaller source volume). A shorter file is an error."""
    h = hashlib.sha512()
    left = size
    with Path(path).open("rb") as f:
        while left is None or left > 0:
            chunk = f.read(_CHUNK if left is None else min(left, _CHUNK))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    if left:
        raise ValueError(f"{path} ended {left} bytes before the {size} bytes to hash")
    return h.hexdigest()


def write_hashes(artifact: Path) -> tuple[Path, Path]:
    """Write `<artifact>.sha512` and `SHA512SUMS` beside `artifact`; returns both paths.

    SHA512SUMS keeps lines for other files already listed in it (e.g. a second artifact) and
    replaces the line for this one.
    """
    artifact = Path(artifact)
    if not artifact.is_file():
        raise FileNotFoundError(f"hashes: {artifact} does not exist (build the ISO first)")
    hexdigest = sha512_file(artifact)
    single = artifact.with_name(artifact.name + ".sha512")
    single.write_text(hexdigest + "\n")
    sums = artifact.with_name("SHA512SUMS")
    lines: dict[str, str] = {}
    if sums.exists():
        for line in sums.read_text().splitlines():
            digest_part, sep, name = line.partition("  ")
            if sep and name and name != artifact.name and (artifact.parent / name).exists():
                lines[name] = digest_part
    lines[artifact.name] = hexdigest
    sums.write_text("".join(f"{d}  {n}\n" for n, d in sorted(lines.items())))
    return single, sums
