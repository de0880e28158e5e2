"""Resume journal kept on the target side, one file per replicated volume.

It records, per block, the digest of what is verified on the local device (written, fsynced and
checked against the digest the agent sent) and the blocks currently "in flight" (about to be or
being written). Any restart — dropped link, restarted agent, rebooted LiveCD — resumes from it:
verified blocks whose digest still matches the source are never sent again, in-flight blocks are
treated as unknown and redone.

Format (binary, small: 32 bytes per block): a JSON header line, then one digest per block (all
zero bytes = not verified). Updated atomically: write tmp + fsync + rename + fsync(dir). The header
names the digest algorithm (protocol version 2 negotiates it; a journal without one was written by
a version-1 replicator: SHA-256). Digests of one algorithm are never compared with another's: when
a session uses another algorithm, the blocks the journal vouched for are re-read locally instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .wire import DIGEST_SHA256, DIGEST_SIZE

_UNKNOWN = bytes(DIGEST_SIZE)
MAGIC = "failback-replicator-journal/1"


class DigestTable:
    """One digest per block in a single bytearray: 32 bytes a block, all zeros = unknown.

    A list of bytes objects costs ~90 bytes a block (object header + pointer); on a 2 TiB disk of
    1 MiB blocks that alone was ~180 MiB of a 1 GiB LiveCD. This keeps it at 64 MiB and lets the
    journal be written straight from the table.
    """

    __slots__ = ("blocks", "buf", "known")

    def __init__(self, blocks: int, data: bytes | bytearray | None = None) -> None:
        """An empty table, or one over `data` (packed digests; a bytearray is used, not copied)."""
        if data is not None and len(data) != blocks * DIGEST_SIZE:
            raise ValueError(f"digest table of {len(data)} bytes for {blocks} blocks")
        self.blocks = blocks
        self.buf = data if isinstance(data, bytearray) else bytearray(data or blocks * DIGEST_SIZE)
        self.known = 0
        if data is not None:
            self.recount()

    def recount(self) -> None:
        """After `buf` was filled in place (journal load)."""
        self.known = self.blocks - sum(1 for _ in self.unknown())

    def __len__(self) -> int:
        return self.blocks

    def __getitem__(self, i: int) -> bytes | None:
        if not 0 <= i < self.blocks:
            raise IndexError(i)
        d = bytes(self.buf[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
        return None if d == _UNKNOWN else d

    def __setitem__(self, i: int, d: bytes | None) -> None:
        if not 0 <= i < self.blocks:
            raise IndexError(i)
        new = d if d is not None else _UNKNOWN
        if len(new) != DIGEST_SIZE:
            raise ValueError(f"a digest has {DIGEST_SIZE} bytes, not {len(new)}")
        o = i * DIGEST_SIZE
        self.known += (new != _UNKNOWN) - (self.buf[o : o + DIGEST_SIZE] != _UNKNOWN)
        self.buf[o : o + DIGEST_SIZE] = new

    def __iter__(self) -> Iterator[bytes | None]:
        return (self[i] for i in range(self.blocks))

    def known_mask(self) -> bytearray:
        """One byte a block: 1 where a digest is known."""
        mask = bytearray(b"\x01") * self.blocks
        for i in self.unknown():
            mask[i] = 0
        return mask

    def unknown(self) -> Iterator[int]:
        """Indices without a digest (scans in 32 KiB steps: a mostly known table costs little)."""
        step = 1024
        zeros = bytes(step * DIGEST_SIZE)
        for first in range(0, self.blocks, step):
            n = min(step, self.blocks - first)
            chunk = self.buf[first * DIGEST_SIZE : (first + n) * DIGEST_SIZE]
            if chunk == zeros[: len(chunk)]:
                yield from range(first, first + n)
            elif _UNKNOWN in chunk:  # else no digest in it is all zeros
                for k in range(n):
                    if chunk[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE] == _UNKNOWN:
                        yield first + k

    def differing(self, other: bytes | bytearray | memoryview) -> list[int]:
        """Blocks whose digest here differs from `other` (a packed table of the same geometry) or is
        unknown here. Equal 32 KiB stretches cost one comparison, so a delta is ~a memcmp."""
        if len(other) != len(self.buf):
            raise ValueError("digest tables of different sizes")
        n, step = DIGEST_SIZE, 1024 * DIGEST_SIZE
        out: list[int] = []
        mine, theirs = memoryview(self.buf), memoryview(other)
        for off in range(0, len(self.buf), step):
            a, b = bytes(mine[off : off + step]), bytes(theirs[off : off + step])
            if a == b and _UNKNOWN not in a:
                continue
            for k in range(0, len(a), n):
                d = a[k : k + n]
                if d != b[k : k + n] or d == _UNKNOWN:
                    out.append((off + k) // n)
        return out


class JournalMismatch(Exception):
    """The journal on disk belongs to another volume/source/geometry; it is ignored (full compare)."""


@dataclass
class Journal:
    path: Path
    identity: dict[str, object]  # what the journal is about: source volume, target, sizes, block size
    blocks: int
    verified: DigestTable = field(default=None)  # type: ignore[assignment]  # None only until __post_init__
    inflight: set[int] = field(default_factory=set)
    phase: str = "SYNC"  # SYNC -> VERIFIED (a full verification pass found both sides equal)
    digest: str = DIGEST_SHA256  # the algorithm of the digests in `verified`
    saves: int = 0

    def __post_init__(self) -> None:
        if self.verified is None:
            self.verified = DigestTable(self.blocks)

    @classmethod
    def load_or_new(
        cls, path: Path, identity: dict[str, object], blocks: int, digest: str = DIGEST_SHA256
    ) -> tuple[Journal, str]:
        """Returns the journal and a one-line description of what was found (for the log). A new
        journal uses `digest`; a loaded one keeps the algorithm it names (see `adopt_digest`)."""
        journal = cls(path=path, identity=identity, blocks=blocks, digest=digest)
        if not path.exists():
            return journal, "no journal: starting fresh"
        try:
            journal._read()
        except (JournalMismatch, ValueError, OSError) as exc:
            return cls(path=path, identity=identity, blocks=blocks, digest=digest), f"journal ignored ({exc})"
        done = journal.verified.known
        return journal, (
            f"journal: {done}/{blocks} blocks verified ({journal.digest}), {len(journal.inflight)} in flight (redone)"
        )

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            header = json.loads(f.readline())
            if header.get("magic") != MAGIC:
                raise JournalMismatch("not a replicator journal")
            if header.get("identity") != self.identity or header.get("blocks") != self.blocks:
                raise JournalMismatch("it describes another volume, source or block size")
            # Straight into the table's own buffer: loading costs no second copy of it.
            if os.fstat(f.fileno()).st_size - f.tell() != self.blocks * DIGEST_SIZE:
                raise JournalMismatch("truncated")
            if f.readinto(self.verified.buf) != len(self.verified.buf):
                raise JournalMismatch("truncated")
        self.verified.recount()
        self.inflight = set(header.get("inflight", []))
        self.phase = str(header.get("phase", "SYNC"))
        self.digest = str(header.get("digest", DIGEST_SHA256))  # version-1 journals hold SHA-256
        for i in self.inflight:  # half-written blocks are never trusted
            if 0 <= i < self.blocks:
                self.verified[i] = None

    def adopt_digest(self, algorithm: str) -> bytearray | None:
        """Switches the journal to `algorithm`. Digests of another algorithm are dropped, never compared
        with the source's: returns the blocks they vouched for (one byte a block, 1 = was verified) so
        the caller re-reads them locally to recompute their digests, or None when nothing changes."""
        if algorithm == self.digest:
            return None
        vouched = self.verified.known_mask() if self.verified.known else None
        self.verified = DigestTable(self.blocks)
        self.digest = algorithm
        self.phase = "SYNC"
        return vouched

    def mark_inflight(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.verified[i] = None
        self.inflight = set(indices)

    def mark_verified(self, done: dict[int, bytes], next_inflight: Iterable[int] = ()) -> None:
        for i, d in done.items():
            self.verified[i] = d
        self.inflight = set(next_inflight)
        for i in self.inflight:
            self.verified[i] = None

    def save(self) -> None:
        header = {
            "magic": MAGIC,
            "identity": self.identity,
            "blocks": self.blocks,
            "phase": self.phase,
            "digest": self.digest,
            "inflight": sorted(self.inflight),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
            f.write(self.verified.buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.saves += 1
