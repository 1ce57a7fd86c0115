"""Driver memory as the device sees it: IOVA ranges mapped into this process.

A ring and the buffers it points at are addressed by IOVA. ``RegionMap`` turns an IOVA range
into memoryviews of local mappings, refusing anything outside a mapped region or writes to a
read-only one. It knows nothing about how regions are obtained: a transport hands it a
``fault_in`` callable (the kernel transport does VDUSE_IOTLB_GET_FD + mmap; tests use
bytearrays), which keeps this module free of I/O.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class MemoryFault(Exception):
    """An IOVA range that is not (entirely) mapped, or not writable when it must be."""

    def __init__(self, iova: int, length: int, why: str = "not mapped") -> None:
        super().__init__(f"IOVA range 0x{iova:x}+{length} {why}")
        self.iova = iova
        self.length = length


@dataclass(eq=False)
class Region:
    """One mapped IOVA range ``[start, last]`` and the local memory behind it."""

    start: int
    last: int
    mem: memoryview
    writable: bool = True
    owner: object = field(default=None, repr=False)  # whatever keeps ``mem`` alive (an mmap)

    def __post_init__(self) -> None:
        if len(self.mem) != self.last - self.start + 1:
            raise ValueError("region memory does not match its IOVA range")


class GuestMemory(Protocol):
    """What the ring engine needs of driver memory."""

    def view(self, iova: int, length: int, write: bool = False) -> memoryview:
        """A contiguous view of ``[iova, iova+length)``; MemoryFault if not in one region."""
        ...

    def segments(self, iova: int, length: int, write: bool = False) -> list[memoryview]:
        """Views covering ``[iova, iova+length)``, split where regions meet."""
        ...


FaultIn = Callable[[int], "Region | None"]

MAX_IOVA = (1 << 64) - 1


class RegionMap:
    """A sorted set of non-overlapping regions with a last-hit cache and lazy fault-in.

    Several threads use one map at once (each queue's worker, the control thread reading
    the chains a dead daemon left in flight): lookups take no lock and see either the map
    before a change or after it, never half of one (the sorted index is replaced whole);
    faulting a region in is serialised, and a thread that waited finds the region the
    other one added instead of adding it twice.
    """

    def __init__(self, fault_in: FaultIn | None = None) -> None:
        self._index: tuple[list[int], list[Region]] = ([], [])  # starts, regions: one value
        self._fault_in = fault_in
        self._fault_lock = threading.RLock()  # writers: fault-ins, adds, removals
        self._hit: Region | None = None

    @property
    def regions(self) -> list[Region]:
        return list(self._index[1])

    def add(self, region: Region) -> None:
        with self._fault_lock:
            starts, regions = self._index
            i = bisect.bisect_left(starts, region.start)
            if i > 0 and regions[i - 1].last >= region.start:
                raise ValueError("overlapping region")
            if i < len(regions) and regions[i].start <= region.last:
                raise ValueError("overlapping region")
            self._index = ([*starts[:i], region.start, *starts[i:]], [*regions[:i], region, *regions[i:]])

    def remove_overlapping(self, start: int, last: int) -> list[Region]:
        """Forget every region that overlaps ``[start, last]`` and return them."""
        kept: list[Region] = []
        gone: list[Region] = []
        with self._fault_lock:
            for r in self._index[1]:
                (gone if r.start <= last and r.last >= start else kept).append(r)
            self._index = ([r.start for r in kept], kept)
            self._hit = None
        return gone

    def clear(self) -> list[Region]:
        return self.remove_overlapping(0, MAX_IOVA)

    def _cached(self, iova: int) -> Region | None:
        starts, regions = self._index
        i = bisect.bisect_right(starts, iova) - 1
        if i >= 0:
            r = regions[i]
            if r.start <= iova <= r.last:
                return r
        return None

    def find(self, iova: int) -> Region | None:
        """The region holding ``iova``, faulting it in if needed."""
        r = self._hit
        if r is not None and r.start <= iova <= r.last:
            return r
        r = self._cached(iova)
        if r is None and self._fault_in is not None:
            with self._fault_lock:
                r = self._cached(iova)  # another thread may have faulted it in meanwhile
                if r is None:
                    r = self._fault_in(iova)
                    if r is None or not r.start <= iova <= r.last:
                        return None
                    self.add(r)
        if r is not None:
            self._hit = r
        return r

    def view(self, iova: int, length: int, write: bool = False) -> memoryview:
        if length < 0 or iova < 0 or iova + length - 1 > MAX_IOVA:
            raise MemoryFault(iova, length, "is not a valid range")
        r = self.find(iova)
        if r is None:
            raise MemoryFault(iova, length)
        if write and not r.writable:
            raise MemoryFault(iova, length, "is read-only")
        off = iova - r.start
        if length and iova + length - 1 > r.last:
            raise MemoryFault(iova, length, "crosses the end of its region")
        return r.mem[off : off + length]

    def segments(self, iova: int, length: int, write: bool = False) -> list[memoryview]:
        r = self._hit
        if r is not None and r.start <= iova and iova + length - 1 <= r.last:
            if write and not r.writable:
                raise MemoryFault(iova, length, "is read-only")
            off = iova - r.start
            return [r.mem[off : off + length]]
        if length <= 0 or iova < 0 or iova + length - 1 > MAX_IOVA:
            if length == 0 and iova >= 0:
                return []
            raise MemoryFault(iova, length, "is not a valid range")
        out: list[memoryview] = []
        pos, end = iova, iova + length
        while pos < end:
            r = self.find(pos)
            if r is None:
                raise MemoryFault(iova, length)
            if write and not r.writable:
                raise MemoryFault(iova, length, "is read-only")
            stop = min(end, r.last + 1)
            out.append(r.mem[pos - r.start : stop - r.start])
            pos = stop
        return out


def buffer_region(start: int, buf: bytearray | memoryview, writable: bool = True) -> Region:
    """A region backed by a local buffer (tests, the in-process model)."""
    mv = memoryview(buf).cast("B")
    return Region(start, start + len(mv) - 1, mv, writable, owner=buf)
