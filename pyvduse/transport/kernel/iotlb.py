"""The IOTLB mapping cache: VDUSE IOVA regions mmapped into this process on first use.

``fault_in`` is what a ``RegionMap`` calls for an IOVA it does not know: it asks the kernel for
the region (VDUSE_IOTLB_GET_FD), maps it and closes the fd. ``invalidate`` forgets regions on
UPDATE_IOTLB or reset; their mappings are closed as soon as no view into them is alive.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os

from pyvduse.abi import vduse as v
from pyvduse.ring.memory import MAX_IOVA, Region, RegionMap
from pyvduse.transport.kernel.device_fd import DeviceFd

log = logging.getLogger(__name__)


class IotlbMapper:
    """Maps VDUSE IOTLB regions lazily and unmaps them on invalidation."""

    def __init__(self, dev: DeviceFd) -> None:
        self.dev = dev
        self.regions = RegionMap(self.fault_in)
        self._zombies: list[mmap.mmap] = []  # unmapped once the last view into them is gone

    def fault_in(self, iova: int) -> Region | None:
        try:
            entry, fd = self.dev.iotlb_get_fd(iova, iova)
        except OSError as e:
            if e.errno == errno.EINVAL:  # no region holds this IOVA
                return None
            raise
        try:
            length = entry.last - entry.start + 1
            writable = entry.perm != v.VDUSE_ACCESS_RO
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            skew = entry.offset % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(fd, length + skew, mmap.MAP_SHARED, prot, offset=entry.offset - skew)
        finally:
            os.close(fd)
        view = memoryview(mm)[skew : skew + length]
        log.debug("mapped IOVA [0x%x, 0x%x] perm %d", entry.start, entry.last, entry.perm)
        return Region(entry.start, entry.last, view, writable, owner=mm)

    def invalidate(self, start: int = 0, last: int = MAX_IOVA) -> None:
        for r in self.regions.remove_overlapping(start, last):
            r.mem.release()
            if isinstance(r.owner, mmap.mmap):
                self._zombies.append(r.owner)
        self._reap()

    def _reap(self) -> None:
        alive = []
        for mm in self._zombies:
            try:
                mm.close()
            except BufferError:  # a view still points into it
                alive.append(mm)
        self._zombies = alive
