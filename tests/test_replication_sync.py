"""Replication end to end on loopback: a real agent (TLS on TCP), the replicator writing image files.

Cases: full sync of an ext4 image, delta to an "original server", a cut link, a restarted agent, a
restarted replicator (journal), source writes during continuous replication, STOP, throttling.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from drs_agent.testing import (
    CuttingProxy,
    Pki,
    RecordingReporter,
    blank_image,
    change_blocks,
    make_image,
    replicator_config,
    start_agent,
)
from failback_replicator.engine import Outcome, Replicator
from failback_replicator.interfaces import Command, QueueCommandSource
from failback_replicator.journal import Journal

from image.core.run import run
from image.stages.hashes import sha512_file

BS = 256 * 1024  # small blocks: more of them in a small image
SIZE = 16 * 1024 * 1024
BLOCKS = SIZE // BS
DEV = "/dev/xvda"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def blank(path: Path, size: int = SIZE) -> Path:
    return blank_image(path, size)


def fast_sleep(_: float) -> None:
    time.sleep(0.05)


def test_full_sync_of_an_ext4_volume(pki: Pki, tmp_path: Path) -> None:
    files = tmp_path / "rootfs"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("restored-server\n")
    (files / "data.bin").write_bytes(bytes(range(256)) * 40000)
    src = tmp_path / "source.img"
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "recovered", "-d", files, src, "24M"], capture=True)
    size = src.stat().st_size
    tgt = blank(tmp_path / "target.img", size + 3 * BS)  # a larger local disk is fine
    reporter = RecordingReporter()
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS)
        r = Replicator(cfg, reporter=reporter, commands=QueueCommandSource(Command.FINAL_SYNC))
        assert r.run() is Outcome.COMPLETED
    assert sha512_file(tgt, size) == sha512_file(src)
    # The filesystem on the target is intact and its files readable.
    run(["e2fsck", "-fn", tgt], capture=True)
    out = run(["debugfs", "-R", "cat /etc/hostname", tgt], capture=True).stdout
    assert "restored-server" in out
    # Every block arrived exactly once, and the state went the way the service shows it.
    blocks = (size + BS - 1) // BS
    assert sorted(r.stats.fetched_by_volume[DEV]) == list(range(blocks))
    assert r.stats.verify_passes >= 1
    steps = reporter.names("initiation_step")
    assert ("PAIR_AGENT_WITH_REPLICATION_SOFTWARE", "SUCCEEDED") in steps
    assert steps[-1] == ("ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION", "SUCCEEDED")
    states = [s for (s,) in reporter.names("replication_state")]
    assert states[:2] == ["INITIAL_SYNC", "CONTINUOUS"]
    assert ("consistency_attained", ()) in reporter.calls and reporter.calls[-1] == ("completed", ())
    last = reporter.snapshots[-1].disks[0]
    assert last.as_drs()["replicatedStorageBytes"] == last.total_bytes == size


def test_delta_to_the_original_server_sends_only_changed_blocks(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=11)
    tgt = tmp_path / "original.img"
    shutil.copyfile(src, tgt)  # the original server still holds the old data...
    changed = [3, 17, 40]
    change_blocks(src, changed, BS)  # ...and the recovery instance changed three blocks since
    reporter = RecordingReporter()
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=True, block_size=BS)
        r = Replicator(cfg, reporter=reporter, commands=QueueCommandSource(Command.FINAL_SYNC))
        assert r.run() is Outcome.COMPLETED
    assert sha512_file(tgt) == sha512_file(src)
    assert sorted(r.stats.fetched_by_volume[DEV]) == changed
    assert r.stats.blocks_received == len(changed)
    # On the wire: the three blocks plus digest lists and control messages, nothing else.
    assert r.stats.wire_bytes_in < len(changed) * BS + 64 * 1024
    assert [s for (s,) in reporter.names("replication_state")][:2] == ["RESCAN", "CONTINUOUS"]
    assert reporter.snapshots[-1].disks[0].rescanned_bytes == SIZE


def _with_zero_blocks(path: Path, blocks: list[int]) -> Path:
    """Free space: the listed blocks all zeros (the rest as make_image made them)."""
    with path.open("r+b") as f:
        for b in blocks:
            f.seek(b * BS)
            f.write(bytes(BS))
    return path


def test_zero_blocks_clear_what_the_local_disk_held(pki: Pki, tmp_path: Path) -> None:
    """A full sync onto a disk full of old data: the source's free space (zero blocks, sent as no
    data and zeroed by the kernel) must read as zeros on the target too."""
    zeros = list(range(5, 40))
    src = _with_zero_blocks(make_image(tmp_path / "source.img", SIZE, seed=21, zero_fraction=0.0), zeros)
    tgt = make_image(tmp_path / "old-disk.img", SIZE, seed=22, zero_fraction=0.0)
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS)
        r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))
        assert r.run() is Outcome.COMPLETED
    assert sha512_file(tgt) == sha512_file(src)
    assert r.stats.wire_bytes_in < (BLOCKS - len(zeros)) * BS + 64 * 1024  # zero blocks carried no data
    assert r.stats.digest_failures == 0


def test_rescan_fetches_what_differs_while_it_still_reads(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rescan of a big disk reads it for minutes: the blocks found to differ are fetched in batches
    meanwhile, not after the last block was read (here the local disk reads 10 ms a block)."""
    from failback_replicator import compare, transfer

    src = make_image(tmp_path / "source.img", SIZE, seed=31)
    tgt = tmp_path / "original.img"
    shutil.copyfile(src, tgt)
    changed = list(range(0, BLOCKS, 4))
    change_blocks(src, changed, BS)
    reading: list[float] = []
    fetches: list[tuple[float, list[int]]] = []
    read_block_into, fetch = compare.read_block_into, transfer.BlockTransfer.fetch

    def slow_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.01)
        reading.append(time.monotonic())
        return read_block_into(*args, **kwargs)

    def recorded_fetch(self, conn, t, wanted):  # type: ignore[no-untyped-def]
        fetches.append((time.monotonic(), list(wanted)))
        return fetch(self, conn, t, wanted)

    for module in (compare, transfer):  # the rescan's readers and the transfer's read-back
        monkeypatch.setattr(module, "read_block_into", slow_read)
    monkeypatch.setattr(transfer.BlockTransfer, "fetch", recorded_fetch)
    caplog.set_level("INFO", logger="failback_replicator")
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=True, block_size=BS,
                                checkpoint_blocks=4)  # fmt: skip
        r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))
        assert r.run() is Outcome.COMPLETED
    assert sha512_file(tgt) == sha512_file(src)
    assert sorted(r.stats.fetched_by_volume[DEV]) == changed  # each changed block once, nothing else
    rescan_end = reading[BLOCKS - 1]  # the rescan's last local read (the verification pass reads after)
    early = [blocks for at, blocks in fetches if at < rescan_end]
    assert early and sum(map(len, early)) < len(changed), f"no fetch while the rescan read: {fetches}"
    assert "fetched during the rescan" in caplog.text


