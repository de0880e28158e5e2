"""The replication agent: serves the recovery instance's volumes to the paired failback replicator.

TCP (default 1500), TLS 1.2+, mutual authentication against the pinned pairing CA; a peer whose
certificate is not from that CA, or whose CN is not a paired failback client ID, is refused and
logged. Requests are served one at a time per connection; READ streams blocks from a reader
thread (pread + digest + compression) while the connection thread encrypts and sends.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from failback_replicator import PROTOCOL_VERSIONS
from failback_replicator.buffers import BufferPool
from failback_replicator.tlsconf import PairingError, TlsFiles, require_identity, server_context
from failback_replicator.transfer import Block
from failback_replicator.wire import (
    CODEC_NAMES,
    CODEC_RAW,
    CODEC_ZERO,
    DEFAULT_BLOCK_SIZE,
    DIGEST_SHA256,
    Connection,
    Encoder,
    ProtocolError,
    available_codecs,
    available_digests,
    choose_digest,
    from_ranges,
    to_ranges,
)

from .volume import SourceVolume, VolumeSpec

log = logging.getLogger("drs_agent")


class CompressionGovernor:
    """Whether the next block is worth compressing: only while the link is slower than zstd.

    Two rates, each a moving average over this session's own data blocks: the link's (bytes
    a `send_block` of a data block took, over the seconds it took: TCP makes a send wait when the
    link is the bottleneck) and the compressor's (bytes in over seconds). On a WAN or 1 GbE link
    sending 1 MiB takes longer than compressing it, so blocks go compressed; on a fast link
    (loopback, 10 GbE) zstd would be the bottleneck, so they go raw. A session starts compressing
    (the link is not known yet); zero blocks (no payload) teach it nothing."""

    WARM_UP = 8  # data blocks sent before the link's rate is trusted
    _DECAY = 0.8  # weight of the past in each decayed sum: the last ~5 data blocks count most

    def __init__(self) -> None:
        # Decayed sums of bytes and seconds (a rate is their ratio: averaging per-block rates
        # would let one send that fit in TCP's free buffer space look like an infinitely fast link).
        self._link = [0.0, 0.0]
        self._zstd = [0.0, 0.0]
        self._sends = 0

    @classmethod
    def _add(cls, sums: list[float], nbytes: int, seconds: float) -> None:
        sums[0] = cls._DECAY * sums[0] + nbytes
        sums[1] = cls._DECAY * sums[1] + seconds

    @staticmethod
    def _rate(sums: list[float]) -> float | None:
        return sums[0] / sums[1] if sums[1] > 0 else None

    @property
    def link_bps(self) -> float | None:
        return self._rate(self._link)

    @property
    def compress_bps(self) -> float | None:
        return self._rate(self._zstd)

    def sent(self, nbytes: int, seconds: float) -> None:
        self._sends += 1
        self._add(self._link, nbytes, seconds)

    def compressed(self, nbytes: int, seconds: float) -> None:
        self._add(self._zstd, nbytes, seconds)

    def compress(self) -> bool:
        link, zstd = self.link_bps, self.compress_bps
        # The first sends of a session fill TCP's buffers and take no time whatever the link: the
        # link's rate means something only once a few blocks went out.
        if self._sends < self.WARM_UP or link is None or zstd is None:
            return True
        return link < zstd


@dataclass
class AgentConfig:
    recovery_instance_id: str
    volumes: list[VolumeSpec]
    tls: TlsFiles
    paired_clients: set[str]  # failback client IDs (certificate CNs) allowed to connect
    host: str = "127.0.0.1"
    port: int = 1500
    watch_interval: float = 5.0  # seconds between background change scans (0 = off)
    # Protocol versions and block digests served (None: all this build has). Tests narrow them to
    # play a version-1 or a SHA-256-only agent.
    protocol_versions: tuple[int, ...] = PROTOCOL_VERSIONS
    digests: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)


class AgentServer:
    def __init__(self, config: AgentConfig) -> None:
        self.cfg = config
        self.ctx = server_context(config.tls)
        self._volumes: dict[tuple[int, str], list[SourceVolume]] = {}  # by block size and digest
        self._vol_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self.refused: list[str] = []  # reasons, for tests and the log
        self.port = config.port
        self.bytes_sent = 0

    # -------------------------------------------------------------- lifecycle
    def start(self) -> AgentServer:
        if self._listener is not None:
            raise RuntimeError("agent already started")
        sock = socket.create_server((self.cfg.host, self.cfg.port), reuse_port=False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        log.info(
            "agent for %s listening on %s:%d, volumes: %s",
            self.cfg.recovery_instance_id,
            self.cfg.host,
            self.port,
            ", ".join(f"{v.name}={v.path}" for v in self.cfg.volumes),
        )
        self._spawn(self._accept_loop, "agent-accept")
        if self.cfg.watch_interval > 0:
            self._spawn(self._watch_loop, "agent-watch")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it listening.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self._threads:
            t.join(timeout=10)
        for vols in self._volumes.values():
            for v in vols:
                v.close()

    def __enter__(self) -> AgentServer:
        return self if self._listener is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., object], name: str, *args: object) -> None:
        t = threading.Thread(target=target, name=name, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def volumes(self, block_size: int, digest: str = DIGEST_SHA256) -> list[SourceVolume]:
        """The volumes with their digest caches for sessions of this block size and digest algorithm
        (a cache holds one algorithm's digests: sessions that negotiated another have their own)."""
        with self._vol_lock:
            key = (block_size, digest)
            if key not in self._volumes:
                self._volumes[key] = [SourceVolume(s, block_size, digest) for s in self.cfg.volumes]
            return self._volumes[key]

    def digests(self) -> list[str]:
        """The block digests this agent serves, in its order of preference."""
        have = available_digests()
        return [d for d in have if self.cfg.digests is None or d in self.cfg.digests]

    # -------------------------------------------------------------- threads
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                raw, addr = self._listener.accept()
            except OSError:
                return
            self._spawn(self._serve, f"agent-conn-{addr[1]}", raw, addr)

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.cfg.watch_interval):
            with self._vol_lock:
                sets = list(self._volumes.values())
            for vols in sets:
                for v in vols:
                    try:
                        v.refresh()
                    except OSError as exc:
                        log.error("scanning %s failed: %s", v.spec.path, exc)

    def _serve(self, raw: socket.socket, addr: tuple) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        self._conns.add(raw)
        sock: ssl.SSLSocket | None = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(30)
            try:
                sock = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self._refuse(peer, f"TLS handshake failed ({exc.__class__.__name__}: {exc})")
                return
            # wrap_socket took over the descriptor: stop() must shut the TLS socket down, not `raw`.
            self._conns.discard(raw)
            self._conns.add(sock)
            conn = Connection(sock)
            try:
                ident = require_identity(sock, self.cfg.paired_clients, "failback client")
            except PairingError as exc:
                self._refuse(peer, str(exc))
                with contextlib.suppress(OSError):
                    conn.send_json({"op": "ERROR", "error": "NOT_PAIRED", "message": str(exc)})
                return
            # Generous: the replicator may spend long stretches reading its local disk between requests.
            sock.settimeout(3600)
            log.info("failback client %s connected from %s (%s)", ident, peer, sock.version())
            try:
                _Session(self, conn, ident).run()
            except (OSError, ConnectionError, ProtocolError) as exc:
                log.info("connection from %s ended: %s", peer, exc)
            finally:
                self.bytes_sent += conn.bytes_out
        finally:
            for s in (raw, sock):
                if s is not None:
                    self._conns.discard(s)
                    s.close()

    def _refuse(self, peer: str, reason: str) -> None:
        self.refused.append(reason)
        log.warning("refused connection from %s: %s", peer, reason)


