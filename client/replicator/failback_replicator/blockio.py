"""Block I/O on image files and block devices alike (pread/pwrite on raw fds, no Python buffering)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from .wire import DIGEST_SHA256, digest_function


def device_size(fd: int) -> int:
    # lseek(SEEK_END) gives the size of block devices and regular files without an ioctl.
    return os.lseek(fd, 0, os.SEEK_END)


def open_volume(path: str | Path, writable: bool) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"volume not found: {path} (check the device mapping)") from None
    except PermissionError:
        raise PermissionError(f"no {'write' if writable else 'read'} access to {path} (run as root)") from None


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def block_span(index: int, size: int, block_size: int) -> tuple[int, int]:
    """Offset and length of block `index` (the last block may be short)."""
    off = index * block_size
    return off, min(block_size, size - off)


def read_block_into(fd: int, index: int, size: int, block_size: int, buf: bytearray) -> memoryview:
    """Block `index` read into a caller's reusable buffer (no 1 MiB allocation, zeroing and page
    faults per block); returns the view of the block's bytes inside `buf`."""
    off, length = block_span(index, size, block_size)
    view = memoryview(buf)[:length]
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], off + got)
        if not n:
            raise OSError(f"unexpected end of volume at offset {off + got}")
        got += n
    return view


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


_BLKZEROOUT = 0x127F  # _IO(0x12, 127): the kernel zeroes a range of a block device
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError, ImportError):  # pragma: no cover - not glibc/Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


def write_zeros(fd: int, offset: int, length: int) -> str:
    """Make `length` bytes at `offset` read as zeros without pushing zeros through this process:
    BLKZEROOUT on a block device (WRITE ZEROES where the disk has it, else the kernel writes them;
    it also drops the range's cached pages), fallocate ZERO_RANGE or PUNCH_HOLE on an image file;
    writing zeros where neither works. Returns how (for tests and logs). A disk's free space is
    mostly such blocks."""
    if length <= 0:
        return "nothing"
    if is_block_device(fd):
        if offset % 512 == 0 and length % 512 == 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
                return "blkzeroout"
    else:
        fallocate = _fallocate()
        if fallocate is not None:
            end = device_size(fd)
            for how, mode in (("zero-range", _FALLOC_FL_ZERO_RANGE), ("punch-hole", _FALLOC_FL_PUNCH_HOLE)):
                # KEEP_SIZE: a range past the end of the file must not grow it (and punching needs it).
                if fallocate(fd, mode | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                    if offset + length > end:  # past the old end: the file grows like a write would
                        os.ftruncate(fd, offset + length)
                    return how
    for start in range(offset, offset + length, len(_ZEROS)):
        write_all(fd, memoryview(_ZEROS)[: min(len(_ZEROS), offset + length - start)], start)
    return "write"


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to forget cached pages (of a range; 0 = to the end) so a read-back reads what
    is on the device. Only clean pages go: call it after fdatasync."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class BlockHasher:
    """A block's digest under one algorithm (the session's); an all-zero block (free space) costs a
    memcmp, its digest is computed once per length."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._fn = digest_function(algorithm)
        self._zeros: dict[int, bytes] = {}

    def zero(self, length: int) -> bytes:
        if length not in self._zeros:
            self._zeros[length] = self._fn(bytes(length))
        return self._zeros[length]

    def __call__(self, data: bytes | bytearray | memoryview) -> bytes:
        return self.zero(len(data)) if is_zero(data) else self._fn(data)


@functools.cache
def block_hasher(algorithm: str = DIGEST_SHA256) -> BlockHasher:
    return BlockHasher(algorithm)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    # A bytes comparison is a memcmp, far cheaper than hashing; memoryview comparisons go element
    # by element, so a view is copied first — only when its head is zero (else it can't be zero).
    if bytes(data[:64]) != _ZEROS[: min(64, len(data))]:
        return False
    if isinstance(data, memoryview) and isinstance(data.obj, bytearray) and data.nbytes == len(data.obj):
        data = data.obj  # a view of a whole reusable buffer (read_block_into's): compare it, no copy
    if not isinstance(data, bytes | bytearray):
        data = bytes(data)
    return data == _ZEROS if len(data) == len(_ZEROS) else data == bytes(len(data))


_ZEROS = bytes(1024 * 1024)
