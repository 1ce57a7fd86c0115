"""An IOVA space backed by one local buffer, with a bump allocator.

It stands in for the kernel's IOVA domain: the ring engine sees it through a ``RegionMap``
exactly as it sees the real mmapped regions.
"""

from __future__ import annotations

from pyvduse.ring.memory import RegionMap, buffer_region
from pyvduse.transport.model.iova import IovaSpace


class Arena:
    """``size`` bytes of driver memory at IOVA ``base`` (in ``buf`` when given, e.g. a shared
    mapping a forked daemon sees live)."""

    def __init__(self, size: int, base: int = 0, buf: memoryview | None = None) -> None:
        self.base = base
        self.buf: bytearray | memoryview = bytearray(size) if buf is None else buf[:size]
        self.memory = RegionMap()
        self.memory.add(buffer_region(base, self.buf))
        self._next = base

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def alloc(self, size: int, align: int = 16) -> int:
        iova = -(-self._next // align) * align
        if iova + size > self.end:
            raise MemoryError("arena exhausted")
        self._next = iova + size
        return iova

    def free(self, iova: int) -> None:
        """Bump allocation: nothing is reused (tests build a fresh arena each time)."""

    def alloc_coherent(self, size: int, align: int = 16) -> int:
        return self.alloc(size, align)

    def write(self, iova: int, data: bytes) -> None:
        off = iova - self.base
        self.buf[off : off + len(data)] = data

    def read(self, iova: int, length: int) -> bytes:
        off = iova - self.base
        return bytes(self.buf[off : off + length])


class CoherentArena:
    """Request buffers carved from one coherent allocation of the kernel model, which is
    its own IOTLB region: the driver can free it (an unmap) under the requests using it."""

    def __init__(self, iova: IovaSpace, size: int = 1 << 16) -> None:
        self.iova = iova
        self.base = iova.alloc_coherent(size)
        self.end = self.base + size
        self.next = self.base + 64  # a buffer at the base would be freed as the allocation

    def alloc(self, size: int, align: int = 16) -> int:
        a = -(-self.next // align) * align
        if a + size > self.end:
            raise MemoryError("coherent arena exhausted")
        self.next = a + size
        return a

    def free(self, iova: int) -> None:
        """Bump allocation: nothing is reused."""

    def write(self, iova: int, data: bytes) -> None:
        self.iova.write(iova, data)

    def read(self, iova: int, length: int) -> bytes:
        return self.iova.read(iova, length)
