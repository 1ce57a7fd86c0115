"""A driver's own memory, given to a vhost-vdpa device through IOTLB messages.

What a VMM does with guest RAM: each region is a memfd mapped shared into this process and
announced to the device with a VHOST_IOTLB_UPDATE message (IOVA, size, our address,
permission); vhost-vdpa hands VDUSE the file and offset behind that address, and the device
maps the same pages. ``unmap`` sends VHOST_IOTLB_INVALIDATE: the device must stop using the
region, while the memory stays ours (readable here until ``release``), so a test can see
whether anything was written into it afterwards.

Allocations (the DMA API the ring drivers use: ``alloc``, ``alloc_coherent``, ``free``,
``read``, ``write``) come from the regions first-fit, or from the regions a ``placed`` block
names, so a test decides which region a request's buffers live in.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyvduse.abi.vhost import VHOST_ACCESS_RW, IotlbMsg, IotlbType
from pyvduse.transport.model.iova import FirstFit

PAGE = mmap.PAGESIZE


@dataclass(eq=False)
class Mapping:
    """One region: ``size`` bytes of a memfd at IOVA ``iova``, ``uaddr`` in this process."""

    iova: int
    size: int
    perm: int
    fd: int
    mm: mmap.mmap = field(repr=False)
    uaddr: int
    heap: FirstFit = field(repr=False)
    mapped: bool = True  # in the device's IOTLB

    @property
    def last(self) -> int:
        return self.iova + self.size - 1

    def __contains__(self, iova: int) -> bool:
        return self.iova <= iova <= self.last


class IotlbMemory:
    """Regions of driver memory at IOVAs of our choosing, mapped for the device by ``send``
    (which writes one IOTLB message to the vhost-vdpa fd)."""

    def __init__(
        self,
        send: Callable[[IotlbMsg], None],
        *,
        batching: bool = False,
        iova_range: tuple[int, int] = (0, (1 << 64) - 1),
    ) -> None:
        self._send = send
        self.batching = batching  # the kernel takes BATCH_BEGIN/END (IOTLB_BATCH)
        self.iova_range = iova_range
        self._lock = threading.RLock()
        self._starts: list[int] = []
        self._mappings: list[Mapping] = []  # sorted by IOVA; unmapped ones too until released
        self._placement = threading.local()
        self._batch_depth = 0
        self.messages = 0  # IOTLB messages sent (batch markers included)

    # -- the IOTLB ---------------------------------------------------------------------------

    def map(self, iova: int, size: int, *, perm: int = VHOST_ACCESS_RW) -> Mapping:
        """A new region of ``size`` bytes (whole pages) at ``iova``, announced to the device."""
        if iova % PAGE or size <= 0 or size % PAGE:
            raise ValueError("a region is whole pages at a page-aligned IOVA")
        first, last = self.iova_range
        if iova < first or iova + size - 1 > last:
            raise ValueError(
                f"[0x{iova:x}, 0x{iova + size - 1:x}] is outside the device's "
                f"IOVA range [0x{first:x}, 0x{last:x}]"
            )
        with self._lock:
            i = bisect.bisect_left(self._starts, iova)
            neighbours = self._mappings[max(i - 1, 0) : i + 1]
            if any(m.iova <= iova + size - 1 and iova <= m.last for m in neighbours):
                raise ValueError(f"IOVA 0x{iova:x}+{size} overlaps a region")
            fd = os.memfd_create(f"pyvduse-driver-{iova:x}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                raise
            anchor = ctypes.c_char.from_buffer(mm)
            uaddr = ctypes.addressof(anchor)
            del anchor
            m = Mapping(iova, size, perm, fd, mm, uaddr, FirstFit(0, size))
            try:
                self.send(IotlbMsg(IotlbType.UPDATE, iova, size, uaddr, perm))
            except BaseException:
                mm.close()
                os.close(fd)
                raise
            self._starts.insert(i, iova)
            self._mappings.insert(i, m)
            return m

    def unmap(self, m: Mapping) -> None:
        """Take ``m`` out of the device's IOTLB; its memory stays ours (see ``release``)."""
        with self._lock:
            if m.mapped:
                self.send(IotlbMsg(IotlbType.INVALIDATE, m.iova, m.size))
                m.mapped = False

    def release(self, m: Mapping) -> None:
        """Unmap ``m`` and free its memory."""
        with self._lock:
            self.unmap(m)
            i = self._mappings.index(m)
            del self._mappings[i], self._starts[i]
            m.mm.close()
            os.close(m.fd)

    def send(self, msg: IotlbMsg) -> None:
        self._send(msg)
        self.messages += 1

    @contextmanager
    def batch(self) -> Iterator[None]:
        """IOTLB changes made inside reach the device as one update (when the kernel offers
        IOTLB_BATCH; one by one otherwise)."""
        with self._lock:
            outer = self._batch_depth == 0 and self.batching
            if outer:
                self.send(IotlbMsg(IotlbType.BATCH_BEGIN))
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if outer:
                    self.send(IotlbMsg(IotlbType.BATCH_END))

    @property
    def mappings(self) -> list[Mapping]:
        with self._lock:
            return list(self._mappings)

    def close(self) -> None:
        """Free every region's memory (after the device fd is closed: no messages)."""
        with self._lock:
            for m in self._mappings:
                m.mm.close()
                os.close(m.fd)
            self._mappings.clear()
            self._starts.clear()

    # -- the DMA API the ring drivers use --------------------------------------------------

    @contextmanager
    def placed(self, *mappings: Mapping) -> Iterator[None]:
        """Allocations made by this thread inside come from ``mappings`` only."""
        before = getattr(self._placement, "only", None)
        self._placement.only = list(mappings)
        try:
            yield
        finally:
            self._placement.only = before

    def alloc(self, size: int, align: int = 16) -> int:
        with self._lock:
            only: list[Mapping] | None = getattr(self._placement, "only", None)
            for m in only if only is not None else self._mappings:
                if m.mapped or only is not None:
                    try:
                        return m.iova + m.heap.alloc(size, align)
                    except MemoryError:
                        continue
            raise MemoryError(f"no region has {size} free bytes")

    def alloc_coherent(self, size: int, align: int = 16) -> int:
        return self.alloc(size, align)

    def free(self, iova: int) -> None:
        with self._lock:
            m = self._find(iova)
            if m is not None and iova - m.iova in m.heap.used:
                m.heap.free(iova - m.iova)

    def write(self, iova: int, data: bytes) -> None:
        m = self._holding(iova, len(data))
        off = iova - m.iova
        m.mm[off : off + len(data)] = data

    def read(self, iova: int, length: int) -> bytes:
        m = self._holding(iova, length)
        off = iova - m.iova
        return m.mm[off : off + length]

    def _find(self, iova: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and iova in self._mappings[i]:
            return self._mappings[i]
        return None

    def _holding(self, iova: int, length: int) -> Mapping:
        m = self._find(iova)
        if m is None or iova + max(length, 1) - 1 > m.last:
            raise ValueError(f"IOVA 0x{iova:x}+{length} is not driver memory")
        return m
