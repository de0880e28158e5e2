"""Replicator building blocks: wire codecs, ranges, journal, token bucket, configuration, progress."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest
from failback_replicator.blockio import write_zeros
from failback_replicator.config import ConfigError, ReplicatorConfig
from failback_replicator.interfaces import DiskProgress, ReplicationSnapshot, ReplicationState
from failback_replicator.journal import Journal
from failback_replicator.progress import ProgressDisplay, human_eta
from failback_replicator.throttle import TokenBucket
from failback_replicator.wire import (
    BLOCK_HEADER_SIZE,
    CODEC_RAW,
    CODEC_ZERO,
    CODEC_ZLIB,
    CODEC_ZSTD,
    FRAME_BLOCK,
    Connection,
    Decoder,
    Encoder,
    ProtocolError,
    available_codecs,
    from_ranges,
    parse_block,
    to_ranges,
)


@pytest.mark.parametrize("codec", available_codecs())
def test_encoder_compresses_only_where_it_pays(codec: str) -> None:
    enc, dec = Encoder(codec), Decoder()
    text = b"the quick brown fox jumps over the lazy dog\n" * 30000
    noise = os.urandom(1024 * 1024)
    c, packed = enc.encode(text, zero=False)
    assert c in (CODEC_ZSTD, CODEC_ZLIB) and len(packed) < len(text) // 10
    assert bytes(dec.decode(c, memoryview(packed), len(text))) == text
    c, packed = enc.encode(noise, zero=False)
    assert c == CODEC_RAW and packed is noise
    for _ in range(20):  # a long incompressible run is not even sampled, except every 8th block...
        enc.encode(noise, zero=False)
    c, packed = enc.encode(text, zero=False)
    assert c == CODEC_RAW or len(packed) < len(text) // 10
    compressed = [enc.encode(text, zero=False)[0] != CODEC_RAW for _ in range(8)]
    assert any(compressed) and all(compressed[compressed.index(True) :])  # ...which finds text again
    c, packed = enc.encode(bytes(4096), zero=True)
    assert c == CODEC_ZERO and packed == b""
    assert dec.decode(CODEC_ZERO, memoryview(b""), 4096) == bytes(4096)


def test_decoder_refuses_lies() -> None:
    with pytest.raises(ProtocolError, match="header says"):
        Decoder().decode(CODEC_RAW, memoryview(b"abc"), 4)
    with pytest.raises(ProtocolError, match="unknown block codec"):
        Decoder().decode(9, memoryview(b""), 0)


def test_ranges_round_trip() -> None:
    blocks = [0, 1, 2, 7, 9, 10, 3]
    assert to_ranges(blocks) == [[0, 4], [7, 1], [9, 2]]
    assert list(from_ranges(to_ranges(blocks))) == sorted(blocks)
    with pytest.raises(ProtocolError):
        list(from_ranges([[-1, 2]]))


def test_journal_is_atomic_and_distrusts_in_flight_blocks(tmp_path: Path) -> None:
    path = tmp_path / "journal.bin"
    ident = {"volume": "/dev/xvda", "size": 4 << 20, "block_size": 1 << 20}
    j, how = Journal.load_or_new(path, ident, 4)
    assert "starting fresh" in how
    j.mark_inflight([0, 1])
    j.save()
    j.mark_verified({0: b"a" * 32, 1: b"b" * 32}, next_inflight=[2, 3])
    j.save()
    assert not list(tmp_path.glob("*.tmp"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again, how = Journal.load_or_new(path, ident, 4)
    assert list(again.verified) == [b"a" * 32, b"b" * 32, None, None]
    assert again.inflight == {2, 3} and "2 in flight" in how
    # A journal about another volume or geometry is ignored, never applied.
    other, how = Journal.load_or_new(path, {**ident, "size": 8 << 20}, 8)
    assert list(other.verified) == [None] * 8 and "ignored" in how
    path.write_bytes(b"garbage\n")
    _, how = Journal.load_or_new(path, ident, 4)
    assert "ignored" in how


def test_token_bucket_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(8, min_burst=1_000_000, clock=lambda: now[0], sleep=sleep)  # 8 Mbps = 1 MB/s
    for _ in range(10):
        bucket.consume(1_000_000)
    # The first megabyte rides the burst; the next nine take a second each.
    assert sum(slept) == pytest.approx(9.0)
    unlimited = TokenBucket(None, clock=lambda: now[0], sleep=sleep)
    assert unlimited.consume(10**9) == 0.0


def _config_dict(tmp_path: Path) -> dict:
    return {
        "agent_host": "10.0.0.5",
        "agent_identity": "drs-agent.i-0123456789abcdef0",
        "client_identity": "fbc-0123456789abcdefg",
        "recovery_instance_id": "i-0123456789abcdef0",
        "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "c.key"},
        "volumes": [{"recovery_device": "/dev/xvda", "target": "/dev/sda"}],
        "state_dir": str(tmp_path),
    }


def test_config_round_trip_and_errors(tmp_path: Path) -> None:
    d = _config_dict(tmp_path)
    cfg = ReplicatorConfig.from_dict(d)
    assert cfg.agent_port == 1500 and cfg.block_size == 1 << 20
    assert ReplicatorConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="missing setting 'agent_host'"):
        ReplicatorConfig.from_dict({k: v for k, v in d.items() if k != "agent_host"})
    with pytest.raises(ConfigError, match="block_size"):
        ReplicatorConfig.from_dict({**d, "block_size": 3000})
    with pytest.raises(ConfigError, match="used twice"):
        ReplicatorConfig.from_dict(
            {**d, "volumes": [{"recovery_device": "/dev/xvda", "target": "/dev/sda"},
                              {"recovery_device": "/dev/xvdb", "target": "/dev/sda"}]}
        )  # fmt: skip
    with pytest.raises(ConfigError, match="not found"):
        ReplicatorConfig.load(tmp_path / "nope.json")


def _snapshot(done: int) -> ReplicationSnapshot:
    disk = DiskProgress("/dev/xvda", "/dev/sda", total_bytes=100 << 20, replicated_bytes=done, rate_bps=10 << 20)
    disk.backlogged_bytes = (100 << 20) - done
    return ReplicationSnapshot(state=ReplicationState.INITIAL_SYNC, disks=[disk])


def test_progress_on_a_serial_console_is_plain_and_throttled() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, interval=3600)  # StringIO is no tty: plain lines
    assert not display.live
    display.progress(_snapshot(50 << 20))
    display.progress(_snapshot(60 << 20))  # within the interval: dropped
    display.replication_state(ReplicationState.CONTINUOUS)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("INITIAL_SYNC: /dev/xvda -> /dev/sda: 50.0 MiB / 100.0 MiB ( 50.0%)")
    assert "10.0 MiB/s" in lines[0] and "ETA 00:05" in lines[0]
    assert lines[1] == "Replication state: CONTINUOUS" and len(lines) == 2


def test_progress_on_a_terminal_redraws_in_place() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, live=True)
    display.interval = 0
    display.progress(_snapshot(10 << 20))
    display.progress(_snapshot(20 << 20))
    assert "\x1b[1F\x1b[J" in out.getvalue()  # cursor up one line, erase, redraw
    assert human_eta(3725) == "1:02:05" and human_eta(None) == "--:--"


def test_frames_are_received_into_a_reused_buffer_and_oversized_ones_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        sender, receiver = Connection(a), Connection(b)
        block = os.urandom(4096)
        sender.send_block(0, 7, CODEC_RAW, len(block), b"d" * 32, block)
        buf = bytearray(4096 + BLOCK_HEADER_SIZE)
        ftype, body = receiver.recv_frame(buf, limit=len(buf))
        assert ftype == FRAME_BLOCK and body.obj is buf  # no per-frame allocation
        assert parse_block(body)[1] == 7 and bytes(parse_block(body)[5]) == block
        # A peer announcing more than a block (+ header) is refused before anything is allocated.
        sender.send_block(0, 8, CODEC_RAW, 8192, b"d" * 32, os.urandom(8192))
        with pytest.raises(ProtocolError, match="limit"):
            receiver.recv_frame(buf, limit=len(buf))


def _zeroed(path: Path, before: bytes, offset: int, length: int) -> None:
    after = path.read_bytes()
    assert after[offset : offset + length] == bytes(length)
    assert after[:offset] == before[:offset] and after[offset + length : len(before)] == before[offset + length :]


def test_write_zeros_on_an_image_file(tmp_path: Path) -> None:
    mib = 1024 * 1024
    path = tmp_path / "disk.img"
    before = os.urandom(3 * mib)
    path.write_bytes(before)
    fd = os.open(path, os.O_RDWR)
    try:
        assert write_zeros(fd, mib, mib) in ("zero-range", "punch-hole")  # the kernel did it, not a write
        _zeroed(path, before, mib, mib)
        write_zeros(fd, 3 * mib, 4096)  # past the end: the file grows, as a write would make it
        assert path.stat().st_size == 3 * mib + 4096
        assert write_zeros(fd, 0, 0) == "nothing"
    finally:
        os.close(fd)
    _zeroed(path, before + bytes(4096), mib, mib)


@pytest.mark.root
def test_write_zeros_on_a_block_device(tmp_path: Path) -> None:
    from image.core.run import run

    mib = 1024 * 1024
    img = tmp_path / "disk.img"
    before = os.urandom(4 * mib)
    img.write_bytes(before)
    dev = run(["losetup", "--find", "--show", img], capture=True).stdout.strip()
    try:
        fd = os.open(dev, os.O_RDWR)
        try:
            assert write_zeros(fd, mib, 2 * mib) == "blkzeroout"
            assert os.pread(fd, 2 * mib, mib) == bytes(2 * mib)  # no stale page cache either
            assert write_zeros(fd, 100, 1000) == "write"  # not sector-aligned: written
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        run(["losetup", "--detach", dev], check=False)
    expected = bytearray(before)
    expected[mib : 3 * mib] = bytes(2 * mib)
    expected[100:1100] = bytes(1000)
    assert img.read_bytes() == bytes(expected)
