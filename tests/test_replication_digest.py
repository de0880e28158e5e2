"""Protocol version 2: the negotiated block digest (BLAKE3 preferred, SHA-256 the fallback).

Negotiation both ways over real TLS on loopback (a version-2 pair, a version-1 agent, a version-1
replicator, SHA-256-only sides), the run-time fallback when the blake3 module does not load, and
journals whose digests are of another algorithm than the session's (never compared: re-read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
from pathlib import Path

import blake3
import pytest
from drs_agent.testing import (
    AGENT_CN,
    CLIENT_ID,
    Pki,
    blank_image,
    change_blocks,
    make_image,
    replicator_config,
    start_agent,
)
from failback_replicator import wire
from failback_replicator.blockio import BlockHasher
from failback_replicator.config import ConfigError, ReplicatorConfig
from failback_replicator.engine import Outcome, ReplicationFailed, Replicator
from failback_replicator.interfaces import Command, QueueCommandSource
from failback_replicator.journal import Journal
from failback_replicator.tlsconf import client_context, require_identity
from failback_replicator.wire import FRAME_DIGESTS, Connection, parse_digests

from image.stages.hashes import sha512_file

BS = 256 * 1024
SIZE = 8 * 1024 * 1024
BLOCKS = SIZE // BS
DEV = "/dev/xvda"
V1_AGENT = {"protocol_versions": (1,), "digests": ("sha256",)}  # what a version-1 agent serves


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def blank(path: Path, size: int = SIZE) -> Path:
    return blank_image(path, size)


def sync(cfg: ReplicatorConfig) -> Replicator:
    r = Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC))
    assert r.run() is Outcome.COMPLETED
    return r


# ---------------------------------------------------------------- the digest functions


def test_digest_functions_and_preference() -> None:
    data = bytes(range(256)) * 5000
    assert wire.available_digests() == ["blake3", "sha256"]  # blake3 is in the dev venv
    assert wire.digest_function("sha256")(data) == hashlib.sha256(data).digest()
    assert wire.digest_function("blake3")(memoryview(data)) == blake3.blake3(data).digest()
    with pytest.raises(wire.ProtocolError, match="'md5' is not available"):
        wire.digest_function("md5")
    # The agent takes the replicator's first choice it has; nothing in common: None.
    assert wire.choose_digest(["blake3", "sha256"], ["sha256", "blake3"]) == "blake3"
    assert wire.choose_digest(["sha256", "blake3"]) == "sha256"
    assert wire.choose_digest(["blake3", "sha256"], ["sha256"]) == "sha256"
    assert wire.choose_digest(["md5", 7], ["sha256"]) is None
    zeros = bytes(BS)
    for name in ("sha256", "blake3"):
        h = BlockHasher(name)
        assert h(zeros) == h.zero(BS) == wire.digest_function(name)(zeros)
        assert h(data) == wire.digest_function(name)(data)


@pytest.fixture()
def no_blake3(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`import blake3` fails here as it does where the module is missing or its library broken."""
    monkeypatch.setitem(sys.modules, "blake3", None)
    wire._load_blake3.cache_clear()
    yield
    monkeypatch.undo()
    wire._load_blake3.cache_clear()


def test_missing_blake3_falls_back_to_sha256_with_one_log_line(
    no_blake3: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="failback_replicator"):
        for _ in range(3):
            assert wire.available_digests() == ["sha256"]
        with pytest.raises(wire.ProtocolError, match="not available"):
            wire.digest_function("blake3")
    lines = [r.getMessage() for r in caplog.records if "blake3" in r.getMessage()]
    assert len(lines) == 1 and "SHA-256" in lines[0]


def test_a_blake3_module_that_hashes_wrong_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Liar:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def digest(self) -> bytes:
            return hashlib.sha256(self.data).digest()

    fake = type(sys)("blake3")
    fake.blake3 = Liar  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "blake3", fake)
    wire._load_blake3.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="failback_replicator"):
            assert wire.available_digests() == ["sha256"]
        assert "test vector" in caplog.text
    finally:
        monkeypatch.undo()
        wire._load_blake3.cache_clear()
    assert wire.available_digests() == ["blake3", "sha256"]


def test_config_digests(tmp_path: Path, pki: Pki) -> None:
    cfg = replicator_config(pki, 1500, {DEV: tmp_path / "t.img"}, tmp_path / "state", digests=("sha256",))
    again = ReplicatorConfig.from_dict(json.loads(cfg.to_json()))
    assert again.digests == ("sha256",) and again == cfg
    with pytest.raises(ConfigError, match=r"digests: .*md5"):
        replicator_config(pki, 1500, {DEV: tmp_path / "t.img"}, tmp_path / "state", digests=("md5",)).validate()


# ---------------------------------------------------------------- negotiation on the wire


def _connect(pki: Pki, port: int) -> Connection:
    sock = client_context(pki.client).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    require_identity(sock, {AGENT_CN}, "agent")
    return Connection(sock)