def test_a_rescan_cut_short_stops_its_readers_before_the_next_session(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link drops while the agent's digests come in: that session's local readers must stop
    (and be joined) before the replicator reconnects, not read on beside the next session's."""
    from failback_replicator import compare, session, transfer

    src = make_image(tmp_path / "source.img", SIZE, seed=33)
    tgt = tmp_path / "original.img"
    shutil.copyfile(src, tgt)
    change_blocks(src, [5, 50], BS)
    reads: list[tuple[threading.Thread, float]] = []
    connects: list[float] = []
    read_block_into, source_digests, connect = (
        compare.read_block_into,
        compare.Comparer.source_digests,
        session.Link.connect,
    )

    def slow_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.01)
        reads.append((threading.current_thread(), time.monotonic()))
        return read_block_into(*args, **kwargs)

    def cut_first(self, conn, t):  # type: ignore[no-untyped-def]
        if len(connects) == 1:
            time.sleep(0.05)  # the readers are busy meanwhile
            raise ConnectionResetError("link cut while the digests came in")
        return source_digests(self, conn, t)

    def recorded_connect(self):  # type: ignore[no-untyped-def]
        connects.append(time.monotonic())
        return connect(self)

    for module in (compare, transfer):
        monkeypatch.setattr(module, "read_block_into", slow_read)
    monkeypatch.setattr(compare.Comparer, "source_digests", cut_first)
    monkeypatch.setattr(session.Link, "connect", recorded_connect)
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=True, block_size=BS)
        r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC), sleep=fast_sleep)
        assert r.run() is Outcome.COMPLETED
    assert sha512_file(tgt) == sha512_file(src)
    assert len(connects) == 2
    first = {id(thread) for thread, at in reads if at < connects[1]}
    late = [at - connects[1] for thread, at in reads if id(thread) in first and at > connects[1]]
    assert first and not late, f"the first session's readers read on after the reconnect: {late}"


