"""The model's IOVA space, laid out like virtio_vdpa over VDUSE.

Streaming buffers (data, indirect tables) come from a bounce region at ``[0, bounce_size)``,
which appears in the IOTLB as one region on first use; coherent allocations (rings) come from
above it, each its own IOTLB region, removed when freed or on reset. All of it lives in one
memfd, as VDUSE's pages live in the kernel: the driver side reads and writes its own mapping
(``buf``), and each device-side lookup maps the region afresh (as VDUSE_IOTLB_GET_FD + mmap
does), so the device sees exactly what the "kernel" says is mapped, faults on the rest, and
can replace its mapping (``runtime.fence``) without the driver's memory changing.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading

from pyvduse.ring.memory import Region


class FirstFit:
    """A first-fit allocator over ``[start, end)`` with coalescing frees."""

    def __init__(self, start: int, end: int) -> None:
        self.free_list: list[tuple[int, int]] = [(start, end)]  # sorted (start, end) holes
        self.used: dict[int, int] = {}

    def alloc(self, size: int, align: int) -> int:
        size = max(size, 1)
        for k, (s, e) in enumerate(self.free_list):
            a = -(-s // align) * align
            if a + size <= e:
                del self.free_list[k]
                if a > s:
                    self.free_list.insert(k, (s, a))
                    k += 1
                if a + size < e:
                    self.free_list.insert(k, (a + size, e))
                self.used[a] = size
                return a
        raise MemoryError("IOVA space exhausted")

    def free(self, addr: int) -> None:
        size = self.used.pop(addr)
        s, e = addr, addr + size
        i = bisect.bisect_left(self.free_list, (s, e))
        if i > 0 and self.free_list[i - 1][1] == s:
            s = self.free_list[i - 1][0]
            del self.free_list[i - 1]
            i -= 1
        if i < len(self.free_list) and self.free_list[i][0] == e:
            e = self.free_list[i][1]
            del self.free_list[i]
        self.free_list.insert(i, (s, e))


class IovaSpace:
    """Driver memory plus the IOTLB that says which parts the device may map."""

    def __init__(self, bounce_size: int, coherent_size: int) -> None:
        if bounce_size % mmap.PAGESIZE or coherent_size % mmap.PAGESIZE:
            raise ValueError("the bounce and coherent sizes must be multiples of the page size")
        self.bounce_size = bounce_size
        size = bounce_size + coherent_size
        self._fd = os.memfd_create("pyvduse-model-iova", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self.buf = mmap.mmap(self._fd, size, mmap.MAP_SHARED)  # the driver's view
        self.view = memoryview(self.buf)
        self._lock = threading.Lock()
        self._streaming = FirstFit(0, bounce_size)
        self._coherent = FirstFit(bounce_size, len(self.buf))
        self._bounce_mapped = False
        self._coherent_regions: dict[int, int] = {}  # start -> size

    # -- driver side (the DMA API) ----------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        """A streaming mapping (data buffers, indirect tables) in the bounce region."""
        with self._lock:
            self._bounce_mapped = True
            return self._streaming.alloc(size, align)

    def free(self, iova: int) -> None:
        with self._lock:
            if iova in self._streaming.used:
                self._streaming.free(iova)
            elif iova in self._coherent.used:
                self._coherent.free(iova)
                self._coherent_regions.pop(iova, None)

    def alloc_coherent(self, size: int, align: int = 4096) -> int:
        """A coherent allocation (a ring): its own IOTLB region until freed."""
        with self._lock:
            size = -(-size // 4096) * 4096
            iova = self._coherent.alloc(size, max(align, 4096))
            self._coherent_regions[iova] = size
            return iova

    def coherent_range(self, iova: int) -> tuple[int, int] | None:
        """``(start, last)`` of the coherent region at ``iova``, if it is one."""
        with self._lock:
            size = self._coherent_regions.get(iova)
            return None if size is None else (iova, iova + size - 1)

    def write(self, iova: int, data: bytes) -> None:
        self.buf[iova : iova + len(data)] = data

    def read(self, iova: int, length: int) -> bytes:
        return bytes(self.buf[iova : iova + length])

    def reset(self) -> None:
        """What the kernel does on reset: the bounce region leaves the IOTLB."""
        with self._lock:
            self._bounce_mapped = False

    # -- device side (VDUSE_IOTLB_GET_FD) -----------------------------------------------------

    def lookup(self, iova: int) -> Region | None:
        with self._lock:
            if 0 <= iova < self.bounce_size:
                if not self._bounce_mapped:
                    return None
                return self._map(0, self.bounce_size)
            for start, size in self._coherent_regions.items():
                if start <= iova < start + size:
                    return self._map(start, size)
            return None

    def _map(self, start: int, size: int) -> Region:
        mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED, offset=start)
        return Region(start, start + size - 1, memoryview(mm), owner=mm)
