"""A volume the agent serves: block digests with change tracking by generation.

The agent cannot see writes on a block device, so it re-digests ("scans") the volume: on request
(DIGESTS, SCAN) and periodically from the watcher. Each scan that finds a block different from the
cached digest stamps it with the next generation; CHANGES(since=g) lists blocks stamped after g.
For image files the scan is skipped while size and mtime are unchanged and old enough to trust
(a write within the same timestamp tick as the last look could otherwise go unnoticed).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from failback_replicator.blockio import block_count, block_digest, device_size, open_volume, read_block

_TRUST_AGE_NS = 2_000_000_000  # mtime older than this at stat time: no write can share its tick


@dataclass(frozen=True)
class VolumeSpec:
    name: str  # the recovery instance's device name, e.g. /dev/xvda
    path: Path  # block device or image file


class SourceVolume:
    def __init__(self, spec: VolumeSpec, block_size: int) -> None:
        self.spec = spec
        self.block_size = block_size
        self.fd = open_volume(spec.path, writable=False)
        self.size = device_size(self.fd)
        self.blocks = block_count(self.size, block_size)
        self.digests: list[bytes | None] = [None] * self.blocks
        self.changed_gen = [0] * self.blocks
        self.generation = 0
        self.scans = 0
        self.lock = threading.Lock()  # guards digests/changed_gen/generation
        self.scan_lock = threading.Lock()  # one scan at a time
        self.changed = threading.Condition(self.lock)
        self._stamp: tuple[int, int, int] | None = None  # (ino, size, mtime_ns) at the last trusted scan
        self._is_file = stat.S_ISREG(os.fstat(self.fd).st_mode)

    def close(self) -> None:
        os.close(self.fd)

    def _unchanged(self) -> bool:
        if not self._is_file or self._stamp is None:
            return False
        st = os.stat(self.spec.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns) == self._stamp

    def scan(self, chunk: int = 256, force: bool = False) -> Iterator[tuple[int, list[bytes]]]:
        """Re-digests the volume (unless provably unchanged), yielding (first, digests) chunks."""
        with self.scan_lock:
            if not force and self._unchanged():
                for first in range(0, self.blocks, chunk):
                    with self.lock:
                        part = list(self.digests[first : first + chunk])
                    yield first, part  # type: ignore[misc]
                return
            stamp = None
            if self._is_file:
                st = os.stat(self.spec.path)
                if time.time_ns() - st.st_mtime_ns > _TRUST_AGE_NS:
                    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            any_changed = False
            new_gen = self.generation + 1
            for first in range(0, self.blocks, chunk):
                part = []
                for i in range(first, min(first + chunk, self.blocks)):
                    d = block_digest(read_block(self.fd, i, self.size, self.block_size))
                    with self.lock:
                        if self.digests[i] != d:
                            if self.digests[i] is not None:
                                any_changed = True
                            self.digests[i] = d
                            self.changed_gen[i] = new_gen
                    part.append(d)
                yield first, part
            with self.lock:
                self.generation = new_gen
                self.scans += 1
                self._stamp = stamp
                if any_changed:
                    self.changed.notify_all()

    def refresh(self, force: bool = False) -> None:
        for _ in self.scan(force=force):
            pass

    def read(self, index: int) -> tuple[bytes, bytes]:
        """The block's current contents and digest (fresh from the device, not the cache)."""
        data = read_block(self.fd, index, self.size, self.block_size)
        d = block_digest(data)
        with self.lock:
            # Keep the cache current so the next scan does not report this version as new.
            if self.digests[index] is not None:
                self.digests[index] = d
        return data, d

    def changes_since(self, since: int) -> tuple[int, list[int]]:
        with self.lock:
            return self.generation, [i for i, g in enumerate(self.changed_gen) if g > since]
