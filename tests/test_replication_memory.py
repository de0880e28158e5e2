"""The replicator's memory is bounded: a 1 GiB LiveCD must hold it with room to spare.

The bound comes from the engine's design (PROTOCOL.md, "Memory"): block data between the socket
and the disk lives in a fixed pool of `window_for(block_size)` buffers, and per-block state is
packed (32 bytes a block for digests, 1 byte for the read-back mark). The slow test replicates a
volume several times larger than the bound through the real `failback-replicator` program and
measures that child's own peak RSS (VmHWM: see drs_agent.testing.run_measuring_peak_rss for why
not ru_maxrss -- the cause of the 3.3 GiB once reported by CI).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from drs_agent.testing import Pki, make_image, replicator_config, run_measuring_peak_rss, start_agent
from failback_replicator.buffers import BufferPool, window_for
from failback_replicator.journal import DigestTable, Journal

from image.stages.hashes import sha512_file

MiB = 1024 * 1024
KiB = 1024


@pytest.fixture
def ramdir(tmp_path: Path) -> Iterator[Path]:
    """Large images on tmpfs when there is one (the test measures memory, not this VM's disk)."""
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="repl-mem-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_peak_rss_probe_measures_the_child_not_its_parent(tmp_path: Path) -> None:
    ballast = bytearray(300 * MiB)  # the test process grows well past what the child will use...
    ballast[:: 4 * KiB] = b"\x01" * len(range(0, len(ballast), 4 * KiB))
    code = "b = bytearray(120 * 1024 * 1024); b[::4096] = b'\\x01' * len(range(0, len(b), 4096))"
    proc, peak_kib = run_measuring_peak_rss(["-c", code], tmp_path / "peak")
    assert proc.returncode == 0, proc.stderr
    # ...and the probe sees the child's 120 MiB (so a leak shows), not the parent's 300+ MiB.
    assert 120 * KiB <= peak_kib < 250 * KiB, f"child peak {peak_kib} KiB"
    del ballast


def test_buffer_pool_never_holds_more_than_its_count() -> None:
    pool = BufferPool(3, 1024)
    held = [pool.get() for _ in range(3)]
    assert pool.created == 3 and pool.bound == 3 * 1024
    import threading

    got: list[bytearray] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get()))
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive() and not got, "a 4th buffer was handed out: the pool is not a bound"
    pool.put(held.pop())
    waiter.join(timeout=5)
    assert len(got) == 1 and pool.created == 3
    assert window_for(1 * MiB) == 8 and window_for(16 * MiB) == 4  # at least 4 buffers, else ~8 MiB


def test_per_block_state_is_packed(tmp_path: Path) -> None:
    """A 2 TiB disk of 1 MiB blocks: the journal's digests take 32 bytes a block, not ~90."""
    import tracemalloc

    blocks = 2 * 1024 * 1024
    tracemalloc.start()
    journal, _ = Journal.load_or_new(tmp_path / "j.bin", {"volume": "/dev/xvda"}, blocks)
    journal.mark_verified({i: bytes([i % 251 + 1]) * 32 for i in range(0, blocks, 1024)}, range(64))
    journal.save()
    loaded, how = Journal.load_or_new(tmp_path / "j.bin", {"volume": "/dev/xvda"}, blocks)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert loaded.verified.known == blocks // 1024 - 1  # block 0 was marked in flight again
    assert "2048/2097152 blocks verified" in how or "2047/2097152" in how
    # the two journals' tables (64 MiB each), loading reads into the table itself: no third copy.
    assert peak < 2 * blocks * 32 + 16 * MiB, f"{peak / MiB:.0f} MiB for {blocks} blocks"
    table = DigestTable(4)
    table[2] = b"d" * 32
    assert list(table) == [None, None, b"d" * 32, None] and table.known == 1
    assert table.differing(b"x" * 64 + b"d" * 32 + b"y" * 32) == [0, 1, 3]


@pytest.mark.slow
def test_replicator_memory_is_bounded_on_a_volume_much_larger_than_the_bound(ramdir: Path) -> None:
    size = 768 * MiB
    bound_kib = 96 * KiB  # interpreter + TLS + zstd ~30 MiB, block window 8 MiB, slack for the allocator
    pki = Pki.create(ramdir / "pki")
    src = make_image(ramdir / "source.img", size, seed=21, zero_fraction=0.1)
    tgt = ramdir / "target.img"
    with open(tgt, "wb") as f:
        f.truncate(size)
    with start_agent(pki, {"/dev/xvda": src}, watch_interval=0) as agent:
        cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt}, ramdir / "state", rescan=False)
        (ramdir / "replicator.json").write_text(cfg.to_json())
        (ramdir / "command").write_text("FINAL_SYNC\n")
        proc, peak_kib = run_measuring_peak_rss(
            [
                "failback_replicator",
                "--config", str(ramdir / "replicator.json"),
                "--command-file", str(ramdir / "command"),
                "--status-file", str(ramdir / "status.json"),
            ],
            ramdir / "peak",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sha512_file(tgt) == sha512_file(src)
    status = json.loads((ramdir / "status.json").read_text())
    assert status.get("completed") is True
    print(f"\nreplicator peak RSS {peak_kib / KiB:.1f} MiB, {size // MiB} MiB volume, bound {bound_kib // KiB} MiB")
    assert 10 * KiB < peak_kib < bound_kib, f"peak RSS {peak_kib} KiB for a {size // MiB} MiB volume"
