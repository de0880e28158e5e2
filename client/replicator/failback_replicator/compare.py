"""Compare and rescan: the agent's block digests against what the journal vouches for locally,
reading the local disk where nothing is vouched for (a rescan, a verification pass), and the list
of blocks that differ. A rescan fetches what it finds to differ while it still reads."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence

from .blockio import block_span, drop_cache, read_block_into
from .session import AgentRefused, EngineContext
from .targets import Target
from .transfer import BlockTransfer
from .wire import DIGEST_SIZE, FRAME_DIGESTS, FRAME_JSON, Connection, ProtocolError, parse_digest_frame, parse_json

log = logging.getLogger("failback_replicator")


class Comparer:
    def __init__(self, ctx: EngineContext, transfer: BlockTransfer) -> None:
        self.ctx = ctx
        self.transfer = transfer

    def compare(self, conn: Connection, targets: Sequence[Target], reread_local: bool) -> dict[int, Sequence[int]]:
        """Asks the agent for fresh digests of every volume and lists the blocks that differ locally."""
        need: dict[int, Sequence[int]] = {}
        for t in targets:
            if not reread_local and not self.ctx.cfg.rescan and t.local.known == 0 and t.recompute is None:
                # A full sync with nothing verified yet: every block is needed, no digests to compare.
                need[t.index] = range(t.blocks)
                t.need_bytes = t.size
                t.progress.backlogged_bytes, t.progress.replicated_bytes = t.size, 0
                log.info("%s: full sync of %d blocks (%d bytes)", t.mapping.recovery_device, t.blocks, t.size)
                continue
            # Blocks with no trusted local digest are read locally when we expect them to be
            # mostly equal (rescan, or a verification pass); in a full sync they are just fetched.
            local_result: list[BaseException] = []
            indices: list[int] = []
            if reread_local:
                # Verification: read back whatever this process wrote (or never read) since its last read.
                marks = bytearray(t.readback)
                for i in t.local.unknown():
                    marks[i] = 1
                indices = [i for i, m in enumerate(marks) if m]
                drop_cache(t.fd)
            elif self.ctx.cfg.rescan:
                indices = list(t.local.unknown())
            elif t.recompute is not None:  # a full sync that already verified blocks under another digest
                indices = [i for i, m in enumerate(t.recompute) if m]
            t.recompute = None
            local_jobs = []
            hashed: queue.SimpleQueue[int] = queue.SimpleQueue()  # blocks whose local digest is known
            halt = threading.Event()
            if indices:
                # Two readers: hashing releases the GIL, so a local rescan uses both cores of a small
                # box -- and runs while the agent digests its side (the DIGESTS request goes out now).
                for part in (indices[0::2], indices[1::2]):
                    job = threading.Thread(target=self.digest_local, args=(t, part, local_result, hashed, halt))
                    job.start()
                    local_jobs.append(job)
            early = 0
            try:
                source = self.source_digests(conn, t)
                if local_jobs and not reread_local:
                    early = self.fetch_while_hashing(conn, t, source, local_jobs, local_result, hashed)
            except BaseException:
                halt.set()  # the readers must not outlive this (the caller may close the device)
                raise
            finally:
                for job in local_jobs:
                    job.join()
            if local_result:
                raise local_result[0]
            differ = t.local.differing(source)
            need[t.index] = differ
            t.need_bytes = sum(block_span(i, t.size, self.ctx.cfg.block_size)[1] for i in differ)
            t.progress.backlogged_bytes = t.need_bytes
            t.progress.replicated_bytes = t.size - t.need_bytes
            log.info(
                "%s: %d of %d blocks differ (%d bytes)%s%s",
                t.mapping.recovery_device,
                len(differ),
                t.blocks,
                t.need_bytes,
                f" [verification pass, {len(indices)} block(s) read back]" if reread_local else "",
                f" [{early} more fetched during the rescan]" if early else "",
            )
        self.ctx.reports.progress(force=True)
        return need

    def source_digests(self, conn: Connection, t: Target) -> bytearray:
        """The agent's digests of every block of the volume, packed (32 bytes a block)."""
        conn.send_json({"op": "DIGESTS", "volume": t.index})
        source = bytearray()
        while True:
            ftype, body = conn.recv_frame()
            if ftype == FRAME_DIGESTS:
                vol, first, packed = parse_digest_frame(body)
                if vol != t.index or first != len(source) // DIGEST_SIZE:
                    raise ProtocolError("digest frames out of order")
                source += packed
                t.progress.rescanned_bytes = min(t.size, len(source) // DIGEST_SIZE * self.ctx.cfg.block_size)
                self.ctx.reports.progress()
            elif ftype == FRAME_JSON:
                msg = parse_json(body)
                if msg["op"] == "ERROR":
                    raise AgentRefused(f"{msg.get('error')}: {msg.get('message')}")
                if msg["op"] != "DIGESTS":
                    raise ProtocolError(f"expected DIGESTS, agent sent {msg['op']}")
                t.generation = int(msg["generation"])
                break
            else:
                raise ProtocolError(f"unexpected frame type {ftype} in a digest list")
        if len(source) != t.blocks * DIGEST_SIZE:
            raise ProtocolError(f"agent sent {len(source) // DIGEST_SIZE} digests for {t.blocks} blocks")
        return source

    def digest_local(
        self,
        t: Target,
        indices: list[int],
        result: list,
        hashed: queue.SimpleQueue[int],
        halt: threading.Event,
    ) -> None:
        try:
            buf = bytearray(self.ctx.cfg.block_size)  # one per reader thread, reused for every block
            for i in indices:
                if halt.is_set():
                    return
                d = self.ctx.link.hash(read_block_into(t.fd, i, t.size, self.ctx.cfg.block_size, buf))
                with self.ctx.stats_lock:
                    t.local[i] = d
                    t.readback[i] = 0
                    self.ctx.stats.local_blocks_read += 1
                hashed.put(i)
        except BaseException as exc:  # surfaced in the calling thread
            result.append(exc)

    def fetch_while_hashing(
        self,
        conn: Connection,
        t: Target,
        source: bytearray,
        jobs: list[threading.Thread],
        errors: list[BaseException],
        hashed: queue.SimpleQueue[int],
    ) -> int:
        """A rescan reads the whole local disk (minutes on a big one): the blocks found to differ
        are fetched while the readers go on, so the link does not wait for the last block to be
        read. What is found after the readers end is left to the caller's comparison of the whole
        table. Returns how many blocks it fetched.

        A checkpoint may write the journal while a reader stores a digest: the journal then holds
        a torn digest for that one block, which can only differ from the source's (a refetch)."""
        fetched = 0
        pending: list[int] = []
        since = 0.0  # when the oldest pending block was found
        t.need_bytes = 0  # the backlog during a rescan: what it found to differ and has not fetched yet
        while not errors:
            # Sleep until the readers end, a pending block is due, or a quarter second passed (not
            # woken per block: that would take the GIL from the readers 256 times a GiB).
            deadline = since + 0.5 if pending else time.monotonic() + 0.25
            for job in jobs:
                job.join(timeout=max(0.0, deadline - time.monotonic()))
            running = any(job.is_alive() for job in jobs)
            with contextlib.suppress(queue.Empty):
                while True:
                    i = hashed.get_nowait()
                    if t.local[i] != bytes(source[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]):
                        since = since if pending else time.monotonic()
                        pending.append(i)
            if not running:
                break
            if len(pending) >= self.ctx.cfg.checkpoint_blocks or (pending and time.monotonic() - since >= 0.5):
                pending.sort()
                n_bytes = sum(block_span(i, t.size, self.ctx.cfg.block_size)[1] for i in pending)
                t.need_bytes += n_bytes
                t.progress.backlogged_bytes = t.need_bytes
                self.transfer.fetch(conn, t, pending)
                fetched += len(pending)
                pending = []
        return fetched
