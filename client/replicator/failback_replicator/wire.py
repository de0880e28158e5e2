"""Wire format of the failback replication protocol (see PROTOCOL.md): frames, block codecs, digests.

Every frame is `type:u8 length:u32` (network order) followed by `length` bytes. Control messages are
JSON objects; bulk data (blocks, digest lists) is binary so that a 1 MiB block costs one header.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

try:  # zstandard is optional: Debian's python3-zstandard on the LiveCD, zstandard from PyPI in the venv
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised only where zstandard is absent
    _zstd = None  # type: ignore[assignment]  # callers test `_zstd is None`; a stub module would hide the absence

log = logging.getLogger("failback_replicator")

FRAME_JSON = 1
FRAME_BLOCK = 2
FRAME_DIGESTS = 3

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_ZLIB = 2
CODEC_ZERO = 3
CODEC_NAMES = {"zstd": CODEC_ZSTD, "zlib": CODEC_ZLIB}

DIGEST_SIZE = 32  # every block digest algorithm gives 32 bytes: frames and journals keep one layout

# Block digest algorithms, in the replicator's order of preference (protocol version 2 negotiates one).
# BLAKE3 (Rust, AVX2/AVX-512) hashes ~4x faster than SHA-256 even with SHA-NI on one core, and every
# byte of a sync is hashed about four times. SHA-256 is the fallback every peer has (and the only
# digest of protocol version 1).
DIGEST_BLAKE3 = "blake3"
DIGEST_SHA256 = "sha256"
DIGEST_ALGORITHMS = (DIGEST_BLAKE3, DIGEST_SHA256)
# BLAKE3 of the empty input (the reference test vector): a module that imports but hashes wrong is broken.
_BLAKE3_EMPTY = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
MAX_FRAME = 64 * 1024 * 1024
DEFAULT_PORT = 1500
DEFAULT_BLOCK_SIZE = 1024 * 1024

_HEADER = struct.Struct("!BI")
# volume index, block index, codec, raw length, digest
_BLOCK = struct.Struct("!HQBI32s")
BLOCK_HEADER_SIZE = _BLOCK.size  # a BLOCK frame is at most this + the block size (never sent bigger)
_DIGESTS = struct.Struct("!HQ")

# Compression is tried on a sample first: when the sample does not shrink below this ratio the
# block goes raw, so incompressible data costs ~1/16 of a compression pass.
_SAMPLE = 64 * 1024
_WORTH_RATIO = 0.9


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


Digest = Callable[[bytes | bytearray | memoryview], bytes]


def _sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


_blake3_lock = threading.Lock()  # several agent sessions may ask first at the same time: one log line


def _blake3() -> Digest | None:
    with _blake3_lock:
        return _load_blake3()


@functools.cache
def _load_blake3() -> Digest | None:
    """The blake3 hash function if the `blake3` module (PyPI, Rust) loads and hashes right, else None
    -- said once in the log: a replicator without it still works, with SHA-256."""
    try:
        from blake3 import blake3 as hasher  # the bundle carries the wheel in failback_assets/lib

        if hasher(b"").digest() != _BLAKE3_EMPTY:
            raise ImportError("it fails the BLAKE3 test vector")
    except Exception as exc:  # ImportError, or OSError/anything from a broken native library
        log.warning("blake3 unavailable (%s: %s): block digests use SHA-256", exc.__class__.__name__, exc)
        return None

    def _b3(data: bytes | bytearray | memoryview) -> bytes:
        return hasher(data).digest()  # single-threaded: the callers already hash on several threads

    return _b3


def available_digests() -> list[str]:
    """The block digest algorithms this side can use, in order of preference."""
    return ([DIGEST_BLAKE3] if _blake3() is not None else []) + [DIGEST_SHA256]


def digest_function(algorithm: str) -> Digest:
    """The one place a block digest is computed: `digest_function(name)(data)` -> 32 bytes."""
    if algorithm == DIGEST_SHA256:
        return _sha256
    if algorithm == DIGEST_BLAKE3:
        fn = _blake3()
        if fn is not None:
            return fn
    raise ProtocolError(f"block digest {algorithm!r} is not available here (have: {', '.join(available_digests())})")


def choose_digest(offered: Iterable[object], ours: Iterable[str] | None = None) -> str | None:
    """The first of the peer's algorithms (its order of preference) that this side has, or None."""
    have = set(available_digests() if ours is None else ours)
    return next((a for a in offered if isinstance(a, str) and a in have), None)


def available_codecs() -> list[str]:
    return (["zstd"] if _zstd is not None else []) + ["zlib"]


class Encoder:
    """Compresses blocks for the wire with the negotiated codec, where it pays."""

    def __init__(self, codec: str, level: int = 1) -> None:
        self.codec = CODEC_NAMES[codec]
        self._zc = _zstd.ZstdCompressor(level=level) if self.codec == CODEC_ZSTD else None
        self._level = level
        self._seen = 0
        self._incompressible_run = 0

    def _compress(self, data: bytes | memoryview) -> bytes:
        if self._zc is not None:
            return self._zc.compress(data)
        return zlib.compress(data, self._level)

    def encode(self, data: bytes | memoryview, zero: bool) -> tuple[int, bytes | memoryview]:
        if zero:
            return CODEC_ZERO, b""
        # After a run of incompressible blocks (encrypted or already compressed data) only every
        # 8th block is probed, so such regions cost almost nothing extra.
        self._seen += 1
        if self._incompressible_run >= 4 and self._seen % 8:
            return CODEC_RAW, data
        if len(data) > _SAMPLE and len(self._compress(data[:_SAMPLE])) > _SAMPLE * _WORTH_RATIO:
            self._incompressible_run += 1
            return CODEC_RAW, data
        packed = self._compress(data)
        if len(packed) > len(data) * _WORTH_RATIO:
            self._incompressible_run += 1
            return CODEC_RAW, data
        self._incompressible_run = 0
        return self.codec, packed