def test_a_block_that_reads_back_wrong_is_fetched_again(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every written block is read back from the device (after its checkpoint) and compared; one the
    device returns wrong is not trusted: the verification refetches it."""
    from failback_replicator import compare, transfer

    src = make_image(tmp_path / "source.img", SIZE, seed=31, zero_fraction=0.0)
    tgt = blank(tmp_path / "target.img")
    real, lied = transfer.read_block_into, []

    def bad_sector_once(fd: int, index: int, size: int, bs: int, buf: bytearray) -> memoryview:
        view = real(fd, index, size, bs, buf)
        if index == 5 and not lied:
            lied.append(index)
            view[100] ^= 0xFF
        return view

    for module in (compare, transfer):  # local reads: the rescan's and the read-back after checkpoints
        monkeypatch.setattr(module, "read_block_into", bad_sector_once)
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS,
                                checkpoint_blocks=8)  # fmt: skip
        r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))
        assert r.run() is Outcome.COMPLETED
    assert lied, "block 5 was never read back"
    assert sha512_file(tgt) == sha512_file(src)
    fetched = list(r.stats.fetched_by_volume[DEV])
    assert fetched.count(5) == 2 and sorted(set(fetched)) == list(range(BLOCKS))
    assert r.stats.local_blocks_read >= BLOCKS


def test_cut_link_resumes_without_resending_verified_blocks(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=12, zero_fraction=0.0)
    tgt = blank(tmp_path / "target.img")
    reporter = RecordingReporter()
    with start_agent(pki, {DEV: src}) as agent:
        proxy = CuttingProxy(agent.port, cut_after=SIZE // 2)
        cfg = replicator_config(
            pki, proxy.port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS, checkpoint_blocks=8
        )
        r = Replicator(cfg, reporter=reporter, commands=QueueCommandSource(Command.FINAL_SYNC), sleep=fast_sleep)
        assert r.run() is Outcome.COMPLETED
        proxy.close()
    assert proxy.cuts == 1 and r.stats.sessions == 2
    assert sha512_file(tgt) == sha512_file(src)
    # Verified blocks were never fetched again: each block was checkpointed exactly once...
    assert sorted(r.stats.fetched_by_volume[DEV]) == list(range(BLOCKS))
    # ...and what was resent is at most the unverified tail (the in-flight batch + the one requested ahead).
    assert 0 <= r.stats.blocks_received - BLOCKS <= 2 * 8
    errors = [e for e, _ in reporter.names("error")]
    assert errors == ["UNSTABLE_NETWORK"] and ("error_cleared", ()) in reporter.calls
    assert "DISCONNECTED" in [s for (s,) in reporter.names("replication_state")]


def test_agent_restart_resumes(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=13, zero_fraction=0.0)
    tgt = blank(tmp_path / "target.img")
    agent = start_agent(pki, {DEV: src})
    port = agent.port
    restarted: list = []

    def restart_once(snapshot) -> None:  # type: ignore[no-untyped-def]
        if not restarted and snapshot.disks[0].replicated_bytes >= SIZE // 3:
            restarted.append(True)
            agent.stop()  # kills the connection mid-transfer
            restarted.append(start_agent(pki, {DEV: src}, port=port))

    reporter = RecordingReporter(on_progress=restart_once)
    cfg = replicator_config(pki, port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS, checkpoint_blocks=8)
    r = Replicator(cfg, reporter=reporter, commands=QueueCommandSource(Command.FINAL_SYNC), sleep=fast_sleep)
    try:
        assert r.run() is Outcome.COMPLETED
    finally:
        for a in restarted[1:]:
            a.stop()
    assert len(restarted) == 2 and r.stats.sessions == 2
    assert sha512_file(tgt) == sha512_file(src)
    assert sorted(r.stats.fetched_by_volume[DEV]) == list(range(BLOCKS))
    assert r.stats.blocks_received - BLOCKS <= 2 * 8


class _Crash(Exception):
    pass


def test_restarted_replicator_resumes_from_the_journal(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=14, zero_fraction=0.0)
    tgt = blank(tmp_path / "target.img")
    state = tmp_path / "state"

    class CrashingCommands(QueueCommandSource):
        """The replicator polls its command source once per batch: the 5th poll "cuts the power"."""

        polls = 0

        def poll(self):  # type: ignore[no-untyped-def]
            self.polls += 1
            if self.polls == 5:
                raise _Crash("power cut")
            return super().poll()

    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, state, rescan=False, block_size=BS, checkpoint_blocks=8)
        first = Replicator(cfg, commands=CrashingCommands())
        with pytest.raises(_Crash):
            first.run()
        before = set(first.stats.fetched_by_volume[DEV])
        # The journal on disk knows what is verified and which batch was in flight (half written).
        path = next(state.glob("journal-*.bin"))
        journal, how = Journal.load_or_new(path, first._targets[0].journal.identity, BLOCKS)
        assert "in flight" in how
        assert {i for i, d in enumerate(journal.verified) if d is not None} == before
        assert journal.inflight and not journal.inflight & before
        # Scribble on one in-flight block, as a write torn by the power cut would.
        torn = min(journal.inflight)
        with open(tgt, "r+b") as f:
            f.seek(torn * BS)
            f.write(b"\xff" * 1000)

        second = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))
        assert second.run() is Outcome.COMPLETED
    assert sha512_file(tgt) == sha512_file(src)
    again = set(second.stats.fetched_by_volume[DEV])
    assert not again & before, "a verified block was sent again"
    assert again | before == set(range(BLOCKS)) and torn in again


def test_source_writes_during_continuous_replication_arrive(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=15)
    tgt = blank(tmp_path / "target.img")
    commands = QueueCommandSource(Command.CONTINUE)
    reporter = RecordingReporter()
    with start_agent(pki, {DEV: src}, watch_interval=0.1) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS)
        r = Replicator(cfg, reporter=reporter, commands=commands)
        result: list = []
        t = threading.Thread(target=lambda: result.append(r.run()))
        t.start()
        assert reporter.ready.wait(60), "never reached CONTINUOUS"
        synced = len(r.stats.fetched_by_volume[DEV])
        writes = [5, 6, 50]
        change_blocks(src, writes, BS, seed=99)  # the recovery instance keeps writing
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not set(writes) <= set(r.stats.fetched_by_volume[DEV][synced:]):
            time.sleep(0.05)
        # The changes arrived through continuous replication, before any final sync was asked for.
        assert set(writes) <= set(r.stats.fetched_by_volume[DEV][synced:])
        assert sha512_file(tgt) == sha512_file(src)
        change_blocks(src, [60], BS, seed=100)  # one more write right before the launch
        commands.set(Command.FINAL_SYNC)
        t.join(60)
    assert result == [Outcome.COMPLETED]
    assert sha512_file(tgt) == sha512_file(src)


def test_stop_command_stops_replication(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=16)
    tgt = blank(tmp_path / "target.img")
    commands = QueueCommandSource(Command.CONTINUE)
    reporter = RecordingReporter()
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", block_size=BS)
        r = Replicator(cfg, reporter=reporter, commands=commands)
        result: list = []
        t = threading.Thread(target=lambda: result.append(r.run()))
        t.start()
        assert reporter.ready.wait(60)
        commands.set(Command.STOP)
        t.join(30)
    assert result == [Outcome.STOPPED]
    assert ("completed", ()) not in reporter.calls
    assert reporter.names("replication_state")[-1] == ("STOPPED",)


def test_bandwidth_throttle_is_honoured(pki: Pki, tmp_path: Path) -> None:
    size = 4 * 1024 * 1024
    src = make_image(tmp_path / "source.img", size, seed=17, zero_fraction=0.0)
    tgt = blank(tmp_path / "target.img", size)
    with start_agent(pki, {DEV: src}) as agent:
        # 16 Mbps = 2 MB/s: 4 MiB cannot take less than ~1.6 s once the first burst is spent.
        cfg = replicator_config(
            pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS, bandwidth_mbps=16
        )
        r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))  # the configured rate holds
        start = time.monotonic()
        assert r.run() is Outcome.COMPLETED
        elapsed = time.monotonic() - start
    assert sha512_file(tgt) == sha512_file(src)
    assert elapsed >= (size - 1024 * 1024) / 2_000_000 * 0.95


@pytest.mark.root
def test_block_devices_on_both_sides(pki: Pki, tmp_path: Path) -> None:
    """Loop devices as the recovery volume and as the local disk: block devices, not files."""
    # Free space on the source; old data on the local disk: zero blocks go through BLKZEROOUT.
    src_img = _with_zero_blocks(make_image(tmp_path / "source.img", SIZE, seed=18), [2, 3, 30])
    tgt_img = make_image(tmp_path / "target.img", SIZE, seed=19, zero_fraction=0.0)
    loops: list[str] = []
    try:
        for img in (src_img, tgt_img):
            loops.append(run(["losetup", "--find", "--show", img], capture=True).stdout.strip())
        src_dev, tgt_dev = (Path(p) for p in loops)
        assert src_dev.is_block_device() and tgt_dev.is_block_device()
        with start_agent(pki, {DEV: src_dev}) as agent:
            cfg = replicator_config(pki, agent.port, {DEV: tgt_dev}, tmp_path / "state", rescan=True, block_size=BS)
            r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))
            assert r.run() is Outcome.COMPLETED
        assert sha512_file(tgt_dev, SIZE) == sha512_file(src_dev, SIZE)
    finally:
        for dev in loops:
            run(["losetup", "--detach", dev], check=False)
    assert sha512_file(tgt_img) == sha512_file(src_img)