def _digests(conn: Connection) -> list[bytes]:
    conn.send_json({"op": "DIGESTS", "volume": 0})
    out: list[bytes] = []
    while True:
        ftype, body = conn.recv_frame()
        if ftype != FRAME_DIGESTS:
            return out
        out += parse_digests(body)[2]


def test_agent_negotiates_per_session(pki: Pki, tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 1024 * 1024, seed=3)
    raw = img.read_bytes()
    blocks = [raw[i : i + BS] for i in range(0, len(raw), BS)]
    hello = {"op": "HELLO", "block_size": BS, "codecs": [], "client": CLIENT_ID}
    with start_agent(pki, {DEV: img}) as agent:
        # A version-1 replicator: version 1 back, no digest field, SHA-256 digests.
        conn = _connect(pki, agent.port)
        conn.send_json({**hello, "version": 1})
        reply = conn.recv_json()
        assert reply["version"] == 1 and "digest" not in reply
        assert _digests(conn) == [hashlib.sha256(b).digest() for b in blocks]
        conn.sock.close()
        # Version 2: the replicator's first choice the agent has, in the same agent's other cache.
        for offered, expected, fn in (
            (["blake3", "sha256"], "blake3", lambda b: blake3.blake3(b).digest()),
            (["sha256", "blake3"], "sha256", lambda b: hashlib.sha256(b).digest()),
        ):
            conn = _connect(pki, agent.port)
            conn.send_json({**hello, "version": 2, "digests": offered})
            reply = conn.recv_json()
            assert (reply["version"], reply["digest"]) == (2, expected)
            assert _digests(conn) == [fn(b) for b in blocks]
            conn.sock.close()
        conn = _connect(pki, agent.port)
        conn.send_json({**hello, "version": 2, "digests": ["md5"]})
        err = conn.recv_json()
        assert err["error"] == "BAD_REQUEST" and "no common block digest" in err["message"]
        conn.send_json({**hello, "version": 3, "digests": ["sha256"]})
        assert conn.recv_json()["error"] == "VERSION"
        conn.sock.close()
    with start_agent(pki, {DEV: img}, digests=("sha256",)) as agent:  # a version-2 agent without blake3
        conn = _connect(pki, agent.port)
        conn.send_json({**hello, "version": 2, "digests": ["blake3", "sha256"]})
        assert conn.recv_json()["digest"] == "sha256"
        conn.sock.close()


@pytest.mark.parametrize(
    ("agent_settings", "replicator_digests", "expected"),
    [
        ({}, None, (2, "blake3")),
        ({}, ("sha256",), (2, "sha256")),  # a replicator pinned (or without blake3) to SHA-256
        ({"digests": ("sha256",)}, None, (2, "sha256")),  # a version-2 agent without blake3
        (V1_AGENT, None, (1, "sha256")),  # a version-1 agent: HELLO again in version 1
    ],
    ids=["v2-blake3", "replicator-sha256", "agent-sha256", "agent-v1"],
)
def test_replicator_negotiates_with_any_agent(
    pki: Pki, tmp_path: Path, agent_settings: dict, replicator_digests: tuple | None, expected: tuple
) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=31)
    tgt = blank(tmp_path / "target.img")
    with start_agent(pki, {DEV: src}, **agent_settings) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS,
                                digests=replicator_digests)  # fmt: skip
        r = sync(cfg)
    assert (r.stats.protocol_version, r.stats.digest_algorithm) == expected
    assert sha512_file(tgt) == sha512_file(src)
    assert sorted(r.stats.fetched_by_volume[DEV]) == list(range(BLOCKS))
    journal = next((tmp_path / "state").glob("journal-*.bin"))
    assert f'"digest":"{expected[1]}"' in journal.read_bytes().split(b"\n", 1)[0].decode()


def test_replicator_without_sha256_cannot_talk_to_a_version_1_agent(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=32)
    with start_agent(pki, {DEV: src}, **V1_AGENT) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: blank(tmp_path / "t.img")}, tmp_path / "state",
                                block_size=BS, digests=("blake3",))  # fmt: skip
        with pytest.raises(ReplicationFailed, match="VERSION"):
            Replicator(cfg, commands=QueueCommandSource(Command.FINAL_SYNC), sleep=lambda s: None).run()


def test_no_usable_digest_is_a_configuration_error(no_blake3: None, pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", SIZE, seed=34)
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: blank(tmp_path / "t.img")}, tmp_path / "state",
                                digests=("blake3",))  # fmt: skip
        with pytest.raises(ReplicationFailed, match="none of the configured block digests"):
            sync(cfg)


# ---------------------------------------------------------------- journals of another algorithm


