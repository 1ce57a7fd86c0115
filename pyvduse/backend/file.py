"""A raw image file (or block device) backend.

Reads and writes go with ``preadv``/``pwritev`` straight between the file and the driver's
buffers (no copy in Python). FLUSH is ``fdatasync``; DISCARD punches a hole and WRITE_ZEROES
uses ``FALLOC_FL_ZERO_RANGE`` (or a hole when unmapping is allowed), falling back to writing
zeroes where the filesystem cannot.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from pyvduse.backend.base import Backend

IOV_MAX = 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20

_fallocate: Any = None  # libc's fallocate(2), bound on first use


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags, which ``os.posix_fallocate`` does not expose."""
    global _fallocate
    import ctypes  # here, not at the top: most daemons never discard, and it costs at start

    if _fallocate is None:
        # The C library is already loaded into the interpreter: look fallocate up there
        # (ctypes.util.find_library("c") would run ldconfig in a subprocess).
        fn = ctypes.CDLL(None, use_errno=True).fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate = fn
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a buffer list (after a short read or write)."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


class FileBackend(Backend):
    """Serves a raw image file or block device by path."""

    kind = "file"

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise OSError(errno.EINVAL, f"{path} is not a regular file or block device")
            self._is_blockdev = stat.S_ISBLK(st.st_mode)
            self._size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        self._can_punch = not self._is_blockdev
        self._can_zero_range = not self._is_blockdev

    @property
    def size(self) -> int:
        return self._size

    @property
    def description(self) -> str:
        return f"file {self.path}"

    def refresh_size(self) -> int:
        """Re-read the size (someone may have grown the file)."""
        self._size = os.lseek(self.fd, 0, os.SEEK_END)
        return self._size

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        for i in range(0, len(bufs), IOV_MAX):
            part = bufs[i : i + IOV_MAX]
            want = sum(len(b) for b in part)
            while want:
                n = os.preadv(self.fd, part, offset)
                if n == 0:  # past the end of the file: the rest reads as zeroes
                    for b in part:
                        b[:] = bytes(len(b))
                    break
                offset += n
                want -= n
                if want:
                    part = _advance(part, n)

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        for i in range(0, len(bufs), IOV_MAX):
            part = bufs[i : i + IOV_MAX]
            want = sum(len(b) for b in part)
            while want:
                n = os.pwritev(self.fd, part, offset)
                offset += n
                want -= n
                if want:
                    part = _advance(part, n)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if self._can_punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._can_punch = False
        # Discard is advisory: where no hole can be punched, zeroing keeps reads defined.
        self._write_zero_bytes(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if unmap and self._can_punch:
            self.discard(offset, length)
            return
        if self._can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._can_zero_range = False
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, _ZERO_CHUNK))
        while length:
            n = os.pwrite(self.fd, zero[: min(length, len(zero))], offset)
            offset += n
            length -= n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
