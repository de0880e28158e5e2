"""Block transfer: streams the wanted blocks of a volume from the agent onto the target, verifying
each block on arrival, checkpointing the journal in batches and reading each batch back.

`Block` is one block between the socket (or, on the agent, the disk) and the other end, held in a
pool buffer; the agent's server queues the same record between its reader and its sender."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .blockio import block_span, drop_cache, read_block_into, write_all, write_zeros
from .buffers import BufferPool, window_for
from .session import AgentRefused, EngineContext, expect
from .targets import Target
from .throttle import TokenBucket
from .wire import (
    BLOCK_HEADER_SIZE,
    CODEC_ZERO,
    DIGEST_SIZE,
    FRAME_BLOCK,
    FRAME_JSON,
    Connection,
    Decoder,
    ProtocolError,
    parse_block,
    parse_json,
    to_ranges,
)

log = logging.getLogger("failback_replicator")


@dataclass(slots=True)
class Block:
    """One block as a BLOCK frame carries it: `payload` is encoded by `codec` (empty for a zero
    block) and decodes to `raw_len` bytes whose digest is `digest`; `buf` is the pool buffer that
    holds the payload, returned to its pool once the block is written (or sent)."""

    index: int
    codec: int
    raw_len: int
    digest: bytes
    payload: bytes | memoryview
    buf: bytearray


@dataclass(slots=True)
class Checkpoint:
    """Writer work item: make `batch` durable (fdatasync), then mark it verified in the journal
    with `next_batch` in flight."""

    batch: Sequence[int]
    next_batch: Sequence[int]


class BlockTransfer:
    def __init__(self, ctx: EngineContext, bucket: TokenBucket, check_stop: Callable[[], None]) -> None:
        self.ctx = ctx
        self.bucket = bucket
        self.check_stop = check_stop

    def fetch_all(self, conn: Connection, targets: Sequence[Target], need: Mapping[int, Sequence[int]]) -> None:
        for t in targets:
            blocks = need.get(t.index, [])
            if blocks:
                self.fetch(conn, t, blocks)

    def fetch(self, conn: Connection, t: Target, wanted: Sequence[int]) -> None:
        """Streams `wanted` blocks from the agent into the target, checkpointing the journal.

        This thread receives (decryption); a writer thread decodes, verifies, writes and
        checkpoints (fdatasync + journal) in order, so the link keeps flowing during a checkpoint.
        The next batch is requested before the current one is received, so the agent never idles.
        Memory: every block between the socket and the disk sits in one buffer of a fixed pool
        (`window_for(block_size)` buffers); when the writer falls behind, this thread waits for a
        free buffer and TCP flow control stops the agent.
        """
        bs = self.ctx.cfg.block_size
        # Each checkpoint rewrites the whole journal (32 bytes per block): on big volumes checkpoint
        # less often so journal writes stay under ~5 % of the data written.
        cp = max(self.ctx.cfg.checkpoint_blocks, t.blocks * DIGEST_SIZE * 20 // bs)
        batches = [wanted[i : i + cp] for i in range(0, len(wanted), cp)]
        t.journal.mark_inflight(batches[0])
        t.journal.save()
        pool = BufferPool(window_for(bs), bs + BLOCK_HEADER_SIZE)
        # Unbounded in type only: blocks each hold a pool buffer, and there is one checkpoint per
        # batch (a batch is longer than the pool, so at most two are ever queued).
        work: queue.SimpleQueue[Block | Checkpoint | None] = queue.SimpleQueue()
        checkpoints: deque[dict[int, bytes]] = deque()  # made durable by the writer, reported here
        to_read_back: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()  # checkpointed, for the verifier
        failures: list[int] = []
        errors: list[BaseException] = []
        hasher = self.ctx.link.hash
        stats_lock = self.ctx.stats_lock

        def verifier() -> None:
            """Reads each checkpointed batch back from the device while the transfer goes on, so the
            verification pass after the sync has (almost) nothing left to re-read."""
            buf = bytearray(bs)
            while (batch := to_read_back.get()) is not None:
                if errors:
                    continue
                try:
                    for start, count in to_ranges(batch):
                        drop_cache(t.fd, start * bs, count * bs)
                    for i in batch:
                        if not t.readback[i]:
                            continue
                        d = hasher(read_block_into(t.fd, i, t.size, bs, buf))
                        with stats_lock:
                            self.ctx.stats.local_blocks_read += 1
                            if d != t.local[i]:  # the device does not hold what was written
                                log.warning("%s block %d reads back wrong", t.mapping.recovery_device, i)
                                t.local[i] = d  # the verification pass will see it differ: refetched
                            t.readback[i] = 0
                except BaseException as exc:
                    errors.append(exc)

        def writer() -> None:
            decoder = Decoder()
            done: dict[int, bytes] = {}
            while (item := work.get()) is not None:
                if isinstance(item, Checkpoint):  # data durable first, then the journal says so
                    if errors:
                        continue
                    try:
                        os.fdatasync(t.fd)
                        verified = {i: done.pop(i) for i in item.batch if i in done}
                        with stats_lock:
                            t.journal.mark_verified(verified, item.next_batch)
                        t.journal.save()
                        checkpoints.append(verified)
                        to_read_back.put(list(verified))
                    except BaseException as exc:
                        errors.append(exc)
                    continue
                block, item = item, None  # the payload must not outlive the buffer's return
                try:
                    if errors:
                        continue
                    index, raw_len = block.index, block.raw_len
                    off, length = block_span(index, t.size, bs)
                    if length != raw_len:
                        raise ProtocolError(f"block {index} has {raw_len} bytes, expected {length}")
                    # A zero block (free space) carries no data: its digest must be the zero digest,
                    # and the kernel zeroes the range (no 1 MiB of zeros hashed and copied here).
                    zero = block.codec == CODEC_ZERO
                    data = b"" if zero else decoder.decode(block.codec, block.payload, raw_len)
                    if (hasher.zero(raw_len) if zero else hasher(data)) != block.digest:
                        failures.append(index)
                        log.warning(
                            "%s block %d failed verification on arrival: refetching", t.mapping.recovery_device, index
                        )
                        continue
                    if zero:
                        write_zeros(t.fd, off, length)
                    else:
                        write_all(t.fd, data, off)
                    t.readback[index] = 1
                    done[index] = block.digest
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    buf, block.payload = block.buf, b""
                    del block
                    pool.put(buf)

        thread = threading.Thread(target=writer, name="replicator-writer", daemon=True)
        thread.start()
        checker = threading.Thread(target=verifier, name="replicator-read-back", daemon=True)
        checker.start()
        started = time.perf_counter()
        try:
            self.request(conn, t, batches[0])
            for k, batch in enumerate(batches):
                if k + 1 < len(batches):
                    self.request(conn, t, batches[k + 1])
                self.check_stop()
                want = set(batch)
                for _ in range(len(batch)):
                    buf = pool.get()
                    try:
                        ftype, body = conn.recv_frame(buf, limit=bs + BLOCK_HEADER_SIZE)
                        if ftype == FRAME_JSON:
                            msg = parse_json(body)
                            raise AgentRefused(f"{msg.get('error')}: {msg.get('message')}")
                        if ftype != FRAME_BLOCK:
                            raise ProtocolError(f"expected a block, got frame type {ftype}")
                        vol, index, codec, raw_len, dig, payload = parse_block(body)
                        if vol != t.index or index not in want:
                            raise ProtocolError(f"unrequested block {vol}/{index}")
                    except BaseException:
                        pool.put(buf)
                        raise
                    self.bucket.consume(len(body))
                    self.ctx.stats.blocks_received += 1
                    work.put(Block(index, codec, raw_len, dig, payload, buf))
                    if errors:
                        raise errors[0]
                expect(conn, "READ")
                work.put(Checkpoint(batch, batches[k + 1] if k + 1 < len(batches) else []))
                self.ctx.reports.checkpoints(t, checkpoints, bs)
                if errors:
                    raise errors[0]
        finally:
            work.put(None)
            thread.join()
            to_read_back.put(None)
            checker.join()
            self.ctx.reports.checkpoints(t, checkpoints, bs)  # whatever the writer made durable meanwhile
            self.ctx.stats.transfer_seconds += time.perf_counter() - started
        if errors:
            raise errors[0]
        if failures:
            self.ctx.stats.digest_failures += len(failures)
            if self.ctx.stats.digest_failures > 64:
                raise ProtocolError(f"{self.ctx.stats.digest_failures} blocks failed verification: link corrupts data")
            self.fetch(conn, t, sorted(set(failures)))

    def request(self, conn: Connection, t: Target, batch: Sequence[int]) -> None:
        conn.send_json({"op": "READ", "volume": t.index, "blocks": to_ranges(batch)})
