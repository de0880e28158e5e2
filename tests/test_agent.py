"""The replication agent: change tracking by generation, its protocol answers, its command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from drs_agent.server import CompressionGovernor
from drs_agent.testing import CLIENT_ID, RECOVERY_INSTANCE_ID, Pki, age, change_blocks, make_image, start_agent
from drs_agent.volume import SourceVolume, VolumeSpec
from failback_replicator.tlsconf import client_context, require_identity
from failback_replicator.wire import FRAME_BLOCK, FRAME_DIGESTS, Connection, Decoder, parse_block, parse_digests

from image.stages.hashes import sha512_file

BS = 64 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def test_scan_stamps_changed_blocks_with_a_new_generation(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 2 * 1024 * 1024, seed=1)
    vol = SourceVolume(VolumeSpec("/dev/xvda", img), BS)
    try:
        vol.refresh()
        first = vol.generation
        assert vol.changes_since(first) == (first, [])
        change_blocks(img, [2, 9], BS)
        vol.refresh()
        gen, changed = vol.changes_since(first)
        assert gen == first + 1 and changed == [2, 9]
        assert vol.changes_since(gen) == (gen, [])
        data, digest = vol.read(9)
        assert len(data) == BS and digest == vol.digests[9]
    finally:
        vol.close()


def test_unchanged_old_image_is_not_rescanned(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 1024 * 1024, seed=2)
    age(img, 60)
    vol = SourceVolume(VolumeSpec("/dev/xvda", img), BS)
    try:
        vol.refresh()
        vol.refresh()
        assert vol.scans == 1, "an image file untouched since the last scan was read again"
        change_blocks(img, [1], BS)  # a write moves mtime: the next look re-reads
        vol.refresh()
        assert vol.scans == 2 and vol.changes_since(1)[1] == [1]
    finally:
        vol.close()


def test_digests_taken_by_reads_of_an_unchanged_image_serve_the_next_scan(tmp_path: Path) -> None:
    """After a full sync READ every block of an image nobody writes, the verification's DIGESTS
    is answered from those digests (no second pass over the source) -- and only then."""
    img = make_image(tmp_path / "disk.img", 1024 * 1024, seed=5)
    age(img, 60)
    vol = SourceVolume(VolumeSpec("/dev/xvda", img), BS)
    try:
        buf = bytearray(BS)
        for i in range(vol.blocks - 1):
            vol.read(i, buf)
        vol.refresh()
        assert vol.scans == 1, "a block never read was not digested: the scan must read the image"
        for i in range(vol.blocks):
            vol.read(i, buf)
        vol.refresh()
        assert vol.scans == 1, "every block was read under the same stamp: the cache is current"
        change_blocks(img, [3], BS)  # mtime moves: neither the reads nor the scan are current now
        for i in range(vol.blocks):
            vol.read(i, buf)  # within 2 s of the write: the stamp is not trusted, nothing is cached
        assert [d for _, d in vol.scan()] and vol.scans == 2
        fresh = SourceVolume(VolumeSpec("/dev/xvda", img), BS)
        try:
            assert [bytes(p) for _, p in fresh.scan()] == [bytes(p) for _, p in vol.scan(force=True)]
        finally:
            fresh.close()
    finally:
        vol.close()


def _connect(pki: Pki, port: int) -> Connection:
    sock = client_context(pki.client).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    require_identity(sock, {"drs-agent." + RECOVERY_INSTANCE_ID}, "agent")
    return Connection(sock)


def test_agent_answers_the_protocol(pki: Pki, tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 1024 * 1024, seed=3)
    with open(img, "ab") as f:
        f.write(os.urandom(4096))  # the last block is short
    with start_agent(pki, {"/dev/xvdb": img}) as agent:
        conn = _connect(pki, agent.port)
        conn.send_json({"op": "READ", "volume": 0, "blocks": [[0, 1]]})
        assert conn.recv_json()["error"] == "BAD_REQUEST"  # HELLO first
        conn.send_json({"op": "HELLO", "version": 1, "block_size": BS, "codecs": ["zlib"], "client": CLIENT_ID})
        hello = conn.recv_json()
        assert hello["recovery_instance"] == RECOVERY_INSTANCE_ID and hello["codec"] == "zlib"
        assert hello["volumes"] == [{"name": "/dev/xvdb", "size": 1024 * 1024 + 4096}]
        conn.send_json({"op": "DIGESTS", "volume": 0})
        digests: list[bytes] = []
        while True:
            ftype, body = conn.recv_frame()
            if ftype != FRAME_DIGESTS:
                break
            digests += parse_digests(body)[2]
        assert len(digests) == 17
        conn.send_json({"op": "READ", "volume": 0, "blocks": [[15, 2]]})
        dec = Decoder()
        raw = img.read_bytes()
        for index in (15, 16):
            ftype, body = conn.recv_frame()
            assert ftype == FRAME_BLOCK
            _, got, codec, raw_len, digest, payload = parse_block(body)
            assert got == index and digest == digests[index]
            assert bytes(dec.decode(codec, payload, raw_len)) == raw[index * BS : (index + 1) * BS]
        assert conn.recv_json()["op"] == "READ"
        conn.send_json({"op": "READ", "volume": 0, "blocks": [[17, 1]]})
        assert "outside volume" in conn.recv_json()["message"]
        conn.send_json({"op": "CHANGES", "since": {"0": 1}, "wait": 0})
        assert conn.recv_json()["changed"] == {"0": []}
        conn.send_json({"op": "BYE"})
        conn.sock.close()


def test_agent_command_line(pki: Pki, tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 1024 * 1024, seed=4)
    bad = subprocess.run(
        [sys.executable, "-m", "drs_agent.cli", "--recovery-instance-id", RECOVERY_INSTANCE_ID, "--volume", "disk.img",
         "--ca", pki.agent.ca, "--cert", pki.agent.cert, "--key", pki.agent.key, "--paired-client", CLIENT_ID],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "expected DEVICE_NAME=PATH" in bad.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "drs_agent.cli", "--recovery-instance-id", RECOVERY_INSTANCE_ID,
         "--volume", f"/dev/xvda={img}", "--ca", pki.agent.ca, "--cert", pki.agent.cert, "--key", pki.agent.key,
         "--paired-client", CLIENT_ID, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        port = int(line.rsplit(":", 1)[1])
        conn = _connect(pki, port)
        conn.send_json({"op": "HELLO", "version": 1, "block_size": BS, "codecs": []})
        assert conn.recv_json()["volumes"][0]["name"] == "/dev/xvda"
        conn.sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "private" not in (proc.stderr.read() if proc.stderr else "").lower()


def test_compression_governor_compresses_only_while_the_link_is_slower_than_zstd() -> None:
    mib = 1024 * 1024
    g = CompressionGovernor()
    assert g.compress(), "a session starts compressing: its link is not known yet"
    g.compressed(mib, 0.002)  # zstd at ~500 MB/s
    for _ in range(CompressionGovernor.WARM_UP - 1):  # TCP's buffers take the first blocks at once
        g.sent(mib, 0.00005)
        assert g.compress(), "the first sends say nothing about the link"
    for _ in range(5):  # then a 1 Gbps link: 1 MiB takes ~9 ms to send
        g.sent(mib, 0.009)
    assert g.compress() and g.link_bps is not None and g.link_bps < g.compress_bps  # type: ignore[operator]
    # One send that fit in TCP's free buffer space takes no time; it must not make the link look fast.
    g.sent(400 * 1024, 0.00002)
    assert g.compress()
    for _ in range(20):  # loopback / 10 GbE: 1 MiB in 0.8 ms, faster than zstd
        g.sent(mib, 0.0008)
    assert not g.compress()
    for _ in range(20):  # the link slows down (the receiver throttles): compression comes back
        g.sent(mib, 0.04)
    assert g.compress()


@pytest.mark.parametrize("pays", [True, False])
def test_agent_compresses_blocks_only_when_the_governor_says_it_pays(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pays: bool
) -> None:
    """The same compressible volume: every block compressed when compression pays (a slow link),
    every block raw when it does not (a fast one); the wire bytes say which way they went."""
    from drs_agent.testing import blank_image, replicator_config
    from failback_replicator.engine import Replicator
    from failback_replicator.interfaces import Command, QueueCommandSource

    monkeypatch.setattr(CompressionGovernor, "compress", lambda self: pays)
    bs = 256 * 1024
    size = 4 * 1024 * 1024
    src = tmp_path / "source.img"
    line = b"failback text compresses well\n"
    src.write_bytes((line * (size // len(line) + 1))[:size])
    with start_agent(pki, {"/dev/xvda": src}) as agent:
        tgt = blank_image(tmp_path / "target.img", size)
        cfg = replicator_config(pki, agent.port, {"/dev/xvda": tgt}, tmp_path / "state", rescan=False, block_size=bs)
        r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))
        r.run()
    assert sha512_file(tgt) == sha512_file(src)
    if pays:
        assert r.stats.wire_bytes_in < size // 10, f"{r.stats.wire_bytes_in} bytes on the wire: not compressed"
    else:
        assert r.stats.wire_bytes_in > size, f"{r.stats.wire_bytes_in} bytes on the wire: compressed anyway"
