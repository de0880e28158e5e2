"""Resume journal kept on the target side, one file per replicated volume.

It records, per block, the digest of what is verified on the local device (written, fsynced and
checked against the digest the agent sent) and the blocks currently "in flight" (about to be or
being written). Any restart — dropped link, restarted agent, rebooted LiveCD — resumes from it:
verified blocks whose digest still matches the source are never sent again, in-flight blocks are
treated as unknown and redone.

Format (binary, small: 32 bytes per block): a JSON header line, then one digest per block (all
zero bytes = not verified). Updated atomically: write tmp + fsync + rename + fsync(dir).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .wire import DIGEST_SIZE

_UNKNOWN = bytes(DIGEST_SIZE)
MAGIC = "failback-replicator-journal/1"


class JournalMismatch(Exception):
    """The journal on disk belongs to another volume/source/geometry; it is ignored (full compare)."""


@dataclass
class Journal:
    path: Path
    identity: dict[str, object]  # what the journal is about: source volume, target, sizes, block size
    blocks: int
    verified: list[bytes | None] = field(default_factory=list)
    inflight: set[int] = field(default_factory=set)
    phase: str = "SYNC"  # SYNC -> VERIFIED (a full verification pass found both sides equal)
    saves: int = 0

    def __post_init__(self) -> None:
        if not self.verified:
            self.verified = [None] * self.blocks

    @classmethod
    def load_or_new(cls, path: Path, identity: dict[str, object], blocks: int) -> tuple[Journal, str]:
        """Returns the journal and a one-line description of what was found (for the log)."""
        journal = cls(path=path, identity=identity, blocks=blocks)
        if not path.exists():
            return journal, "no journal: starting fresh"
        try:
            journal._read()
        except (JournalMismatch, ValueError, OSError) as exc:
            return cls(path=path, identity=identity, blocks=blocks), f"journal ignored ({exc})"
        done = sum(1 for d in journal.verified if d is not None)
        return journal, f"journal: {done}/{blocks} blocks verified, {len(journal.inflight)} in flight (redone)"

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            header = json.loads(f.readline())
            if header.get("magic") != MAGIC:
                raise JournalMismatch("not a replicator journal")
            if header.get("identity") != self.identity or header.get("blocks") != self.blocks:
                raise JournalMismatch("it describes another volume, source or block size")
            body = f.read()
        if len(body) != self.blocks * DIGEST_SIZE:
            raise JournalMismatch("truncated")
        self.verified = [
            None if body[i : i + DIGEST_SIZE] == _UNKNOWN else body[i : i + DIGEST_SIZE]
            for i in range(0, len(body), DIGEST_SIZE)
        ]
        self.inflight = set(header.get("inflight", []))
        self.phase = str(header.get("phase", "SYNC"))
        for i in self.inflight:  # half-written blocks are never trusted
            if 0 <= i < self.blocks:
                self.verified[i] = None

    def mark_inflight(self, indices: set[int] | list[int]) -> None:
        for i in indices:
            self.verified[i] = None
        self.inflight = set(indices)

    def mark_verified(self, done: dict[int, bytes], next_inflight: set[int] | list[int] = ()) -> None:
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
            "inflight": sorted(self.inflight),
        }
        body = b"".join(d if d is not None else _UNKNOWN for d in self.verified)
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.saves += 1
