"""Windows registry hives, offline: Debian's python3-hivex (libhivex) loaded on purpose, the header checks
that decide whether a hive may be written, and the few reads and writes conversion needs.

Why the loader: python3-hivex installs into Debian's /usr/lib/python3/dist-packages, which neither the
development .venv nor the LiveCD's client venv (image/stages/clientenv.py) sees, and adding that whole directory to
sys.path would let every other Debian module shadow the venv's pinned ones. `load_hivex()` loads exactly the
two files of the package (the `libhivexmod` extension and the `hivex` package) from there, by path, and
nothing else. Both venvs run Debian's own python3 (same ABI as the extension).
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
REG_SZ, REG_EXPAND_SZ, REG_DWORD, REG_MULTI_SZ = 1, 2, 4, 7


class HivexMissing(RuntimeError):
    """python3-hivex is not installed (or not for this Python)."""


def load_hivex(dist: Path = DIST_PACKAGES) -> ModuleType:
    """The `hivex` module: importable already, or its two files loaded from Debian's dist-packages."""
    if "hivex" in sys.modules:
        return sys.modules["hivex"]
    try:
        import hivex

        return hivex
    except ImportError:
        pass
    ext = sorted(dist.glob(f"libhivexmod.cpython-{sys.version_info[0]}{sys.version_info[1]}-*.so"))
    pkg = dist / "hivex" / "__init__.py"
    if not ext or not pkg.is_file():
        raise HivexMissing(
            f"python3-hivex is not installed ({dist}/hivex and libhivexmod for Python "
            f"{sys.version_info[0]}.{sys.version_info[1]} not found): apt-get install python3-hivex"
        )
    for name, path, search in (("libhivexmod", ext[0], None), ("hivex", pkg, [str(pkg.parent)])):
        spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
        if spec is None or spec.loader is None:
            raise HivexMissing(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            sys.modules.pop(name, None)
            raise HivexMissing(f"cannot load {path}: {exc}") from None
    return sys.modules["hivex"]


# ---- the base block (first 4 KiB) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HiveHeader:
    primary_seq: int
    secondary_seq: int
    checksum_ok: bool

    @property
    def clean(self) -> bool:
        """Windows raises the primary sequence number before it writes and the secondary one after: equal
        numbers mean the last write finished (nothing is waiting in the transaction logs)."""
        return self.primary_seq == self.secondary_seq


def header_checksum(base: bytes) -> int:
    csum = 0
    for (word,) in struct.iter_unpack("<I", base[:508]):
        csum ^= word
    return {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(csum, csum)


def read_header(path: Path) -> HiveHeader:
    with open(path, "rb") as f:
        base = f.read(4096)
    if len(base) < 512 or base[:4] != b"regf":
        raise ValueError(f"{path} is not a registry hive (no 'regf' signature)")
    primary, secondary = struct.unpack_from("<II", base, 4)
    (stored,) = struct.unpack_from("<I", base, 508)
    return HiveHeader(primary, secondary, stored == header_checksum(base))


def find_ci(base: Path, rel: str) -> Path | None:
    """`rel` under `base`, each component matched case-insensitively (NTFS names are case-insensitive to
    Windows; ntfs-3g looks them up as written). None when a component is missing."""
    here = base
    for part in (p for p in rel.replace("\\", "/").split("/") if p):
        if (here / part).exists():
            here = here / part
            continue
        try:
            names = os.listdir(here)
        except OSError:
            return None
        match = next((n for n in sorted(names) if n.casefold() == part.casefold()), None)
        if match is None:
            return None
        here = here / match
    return here


def pending_logs(hive: Path) -> list[Path]:
    """The hive's transaction logs that hold data (SYSTEM.LOG1, SYSTEM.LOG2, the older SYSTEM.LOG)."""
    out = []
    for suffix in (".LOG1", ".LOG2", ".LOG"):
        log = find_ci(hive.parent, hive.name + suffix)
        if log is not None and log.is_file() and log.stat().st_size > 0:
            out.append(log)
    return out


def dirty_reason(hive: Path) -> str:
    """Why `hive` must not be written ("" when it may): committing over a hive whose last write did not
    finish marks it clean and throws away what its logs hold."""
    header = read_header(hive)
    if not header.checksum_ok:
        return f"{hive.name}: the header checksum is wrong (a damaged or half-written hive)"
    if header.clean:
        return ""
    logs = pending_logs(hive)
    seq = f"sequence numbers {header.primary_seq} and {header.secondary_seq} differ"
    if logs:
        return (
            f"{hive.name} has pending transaction logs ({', '.join(p.name for p in logs)}; header {seq}): "
            "Windows did not finish writing it"
        )
    return f"{hive.name} was being written when it was copied (header {seq}) and has no log to finish it"


# ---- reading and writing ------------------------------------------------------------------------------------


class Hive:
    """A hive opened with hivex. Node paths are lists of key names (matched case-insensitively by hivex)."""

    def __init__(self, path: Path, *, write: bool = False) -> None:
        self.path = path
        self.h: Any = load_hivex().Hivex(os.fspath(path), write=write)

    def node(self, *names: str) -> int | None:
        node = self.h.root()
        for name in names:
            node = self.h.node_get_child(node, name)
            if not node:
                return None
        return node

    def children(self, node: int) -> dict[str, int]:
        return {self.h.node_name(c): c for c in self.h.node_children(node)}

    def value(self, node: int, name: str) -> tuple[int, bytes] | None:
        try:
            val = self.h.node_get_value(node, name)
        except RuntimeError:  # the binding raises ("Success") for a value that is not there
            return None
        if not val:
            return None
        return self.h.value_value(val)

    def dword(self, node: int, name: str) -> int | None:
        got = self.value(node, name)
        if got is None or got[0] != REG_DWORD or len(got[1]) < 4:
            return None
        return struct.unpack_from("<I", got[1])[0]

    def string(self, node: int, name: str) -> str | None:
        got = self.value(node, name)
        if got is None or got[0] not in (REG_SZ, REG_EXPAND_SZ):
            return None
        return got[1].decode("utf-16-le", errors="replace").split("\0", 1)[0]

    def strings(self, node: int, name: str) -> list[str]:
        got = self.value(node, name)
        if got is None or got[0] not in (REG_SZ, REG_MULTI_SZ):
            return []
        return [s for s in got[1].decode("utf-16-le", errors="replace").split("\0") if s]

    def values(self, node: int) -> dict[str, tuple[int, bytes]]:
        return {self.h.value_key(v): self.h.value_value(v) for v in self.h.node_values(node)}

    def set_dword(self, node: int, name: str, value: int) -> None:
        self.h.node_set_value(node, {"key": name, "t": REG_DWORD, "value": struct.pack("<I", value)})

    def delete(self, node: int) -> None:
        self.h.node_delete_child(node)

    def commit(self) -> None:
        """Write the hive back into its own file (in place: the file keeps its NTFS security descriptor)."""
        self.h.commit(None)

    def close(self) -> None:
        self.h = None