class _Session:
    def __init__(self, server: AgentServer, conn: Connection, ident: str) -> None:
        self.server = server
        self.conn = conn
        self.ident = ident
        self.vols: list[SourceVolume] = []
        self.encoder: Encoder | None = None
        self.governor = CompressionGovernor()  # per session: what it learns of the link serves every READ

    def run(self) -> None:
        while True:
            msg = self.conn.recv_json()
            op = msg["op"]
            if op == "BYE":
                log.info("failback client %s said goodbye", self.ident)
                return
            handler = getattr(self, f"op_{op.lower()}", None)
            if handler is None or (op != "HELLO" and not self.vols):
                self._error("BAD_REQUEST", f"unknown or out-of-order request {op!r}")
                continue
            try:
                handler(msg)
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                self._error("BAD_REQUEST", f"{op}: {exc.__class__.__name__}: {exc}")

    def _error(self, error: str, message: str) -> None:
        log.warning("request error for %s: %s %s", self.ident, error, message)
        self.conn.send_json({"op": "ERROR", "error": error, "message": message})

    def _vol(self, msg: dict) -> tuple[int, SourceVolume]:
        i = int(msg["volume"])
        if not 0 <= i < len(self.vols):
            raise IndexError(f"no volume {i}")
        return i, self.vols[i]

    def op_hello(self, msg: dict) -> None:
        version = msg.get("version")
        spoken = self.server.cfg.protocol_versions
        if version not in spoken:
            self._error("VERSION", f"agent speaks protocol {', '.join(map(str, spoken))}, client {version}")
            return
        bs = int(msg.get("block_size", DEFAULT_BLOCK_SIZE))
        if bs < 64 * 1024 or bs > 16 * 1024 * 1024 or bs & (bs - 1):
            self._error("BAD_REQUEST", f"block_size {bs} must be a power of two between 64 KiB and 16 MiB")
            return
        # Version 1 knows SHA-256 only; version 2 takes the replicator's first choice that we have.
        offered = msg.get("digests", []) if version >= 2 else [DIGEST_SHA256]
        digest = choose_digest(offered if isinstance(offered, list) else [], self.server.digests())
        if digest is None:
            self._error("BAD_REQUEST", f"no common block digest: client offers {offered}, agent has "
                        f"{', '.join(self.server.digests())}")  # fmt: skip
            return
        ours = available_codecs()
        codec = next((c for c in msg.get("codecs", []) if c in ours and c in CODEC_NAMES), None)
        self.encoder = Encoder(codec) if codec else None
        self.vols = self.server.volumes(bs, digest)
        reply = {
            "op": "HELLO",
            "version": version,
            "recovery_instance": self.server.cfg.recovery_instance_id,
            "codec": codec,
            "volumes": [{"name": v.spec.name, "size": v.size} for v in self.vols],
        }
        if version >= 2:
            reply["digest"] = digest
        log.info("failback client %s: protocol version %d, block digest %s", self.ident, version, digest)
        self.conn.send_json(reply)

    def op_digests(self, msg: dict) -> None:
        i, vol = self._vol(msg)
        for first, packed in vol.scan():
            self.conn.send_digests(i, first, [packed])
        self.conn.send_json({"op": "DIGESTS", "volume": i, "generation": vol.generation})

    def op_scan(self, msg: dict) -> None:
        for v in self.vols:
            v.refresh(force=True)
        self.conn.send_json({"op": "SCAN", "generations": {str(i): v.generation for i, v in enumerate(self.vols)}})

    def op_changes(self, msg: dict) -> None:
        since = {int(k): int(g) for k, g in msg["since"].items()}
        deadline = time.monotonic() + min(float(msg.get("wait", 0)), 30.0)
        while True:
            result = {i: self.vols[i].changes_since(g) for i, g in since.items()}
            remaining = deadline - time.monotonic()
            if any(c for _, c in result.values()) or remaining <= 0:
                break
            vol = self.vols[next(iter(since))] if since else None
            if vol is None:
                break
            with vol.changed:
                vol.changed.wait(min(remaining, 0.5))
        self.conn.send_json(
            {
                "op": "CHANGES",
                "generations": {str(i): g for i, (g, _) in result.items()},
                "changed": {str(i): to_ranges(c) for i, (_, c) in result.items()},
            }
        )

    def op_read(self, msg: dict) -> None:
        i, vol = self._vol(msg)
        indices = list(from_ranges(msg["blocks"]))
        for b in indices:
            if not 0 <= b < vol.blocks:
                raise IndexError(f"block {b} outside volume {i} ({vol.blocks} blocks)")
        self._stream(i, vol, indices)
        self.conn.send_json({"op": "READ", "volume": i, "count": len(indices)})

    def _stream(self, i: int, vol: SourceVolume, indices: Iterable[int]) -> None:
        """Reader thread prepares blocks (read, digest, compress); this thread sends them.

        Blocks live in a fixed pool of buffers (queue + one being read + one being sent), so a
        slow replicator costs the agent no memory: the reader waits for the sender, which waits
        for TCP."""
        depth = 4
        q: queue.Queue[Block | BaseException | None] = queue.Queue(maxsize=depth)
        pool = BufferPool(depth + 2, vol.block_size)
        encoder = self.encoder
        governor = self.governor
        stop = threading.Event()

        def reader() -> None:
            try:
                for b in indices:
                    buf = pool.get()
                    if stop.is_set():
                        return
                    data, d = vol.read(b, buf)
                    zero = d == vol.hasher.zero(len(data))
                    if encoder is not None and not zero and governor.compress():
                        started = time.perf_counter()
                        codec, payload = encoder.encode(data, zero)
                        if codec != CODEC_RAW:
                            governor.compressed(len(data), time.perf_counter() - started)
                    else:
                        codec, payload = (CODEC_ZERO, b"") if zero else (CODEC_RAW, data)
                    q.put(Block(b, codec, len(data), d, payload, buf))
                q.put(None)
            except BaseException as exc:
                q.put(exc)

        t = threading.Thread(target=reader, name="agent-reader", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                started = time.perf_counter()
                self.conn.send_block(i, item.index, item.codec, item.raw_len, item.digest, item.payload)
                if item.codec != CODEC_ZERO:
                    governor.sent(len(item.payload), time.perf_counter() - started)
                pool.put(item.buf)
        finally:
            stop.set()
            while t.is_alive():  # unblock the reader: it may wait on a full queue or for a buffer
                with contextlib.suppress(queue.Empty):
                    item = q.get(timeout=0.1)
                    if isinstance(item, Block):
                        pool.put(item.buf)
            t.join()
