"""A raw image file (or block device) backend.

Reads and writes go with ``preadv``/``pwritev`` straight between the file and the driver's
buffers (no copy in Python). FLUSH is ``fdatasync``; DISCARD punches a hole and WRITE_ZEROES
uses ``FALLOC_FL_ZERO_RANGE`` (or a hole when unmapping is allowed), falling back to writing
zeroes where the filesystem cannot.

``direct=True`` (``--cache none``) bypasses the page cache with a second descriptor opened
``O_DIRECT``; ``direct=None`` (``--cache auto``, the default) does so where the file's
filesystem takes ``O_DIRECT`` (block devices, ext4, xfs …) and uses the page cache where it
does not (tmpfs, some FUSE filesystems), because a block device's reads that miss the host's
page cache cost a readahead and a copy, and the driver above caches already. Direct I/O has a
limit the driver's buffers may not meet: alignment (the kernel refuses with EINVAL): such
requests are copied through an aligned buffer of our own, and a request whose offset or length
the device cannot take directly even then goes through the page cache.

Pinning: the pages VDUSE maps for its bounce buffer cannot be pinned, so a transfer that
makes the kernel pin the driver's buffer fails with EFAULT: direct I/O, and every read and
write of a FUSE file in direct-I/O mode (virtiofs with ``cache=none``), even through the
page cache's descriptor (qemu-storage-daemon fails every request in both cases). The first
EFAULT makes this backend copy every request through a buffer of our own from then on
(logged once); the native engines serving it share the switch (``unpinnable``).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import threading
from collections.abc import Awaitable
from typing import Any

from pyvduse.backend.base import Backend, NativeStorage
from pyvduse.errors import ResizeError

log = logging.getLogger(__name__)

IOV_MAX = 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20
DIRECT_ALIGN = 512  # what a request needs to be tried directly (the device may want more)
_POOL_BYTES = 16 << 20  # aligned buffers kept for reuse

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


def _transfer(fd: int, bufs: list[memoryview], offset: int, write: bool) -> None:
    """The whole of ``bufs`` at ``offset``: short transfers go on; reads past the end of
    the file give zeroes."""
    for i in range(0, len(bufs), IOV_MAX):
        part = bufs[i : i + IOV_MAX]
        want = sum(len(b) for b in part)
        while want:
            n = os.pwritev(fd, part, offset) if write else os.preadv(fd, part, offset)
            if n == 0:
                if write:
                    raise OSError(errno.EIO, "the device took no bytes")
                for b in part:  # past the end of the file: the rest reads as zeroes
                    b[:] = bytes(len(b))
                break
            offset += n
            want -= n
            if want:
                part = _advance(part, n)


class AlignedBuffers:
    """Page-aligned buffers for direct I/O, reused (up to a bound) across requests and
    threads."""

    def __init__(self, keep: int = _POOL_BYTES) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, size: int) -> mmap.mmap:
        size = max(-(-size // mmap.PAGESIZE), 1) * mmap.PAGESIZE  # mmap refuses 0 bytes
        with self._lock:
            free = self._free.get(size)
            if free:
                self._kept -= size
                return free.pop()
        return mmap.mmap(-1, size)

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            if self._kept + len(buf) <= self._keep:
                self._free.setdefault(len(buf), []).append(buf)
                self._kept += len(buf)
                return
        buf.close()


def _open_direct_if_supported(path: str, flags: int) -> int:
    """``--cache auto``: an O_DIRECT descriptor of *path*, or -1 (logged once) where its
    filesystem refuses O_DIRECT (EINVAL: tmpfs, FUSE without direct-I/O support)."""
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        log.info(
            "%s: its filesystem does not take O_DIRECT: serving it through the page cache (--cache auto)",
            path,
        )
        return -1
    log.info(
        "%s: serving it with direct I/O, no page cache (--cache auto; --cache writeback to change)", path
    )
    return fd


class FileBackend(Backend):
    """Serves a raw image file or block device by path."""

    kind = "file"
    blocking = True

    def __init__(self, path: str, readonly: bool = False, direct: bool | None = None) -> None:
        self.path = path
        self.readonly = readonly
        #: What the caller asked for: "auto" (``direct=None``), "none" or "writeback".
        self.cache_choice = "auto" if direct is None else ("none" if direct else "writeback")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        #: The O_DIRECT descriptor (``direct``), -1 without.
        self.direct_fd = -1
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise OSError(errno.EINVAL, f"{path} is not a regular file or block device")
            self._is_blockdev = stat.S_ISBLK(st.st_mode)
            self._size = os.lseek(self.fd, 0, os.SEEK_END)
            if direct:
                self.direct_fd = os.open(path, flags | os.O_DIRECT)
            elif direct is None:
                self.direct_fd = _open_direct_if_supported(path, flags)
        except BaseException:
            os.close(self.fd)
            raise
        self._can_punch = not self._is_blockdev
        self._can_zero_range = not self._is_blockdev
        #: 1 once a transfer with the driver's buffers failed with EFAULT: from then on
        #: every request is copied through our own buffers (shared with native engines).
        self.unpinnable = bytearray(1)
        self._unpinnable_lock = threading.Lock()
        self.bounced = 0  # requests copied through our own buffers
        self.buffered = 0  # direct requests the device could not take: page cache
        self._buffers = AlignedBuffers()

    @property
    def direct(self) -> bool:
        return self.direct_fd >= 0

    @property
    def pin_ok(self) -> bool:
        """Transfers straight between the file and the driver's buffers work (False after
        an EFAULT)."""
        return not self.unpinnable[0]

    def _cannot_pin(self) -> None:
        """A transfer with the driver's buffers failed with EFAULT: copy from now on."""
        with self._unpinnable_lock:
            if self.unpinnable[0]:
                return
            self.unpinnable[0] = 1
        self.report_unpinnable()

    def report_unpinnable(self) -> None:
        """Say once that this backend copies from now on (also the native engines' call)."""
        log.info(
            "%s: the kernel cannot pin the driver's buffers for I/O on this file "
            "(EFAULT: VDUSE's bounce pages, with %s): copying every request through "
            "buffers of our own from now on",
            self.path,
            "O_DIRECT" if self.direct else "a FUSE file in direct-I/O mode",
        )

    def native_storage(self) -> NativeStorage | None:
        if not self.io_as_in(FileBackend):
            return None
        # --cache none: the O_DIRECT descriptor (the engine leaves requests it cannot do
        # direct to Python, which has the buffered one)
        return NativeStorage(
            "fd",
            fd=self.direct_fd if self.direct else self.fd,
            direct=self.direct,
            unpinnable=self.unpinnable,
            on_unpinnable=self.report_unpinnable,
        )

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

    def storage_size(self) -> int:
        try:
            return self.refresh_size()
        except OSError as e:
            raise ResizeError("failed", f"cannot read the size of {self.path}: {e.strerror}") from None

    def size_settable(self) -> str | None:
        if self.readonly or self._is_blockdev:
            what = "a block device" if self._is_blockdev else "open read-only"
            return (
                f"{self.path} is {what}, so pyvduse cannot change its size: resize it "
                "yourself, then resize with no size"
            )
        return None

    def set_storage_size(self, size: int, *, grow_only: bool) -> None:
        why = self.size_settable()
        if why is not None:
            raise ResizeError("unsupported", why)
        current = self.refresh_size()
        if current == size or (grow_only and current > size):
            return
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise ResizeError("failed", f"cannot resize {self.path} to {size} bytes: {e.strerror}") from None
        finally:
            self.refresh_size()

    def readv(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        if self.direct_fd < 0 or not self._direct(offset, bufs, False):
            self._buffered(offset, bufs, False)
        return None

    def writev(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        if self.direct_fd < 0 or not self._direct(offset, bufs, True):
            self._buffered(offset, bufs, True)
        return None

    def _straight(self, fd: int, offset: int, bufs: list[memoryview], write: bool) -> bool:
        """Straight between ``fd`` and the driver's buffers, unless they cannot be pinned
        (then False, for good)."""
        if self.unpinnable[0]:
            return False
        try:
            _transfer(fd, bufs, offset, write)
            return True
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
        self._cannot_pin()
        return False

    def _buffered(self, offset: int, bufs: list[memoryview], write: bool) -> None:
        if not self._straight(self.fd, offset, bufs, write):
            self._copied(self.fd, offset, bufs, write)

    def _direct(self, offset: int, bufs: list[memoryview], write: bool) -> bool:
        """Direct I/O, into the driver's buffers or through ours; False: the device cannot
        take this request directly (it then goes through the page cache)."""
        try:
            if self._straight(self.direct_fd, offset, bufs, write):
                return True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        length = sum(len(b) for b in bufs)
        if offset % DIRECT_ALIGN == 0 and length % DIRECT_ALIGN == 0:
            try:
                self._copied(self.direct_fd, offset, bufs, write)
                return True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        self.buffered += 1
        return False

    def _copied(self, fd: int, offset: int, bufs: list[memoryview], write: bool) -> None:
        """Through a page-aligned buffer of our own (which direct I/O can take)."""
        length = sum(len(b) for b in bufs)
        buf = self._buffers.get(length)
        try:
            view = memoryview(buf)[:length]
            try:
                if write:
                    pos = 0
                    for b in bufs:
                        view[pos : pos + len(b)] = b
                        pos += len(b)
                _transfer(fd, [view], offset, write)
                if not write:
                    pos = 0
                    for b in bufs:
                        b[:] = view[pos : pos + len(b)]
                        pos += len(b)
                self.bounced += 1
            finally:
                view.release()
        finally:
            self._buffers.put(buf)

    def flush(self) -> Awaitable[None] | None:
        os.fdatasync(self.fd)
        return None

    def discard(self, offset: int, length: int) -> Awaitable[None] | None:
        if self._can_punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._can_punch = False
        # Discard is advisory: where no hole can be punched, zeroing keeps reads defined.
        self._write_zero_bytes(offset, length)
        return None

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> Awaitable[None] | None:
        if unmap and self._can_punch:
            return self.discard(offset, length)
        if self._can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._can_zero_range = False
        self._write_zero_bytes(offset, length)
        return None

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, _ZERO_CHUNK))
        while length:
            n = os.pwrite(self.fd, zero[: min(length, len(zero))], offset)
            offset += n
            length -= n

    def close(self) -> None:
        for name in ("fd", "direct_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
