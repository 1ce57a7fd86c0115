"""The IOTLB mapping cache: VDUSE IOVA regions mmapped into this process on first use.

``fault_in`` is what a ``RegionMap`` calls for an IOVA it does not know: it asks the kernel for
the region (VDUSE_IOTLB_GET_FD), maps it and closes the fd. ``invalidate`` forgets regions on
reset; their mappings are closed as soon as no view into them is alive.

UPDATE_IOTLB (vhost-vdpa changing the driver's memory map) always names the whole IOVA space:
VDUSE replaces its IOTLB and cannot say what changed. ``stale`` asks the kernel again about
each region we have mapped and keeps the ones it still holds as they were (same range,
permission, file and offset): adding a region, or removing another, must not disturb the
requests using those, and only the stale ones are dropped (``drop``).

With ``user_bounce`` (``--bounce-memory daemon``) the bounce buffer -- the region at IOVA 0
where virtio_vdpa copies every request's data -- is backed by our own memory instead
(VDUSE_IOTLB_REG_UMEM, when VDUSE_IOTLB_GET_INFO says the region allows it): pages the
kernel can pin, so direct I/O (``--cache none``) goes straight into them with no copy of
ours. The registration lasts across driver resets; it ends when the device fd closes, or
when the mapping must be fenced (the kernel then copies the pages back to its own first).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import resource
import time

from pyvduse.abi import vduse as v
from pyvduse.ring.memory import MAX_IOVA, Region, RegionMap
from pyvduse.transport.kernel.device_fd import DeviceFd

#: How long a daemon waits for its killed predecessor's bounce memory to be released.
UMEM_BUSY_SECONDS = 5.0

log = logging.getLogger(__name__)


class UserBounce(mmap.mmap):
    """Our memory registered as the bounce buffer; ``before_fence`` (called by
    ``runtime.fence``) hands the pages back to the kernel first."""

    mapper: IotlbMapper | None = None

    def before_fence(self) -> None:
        if self.mapper is not None:
            self.mapper.drop_user_bounce(self)


class IotlbMapper:
    """Maps VDUSE IOTLB regions lazily and unmaps them on invalidation."""

    def __init__(self, dev: DeviceFd, user_bounce: bool = False) -> None:
        self.dev = dev
        self.regions = RegionMap(self.fault_in)
        self._zombies: list[mmap.mmap] = []  # unmapped once the last view into them is gone
        self.user_bounce = user_bounce  # wanted, and not refused by the kernel (yet)
        self._bounce: UserBounce | None = None  # registered with the kernel
        # region start -> what the kernel said of it when we mapped it (see ``stale``)
        self._identity: dict[int, tuple[int, ...]] = {}

    @property
    def bounce_memory(self) -> str:
        """Whose pages the bounce buffer is: ``daemon`` (registered) or ``kernel``."""
        return "daemon" if self._bounce is not None else "kernel"

    def fault_in(self, iova: int) -> Region | None:
        try:
            entry, fd = self.dev.iotlb_get_fd(iova, iova)
        except OSError as e:
            if e.errno == errno.EINVAL:  # no region holds this IOVA
                return None
            raise
        if self.user_bounce and entry.start == 0:
            region = self._user_bounce_region(entry)
            if region is not None:
                os.close(fd)
                return region
        try:
            length = entry.last - entry.start + 1
            writable = entry.perm != v.VDUSE_ACCESS_RO
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            skew = entry.offset % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(fd, length + skew, mmap.MAP_SHARED, prot, offset=entry.offset - skew)
            self._identity[entry.start] = _identity(entry, fd)
        finally:
            os.close(fd)
        view = memoryview(mm)[skew : skew + length]
        log.debug("mapped IOVA [0x%x, 0x%x] perm %d", entry.start, entry.last, entry.perm)
        return Region(entry.start, entry.last, view, writable, owner=mm)

    def stale(self, start: int = 0, last: int = MAX_IOVA) -> list[Region]:
        """Our regions overlapping ``[start, last]`` that the kernel's IOTLB no longer holds
        as we mapped them (asked after the kernel changed it, before we answer)."""
        out = []
        for r in self.regions.regions:
            if r.start <= last and r.last >= start and not self._unchanged(r):
                out.append(r)
        return out

    def _unchanged(self, r: Region) -> bool:
        known = self._identity.get(r.start)
        if known is None or r.owner is self._bounce:
            return False
        try:
            entry, fd = self.dev.iotlb_get_fd(r.start, r.start)
        except OSError:  # EINVAL: nothing there any more
            return False
        try:
            return entry.start == r.start and _identity(entry, fd) == known
        finally:
            os.close(fd)

    def drop(self, regions: list[Region]) -> None:
        """Forget ``regions`` (found ``stale``); the next access maps afresh."""
        for r in regions:
            self.invalidate(r.start, r.last)

    def _user_bounce_region(self, entry: v.IotlbEntry) -> Region | None:
        """The bounce region over our own registered memory; None (logged once, and not
        tried again) when the kernel will not have it."""
        size = entry.last + 1
        if self._bounce is None or len(self._bounce) != size:
            import ctypes  # here: a daemon that never registers memory does not pay for it

            try:
                info = self.dev.iotlb_get_info(0, entry.last)
                if not info.umem_capable:
                    raise OSError(errno.EOPNOTSUPP, "the region cannot be user memory")
                _allow_pinning(size)
                mem = UserBounce(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
                anchor = ctypes.c_char.from_buffer(mem)
                try:
                    self._register(ctypes.addressof(anchor), size)
                finally:
                    del anchor
            except (OSError, ValueError) as e:  # ValueError: RLIMIT_MEMLOCK not raised
                log.warning(
                    "the bounce buffer stays the kernel's (--bounce-memory kernel): "
                    "registering our memory failed: %s",
                    getattr(e, "strerror", None) or e,
                )
                self.user_bounce = False
                return None
            mem.mapper = self
            self._bounce = mem
            log.info("the bounce buffer is the daemon's memory (%d MiB)", size >> 20)
        return Region(0, entry.last, memoryview(self._bounce), True, owner=self._bounce)

    def _register(self, uaddr: int, size: int) -> None:
        """REG_UMEM. EEXIST: the memory of the daemon this one replaces is still registered,
        because the kernel has not finished releasing that daemon's device file (a kill -9
        a moment ago): it will be deregistered shortly, so try again for a while."""
        deadline = time.monotonic() + UMEM_BUSY_SECONDS
        while True:
            try:
                self.dev.reg_umem(uaddr, 0, size)
                return
            except OSError as e:
                if e.errno != errno.EEXIST or time.monotonic() >= deadline:
                    raise
            time.sleep(0.02)

    def drop_user_bounce(self, mem: UserBounce) -> None:
        """Give the bounce buffer back to the kernel (it copies the pages in use) so that
        ``mem`` can be fenced; the next fault-in registers fresh memory."""
        if self._bounce is not mem:
            return
        try:
            self.dev.dereg_umem(0, len(mem))
        except OSError as e:
            log.error("could not hand the bounce buffer back to the kernel: %s", e)
        self._bounce = None
        mem.mapper = None
        self._zombies.append(mem)

    def invalidate(self, start: int = 0, last: int = MAX_IOVA) -> None:
        for r in self.regions.remove_overlapping(start, last):
            self._identity.pop(r.start, None)
            with contextlib.suppress(BufferError):  # the native engine still holds views
                r.mem.release()
            if isinstance(r.owner, mmap.mmap) and r.owner is not self._bounce:
                self._zombies.append(r.owner)  # ours stays registered for the next driver
        self._reap()

    def close(self) -> None:
        """After the device fd closed (the kernel dropped our bounce pages with it)."""
        if self._bounce is not None:
            self._bounce.mapper = None
            self._zombies.append(self._bounce)
            self._bounce = None
        self.invalidate()

    def _reap(self) -> None:
        alive = []
        for mm in self._zombies:
            try:
                mm.close()
            except BufferError:  # a view still points into it
                alive.append(mm)
        self._zombies = alive


def _identity(entry: v.IotlbEntry, fd: int) -> tuple[int, ...]:
    """What makes a kernel IOTLB region the same one: its range, permission, and the file
    and offset behind it."""
    st = os.fstat(fd)
    return (entry.start, entry.last, entry.perm, entry.offset, st.st_dev, st.st_ino)


def _allow_pinning(size: int) -> None:
    """The kernel counts pinned bounce pages against RLIMIT_MEMLOCK: raise it (root may)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    infinity = resource.RLIM_INFINITY
    need = size + (64 << 20)  # room for what else is pinned
    if soft == infinity or soft >= need:
        return
    new_hard = hard if hard == infinity or hard >= need else need
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (need, new_hard))