def test_journal_records_its_algorithm_and_drops_other_digests(tmp_path: Path) -> None:
    path = tmp_path / "journal.bin"
    ident = {"volume": DEV, "size": 4 * BS, "block_size": BS}
    j, _ = Journal.load_or_new(path, ident, 4, "sha256")
    j.mark_verified({0: b"a" * 32, 2: b"c" * 32})
    j.phase = "VERIFIED"
    j.save()
    again, how = Journal.load_or_new(path, ident, 4, "blake3")
    assert again.digest == "sha256" and "(sha256)" in how  # as written: the caller decides
    assert again.adopt_digest("sha256") is None
    vouched = again.adopt_digest("blake3")
    assert vouched == bytearray([1, 0, 1, 0])
    assert list(again.verified) == [None] * 4 and again.phase == "SYNC" and again.digest == "blake3"
    again.save()
    assert Journal.load_or_new(path, ident, 4)[0].digest == "blake3"
    # A version-1 journal (no "digest" in its header) holds SHA-256 digests.
    header, body = path.read_bytes().split(b"\n", 1)
    path.write_bytes(header.replace(b',"digest":"blake3"', b"") + b"\n" + body)
    assert b"digest" not in path.read_bytes().split(b"\n", 1)[0]
    assert Journal.load_or_new(path, ident, 4, "blake3")[0].digest == "sha256"


@pytest.mark.parametrize(
    ("first_digests", "then_agent"),
    [
        (("sha256",), {}),  # an upgrade: the journal's SHA-256, now BLAKE3
        (None, V1_AGENT),  # the agent went back to version 1: the journal's BLAKE3, now SHA-256
    ],
    ids=["sha256-then-blake3", "blake3-then-v1-agent"],
)
def test_resume_with_another_digest_rereads_instead_of_comparing(
    pki: Pki, tmp_path: Path, first_digests: tuple | None, then_agent: dict
) -> None:
    """A full sync's journal, then a session that negotiates another digest (an upgraded replicator,
    a downgraded agent): the local blocks are re-read and re-digested, only real changes are sent."""
    src = make_image(tmp_path / "source.img", SIZE, seed=33)
    tgt = blank(tmp_path / "target.img")
    state = tmp_path / "state"
    with start_agent(pki, {DEV: src}) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, state, rescan=False, block_size=BS,
                                digests=first_digests)  # fmt: skip
        before = sync(cfg)
    changed = [2, 9, 30]
    change_blocks(src, changed, BS)
    with start_agent(pki, {DEV: src}, **then_agent) as agent:
        cfg = replicator_config(pki, agent.port, {DEV: tgt}, state, rescan=False, block_size=BS)
        after = sync(cfg)
    assert before.stats.digest_algorithm != after.stats.digest_algorithm
    assert sha512_file(tgt) == sha512_file(src)
    # Digests of different algorithms never equal: had they been compared, every block would be sent.
    assert sorted(after.stats.fetched_by_volume[DEV]) == changed
    # Every block the journal vouched for re-read and re-digested once, and the changed ones read back.
    assert after.stats.local_blocks_read == BLOCKS + len(changed)
    header = next(state.glob("journal-*.bin")).read_bytes().split(b"\n", 1)[0].decode()
    assert f'"digest":"{after.stats.digest_algorithm}"' in header and '"phase":"VERIFIED"' in header


def test_reconnecting_to_an_agent_with_another_digest_mid_sync(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The link drops mid-sync and the agent that answers again is a version-1 one: the same
    replicator drops its BLAKE3 journal digests, re-reads what they vouched for with SHA-256 and
    fetches only the rest (verified blocks are not sent again)."""
    src = make_image(tmp_path / "source.img", SIZE, seed=35, zero_fraction=0.0)
    tgt = blank(tmp_path / "target.img")
    agents = [start_agent(pki, {DEV: src})]
    port = agents[0].port

    class SwapAgent(QueueCommandSource):
        """The replicator polls once per batch: at the 4th poll the agent is replaced."""

        polls = 0

        def poll(self):  # type: ignore[no-untyped-def]
            self.polls += 1
            if self.polls == 4:
                agents[0].stop()
                agents.append(start_agent(pki, {DEV: src}, port=port, **V1_AGENT))
            return super().poll()

    try:
        cfg = replicator_config(pki, port, {DEV: tgt}, tmp_path / "state", rescan=False, block_size=BS,
                                checkpoint_blocks=4)  # fmt: skip
        r = Replicator(cfg, commands=SwapAgent(Command.FINAL_SYNC), sleep=lambda s: None)
        with caplog.at_level(logging.INFO, logger="failback_replicator"):
            assert r.run() is Outcome.COMPLETED
    finally:
        for a in agents:
            a.stop()
    assert len(agents) == 2 and r.stats.sessions >= 2
    assert (r.stats.protocol_version, r.stats.digest_algorithm) == (1, "sha256")
    assert sha512_file(tgt) == sha512_file(src)
    fetched = list(r.stats.fetched_by_volume[DEV])
    assert sorted(set(fetched)) == list(range(BLOCKS))
    assert len(fetched) == BLOCKS, "a block verified before the swap was sent again"
    assert "journal digests are blake3, this session's are sha256" in caplog.text
