"""A RAM backend: the disk lives in an anonymous mapping and vanishes with the process."""

from __future__ import annotations

import mmap
from collections.abc import Awaitable

from pyvduse.backend.base import Backend, NativeStorage
from pyvduse.errors import ResizeError


class MemoryBackend(Backend):
    """Backed by anonymous memory, so untouched pages cost nothing."""

    kind = "memory"

    def __init__(self, size: int) -> None:
        self._size = size
        # Private: MADV_DONTNEED then drops pages so they read back as zeroes.
        self._map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mem = memoryview(self._map)

    @property
    def size(self) -> int:
        return self._size

    @property
    def buffer(self) -> memoryview:
        """The disk's bytes (the native data path copies to and from them directly)."""
        return self._mem

    def storage_size(self) -> int:
        raise ResizeError("unsupported", self.size_settable() or "")

    def size_settable(self) -> str | None:
        return (
            "a memory device cannot be resized: its RAM is one fixed mapping that cannot "
            "grow in place (serve a file on tmpfs for a resizable RAM disk)"
        )

    def native_storage(self) -> NativeStorage | None:
        if not self.io_as_in(MemoryBackend):
            return None
        return NativeStorage("memory", memory=self._mem)

    def readv(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        mem = self._mem
        for b in bufs:
            n = len(b)
            b[:] = mem[offset : offset + n]
            offset += n
        return None

    def writev(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        mem = self._mem
        for b in bufs:
            n = len(b)
            mem[offset : offset + n] = b
            offset += n
        return None

    def discard(self, offset: int, length: int) -> Awaitable[None] | None:
        return self.write_zeroes(offset, length, True)  # awaited too, if a subclass's is async

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> Awaitable[None] | None:
        if unmap and offset % mmap.PAGESIZE == 0 and length % mmap.PAGESIZE == 0:
            self._map.madvise(mmap.MADV_DONTNEED, offset, length)  # pages read back as zero
            return None
        self._mem[offset : offset + length] = bytes(length)
        return None

    def close(self) -> None:
        self._mem.release()
        self._map.close()
