"""A volume the agent serves: block digests with change tracking by generation.

The agent cannot see writes on a block device, so it re-digests ("scans") the volume: on request
(DIGESTS, SCAN) and periodically from the watcher. Each scan that finds a block different from the
cached digest stamps it with the next generation; CHANGES(since=g) lists blocks stamped after g.
For image files the scan is skipped while inode, size and mtime are unchanged and the mtime was
old enough to trust when the digests were taken (a write within the same timestamp tick as the
last look could otherwise go unnoticed) -- whether they were taken by a scan or by READs: after a
full sync that read every block of an unchanged image, the verification's DIGESTS is served from
those digests instead of reading the image again. A block device can never be proven unchanged.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from failback_replicator.blockio import block_count, block_hasher, device_size, open_volume, read_block_into
from failback_replicator.journal import DigestTable
from failback_replicator.wire import DIGEST_SHA256

_TRUST_AGE_NS = 2_000_000_000  # mtime older than this at stat time: no write can share its tick
# Threads that read and hash during a scan: SHA-256 and BLAKE3 release the GIL, so a scan (the source half of
# every verification and rescan) runs on several cores; more than 4 rarely pays on one disk.
SCAN_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class VolumeSpec:
    name: str  # the recovery instance's device name, e.g. /dev/xvda
    path: Path  # block device or image file


class SourceVolume:
    def __init__(self, spec: VolumeSpec, block_size: int, digest: str = DIGEST_SHA256) -> None:
        self.spec = spec
        self.block_size = block_size
        self.hasher = block_hasher(digest)  # the block digest of the sessions this set of digests serves
        self.fd = open_volume(spec.path, writable=False)
        self.size = device_size(self.fd)
        self.blocks = block_count(self.size, block_size)
        # Packed: 32 bytes a block for the digests, 8 for the generation (not ~130 in Python lists).
        self.digests = DigestTable(self.blocks)
        self.changed_gen = array("Q", bytes(8 * self.blocks))
        self.generation = 0
        self.scans = 0
        self.lock = threading.Lock()  # guards digests/changed_gen/generation
        self.scan_lock = threading.Lock()  # one scan at a time
        self.changed = threading.Condition(self.lock)
        self._is_file = stat.S_ISREG(os.fstat(self.fd).st_mode)
        # Digests known current while the image keeps the stamp (ino, size, mtime_ns) they were taken
        # under: one byte per block, 1 = digest taken under `_stamp` (by a scan or a READ).
        self._stamp: tuple[int, int, int] | None = None
        self._fresh = bytearray(self.blocks)

    def close(self) -> None:
        if self.fd >= 0:  # idempotent: a second AgentServer.stop() must not close a reused fd number
            os.close(self.fd)
            self.fd = -1

    def _trusted_stamp(self) -> tuple[int, int, int] | None:
        """The image's stamp now, if a later write is sure to change it (None for block devices)."""
        if not self._is_file:
            return None
        st = os.stat(self.spec.path)
        if time.time_ns() - st.st_mtime_ns <= _TRUST_AGE_NS:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _unchanged(self) -> bool:
        """Every cached digest was taken under the stamp the image still has."""
        if not self._is_file or self._stamp is None or self._fresh.find(0) != -1:
            return False
        st = os.stat(self.spec.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns) == self._stamp

    def scan(self, chunk: int = 256, force: bool = False) -> Iterator[tuple[int, bytes]]:
        """Re-digests the volume (unless provably unchanged), yielding (first, packed digests) chunks."""
        with self.scan_lock:
            if not force and self._unchanged():
                for first in range(0, self.blocks, chunk):
                    with self.lock:
                        part = bytes(self.digests.buf[first * 32 : (first + chunk) * 32])
                    yield first, part
                return
            stamp = self._trusted_stamp()
            any_changed = False
            new_gen = self.generation + 1
            buffers = threading.local()  # one reusable block buffer per scanning thread

            def digest_of(i: int) -> bytes:
                if not hasattr(buffers, "buf"):
                    buffers.buf = bytearray(self.block_size)
                return self.hasher(read_block_into(self.fd, i, self.size, self.block_size, buffers.buf))

            with ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="agent-scan") as hashers:
                for first in range(0, self.blocks, chunk):
                    indices = range(first, min(first + chunk, self.blocks))
                    digests = list(hashers.map(digest_of, indices))  # in block order
                    with self.lock:
                        for i, d in zip(indices, digests, strict=True):
                            if self.digests[i] != d:
                                if self.digests[i] is not None:
                                    any_changed = True
                                self.digests[i] = d
                                self.changed_gen[i] = new_gen
                    yield first, b"".join(digests)
            with self.lock:
                self.generation = new_gen
                self.scans += 1
                self._stamp = stamp
                self._fresh = bytearray(b"\x01") * self.blocks if stamp else bytearray(self.blocks)
                if any_changed:
                    self.changed.notify_all()

    def refresh(self, force: bool = False) -> None:
        for _ in self.scan(force=force):
            pass

    def read(self, index: int, buf: bytearray | None = None) -> tuple[bytes | memoryview, bytes]:
        """The block's current contents and digest (fresh from the device, not the cache); read into
        `buf` (a reusable buffer of at least one block; the result is a view into it) if given."""
        stamp = self._trusted_stamp()  # before the read: a write during it changes the stamp
        data = read_block_into(self.fd, index, self.size, self.block_size, buf or bytearray(self.block_size))
        d = self.hasher(data)
        with self.lock:
            # Keep the cache current: the next scan does not report this version as new (the
            # replicator has it), and digests taken under one trusted stamp may serve DIGESTS.
            self.digests[index] = d
            if stamp != self._stamp or stamp is None:
                self._stamp = stamp
                self._fresh = bytearray(self.blocks)
            if stamp is not None:
                self._fresh[index] = 1
        return data, d

    def changes_since(self, since: int) -> tuple[int, list[int]]:
        with self.lock:
            return self.generation, [i for i, g in enumerate(self.changed_gen) if g > since]