class Decoder:
    def __init__(self) -> None:
        self._zd = _zstd.ZstdDecompressor() if _zstd is not None else None

    def decode(self, codec: int, payload: bytes | memoryview, raw_len: int) -> bytes | memoryview:
        if codec == CODEC_RAW:
            data: bytes | memoryview = payload
        elif codec == CODEC_ZERO:
            data = bytes(raw_len)
        elif codec == CODEC_ZLIB:
            data = zlib.decompress(payload)
        elif codec == CODEC_ZSTD:
            if self._zd is None:
                raise ProtocolError("peer sent a zstd block but zstandard is not installed here")
            data = self._zd.decompress(payload, max_output_size=raw_len)
        else:
            raise ProtocolError(f"unknown block codec {codec}")
        if len(data) != raw_len:
            raise ProtocolError(f"block decodes to {len(data)} bytes, header says {raw_len}")
        return data


class Connection:
    """Frame reader/writer over a (TLS) socket. Counts bytes both ways for progress and benchmarks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.bytes_in = 0
        self.bytes_out = 0
        self._hdr = bytearray(_HEADER.size)

    # -- sending
    def send_json(self, msg: dict[str, Any]) -> None:
        body = json.dumps(msg, separators=(",", ":")).encode()
        self._send(FRAME_JSON, [body])

    def send_block(
        self, volume: int, index: int, codec: int, raw_len: int, dig: bytes, payload: bytes | memoryview
    ) -> int:
        head = _BLOCK.pack(volume, index, codec, raw_len, dig)
        return self._send(FRAME_BLOCK, [head, payload])

    def send_digests(self, volume: int, first: int, digests: Iterable[bytes]) -> None:
        self._send(FRAME_DIGESTS, [_DIGESTS.pack(volume, first), b"".join(digests)])

    def _send(self, ftype: int, parts: list[bytes | memoryview]) -> int:
        length = sum(len(p) for p in parts)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
        head = _HEADER.pack(ftype, length)
        # Small parts are joined so that a frame is one TLS write; big payloads go as they are.
        if length < 64 * 1024:
            self.sock.sendall(head + b"".join(parts))
        else:
            self.sock.sendall(head + bytes(parts[0]))
            for p in parts[1:]:
                self.sock.sendall(p)
        self.bytes_out += _HEADER.size + length
        return _HEADER.size + length

    # -- receiving
    def _recv_exact(self, buf: bytearray | memoryview) -> None:
        view = memoryview(buf)
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:], len(view) - got)
            if n == 0:
                raise ConnectionError("peer closed the connection")
            got += n
        self.bytes_in += len(view)

    def recv_frame(self, into: bytearray | None = None, limit: int = MAX_FRAME) -> tuple[int, memoryview]:
        """The next frame. With `into`, a frame that fits is received into that (reused) buffer and
        the returned view points into it; `limit` refuses bigger frames before allocating anything."""
        self._recv_exact(self._hdr)
        ftype, length = _HEADER.unpack(self._hdr)
        if length > min(limit, MAX_FRAME):
            raise ProtocolError(f"peer announced a frame of {length} bytes (limit {min(limit, MAX_FRAME)})")
        body = memoryview(into)[:length] if into is not None and length <= len(into) else memoryview(bytearray(length))
        self._recv_exact(body)
        return ftype, body

    def recv_json(self) -> dict[str, Any]:
        ftype, body = self.recv_frame()
        if ftype != FRAME_JSON:
            raise ProtocolError(f"expected a control message, got frame type {ftype}")
        return parse_json(body)


def parse_json(body: memoryview) -> dict[str, Any]:
    try:
        msg = json.loads(bytes(body))
    except ValueError as exc:
        raise ProtocolError(f"malformed control message: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("control message without an 'op'")
    return msg


def parse_block(body: memoryview) -> tuple[int, int, int, int, bytes, memoryview]:
    if len(body) < _BLOCK.size:
        raise ProtocolError("short block frame")
    volume, index, codec, raw_len, dig = _BLOCK.unpack_from(body)
    return volume, index, codec, raw_len, dig, body[_BLOCK.size :]


def parse_digest_frame(body: memoryview) -> tuple[int, int, memoryview]:
    """(volume, first block, the packed digests: 32 bytes a block)."""
    if len(body) < _DIGESTS.size:
        raise ProtocolError("short digest frame")
    volume, first = _DIGESTS.unpack_from(body)
    rest = body[_DIGESTS.size :]
    if len(rest) % DIGEST_SIZE:
        raise ProtocolError("digest frame length is not a multiple of the digest size")
    return volume, first, rest


def parse_digests(body: memoryview) -> tuple[int, int, list[bytes]]:
    volume, first, rest = parse_digest_frame(body)
    return volume, first, [bytes(rest[i : i + DIGEST_SIZE]) for i in range(0, len(rest), DIGEST_SIZE)]


def to_ranges(indices: Iterable[int]) -> list[list[int]]:
    """[1,2,3,7] -> [[1,3],[7,1]] (start, count): keeps READ/CHANGES messages small."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return out


def from_ranges(ranges: Iterable[Iterable[int]]) -> Iterator[int]:
    for start, count in ranges:
        if start < 0 or count < 0:
            raise ProtocolError(f"bad range [{start}, {count}]")
        yield from range(start, start + count)
