"""The driver side of a packed virtqueue, for feeding the device engine in tests.

It lays out the descriptor ring and the two event suppression areas in driver memory (an
``Arena``, or anything with the same ``alloc``/``write``/``read``) and does what section 2.8
asks of a driver: descriptors carry AVAIL/USED bits from the Driver Ring
Wrap Counter, the counter flips after the ring's last slot, a chain's buffer id is in its last
descriptor (written in all of them, as Linux does), and the chain's *first* flags are written
last so the device never sees half a chain. Completions are read in ring order, skipping the
number of slots each buffer id occupied, with the driver's used wrap counter; ids and slots
are recycled.

Raw setters (``write_desc``, ``set_driver_event``, ``slot``/``avail_bits``/``commit``) let
hostile tests write anything they like.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pyvduse.abi.virtio import (
    DESC_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_DESC_EVENT,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)
from pyvduse.model.split_driver import Completion
from pyvduse.ring.packed_layout import (
    AVAIL_PATTERN,
    EVENT_AREA_SIZE,
    EVENT_FLAGS_MASK,
    EVENT_OFF_MASK,
    event_crossed,
    is_used,
    linear,
    off_wrap,
)
from pyvduse.ring.split import full_fence

__all__ = ["Completion", "DmaMemory", "DriverPackedRing"]

_HEAD = VRING_PACKED_DESC.size - 2  # bytes of a descriptor before its flags


class DmaMemory(Protocol):
    """What the driver needs of memory: an ``Arena`` or the kernel model's IOVA space.

    ``alloc_coherent`` (for the ring) and ``free`` are used when the object has them.
    """

    def alloc(self, size: int, align: int = 16) -> int: ...
    def write(self, iova: int, data: bytes) -> None: ...
    def read(self, iova: int, length: int) -> bytes: ...


class DriverPackedRing:
    """A packed ring of ``num`` entries owned by a test 'driver'."""

    def __init__(self, arena: DmaMemory, num: int, event_idx: bool = True) -> None:
        if not 0 < num <= 32768:
            raise ValueError(f"queue size {num} is not between 1 and 32768")
        self.arena = arena
        self.num = num
        self.event_idx = event_idx
        # One coherent allocation: the descriptor ring, then the driver and device areas.
        alloc_ring: Callable[[int, int], int] = getattr(arena, "alloc_coherent", arena.alloc)
        self._free: Callable[[int], None] | None = getattr(arena, "free", None)
        base = alloc_ring(DESC_SIZE * num + 2 * EVENT_AREA_SIZE, 16)
        self.desc_addr = base
        self.driver_addr = base + DESC_SIZE * num
        self.device_addr = self.driver_addr + EVENT_AREA_SIZE
        arena.write(base, bytes(DESC_SIZE * num + 2 * EVENT_AREA_SIZE))  # zero-initialized
        self.next_avail = 0  # next slot to make available
        self.avail_wrap = 1  # Driver Ring Wrap Counter
        self.next_used = 0  # next slot a used descriptor will appear in
        self.used_wrap = 1  # the device's counter as the driver tracks it
        self.free_ids = list(range(num - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.free_slots = num
        # buffer id -> (slots occupied, writable (iova, len) buffers, token, allocations)
        self.pending: dict[int, tuple[int, list[tuple[int, int]], object, list[int]]] = {}
        self._unpublished: list[tuple[int, int]] = []  # (head slot, head flags) not yet written
        self._kick_pos = 0  # linear avail position at the last kick_needed()

    # -- raw access ---------------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        """Write ring slot ``i`` verbatim (flags included: no wrap bits are added)."""
        self.arena.write(self.desc_addr + DESC_SIZE * i, VRING_PACKED_DESC.pack(addr, length, buf_id, flags))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring slot ``i``."""
        addr, length, buf_id, flags = VRING_PACKED_DESC.unpack(
            self.arena.read(self.desc_addr + DESC_SIZE * i, DESC_SIZE)
        )
        return addr, length, buf_id, flags

    def _write_flags(self, i: int, flags: int) -> None:
        self.arena.write(self.desc_addr + DESC_SIZE * i + _HEAD, flags.to_bytes(2, "little"))

    def slot(self, k: int = 0) -> int:
        """The ring index ``k`` slots after the next one to make available."""
        return (self.next_avail + k) % self.num

    def avail_bits(self, k: int = 0) -> int:
        """The AVAIL/USED bits that mark slot ``slot(k)`` available (with its lap's counter)."""
        wrap = self.avail_wrap ^ ((self.next_avail + k) // self.num & 1)
        return AVAIL_PATTERN[wrap]

    def commit(
        self, nslots: int, buf_id: int, *, token: object = None, writable: list[tuple[int, int]] | None = None
    ) -> None:
        """Account for a chain of ``nslots`` the caller wrote by hand (raw tests).

        Advances the avail position and registers ``buf_id`` so ``collect`` can skip the
        right number of slots when the device completes it.
        """
        if buf_id in self.free_ids:
            self.free_ids.remove(buf_id)
        self.pending[buf_id] = (nslots, writable or [], token, [])
        self.free_slots -= nslots
        self._advance_avail(nslots)

    def _advance_avail(self, n: int) -> None:
        pos = self.next_avail + n
        while pos >= self.num:
            pos -= self.num
            self.avail_wrap ^= 1
        self.next_avail = pos

    # -- event suppression --------------------------------------------------------------

    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        """Write the driver event suppression area (raw: any flags value)."""
        self.arena.write(self.driver_addr, VRING_PACKED_DESC_EVENT.pack(off_wrap(off, wrap), flags))

    def suppress_interrupts(self, on: bool = True) -> None:
        self.set_driver_event(VRING_PACKED_EVENT_FLAG_DISABLE if on else VRING_PACKED_EVENT_FLAG_ENABLE)

    def set_used_event(self, off: int, wrap: int) -> None:
        """Interrupt once the used descriptor at ring offset ``off`` in lap ``wrap`` is written."""
        self.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, off, wrap)

    def enable_interrupts(self) -> None:
        """Interrupt on the next completion: DESC at the next used slot with EVENT_IDX (as
        Linux does), ENABLE without."""
        if self.event_idx:
            self.set_used_event(self.next_used, self.used_wrap)
        else:
            self.suppress_interrupts(False)

    def arm_interrupt(self) -> None:
        """Before waiting: the driver event area already asks for every completion (ENABLE,
        or DESC at the next used slot once ``enable_interrupts`` wrote it), unless a test
        chose otherwise: nothing to write."""

    def device_event(self) -> tuple[int, int, int]:
        """(offset, wrap counter, flags) of the device event suppression area."""
        ow, flags = VRING_PACKED_DESC_EVENT.unpack(self.arena.read(self.device_addr, EVENT_AREA_SIZE))
        return ow & EVENT_OFF_MASK, ow >> 15, flags

    def kick_needed(self) -> bool:
        """After publishing: does the device want a kick for what was added since the last?"""
        new = linear(self.next_avail, self.avail_wrap, self.num)
        old, self._kick_pos = self._kick_pos, new
        full_fence()
        off, wrap, flags = self.device_event()
        flags &= EVENT_FLAGS_MASK
        if flags == VRING_PACKED_EVENT_FLAG_DISABLE:
            return False
        if flags != VRING_PACKED_EVENT_FLAG_DESC:
            return True
        return new != old and event_crossed(off_wrap(off, wrap), new, old, self.num)

    # -- requests -----------------------------------------------------------------------

    def add(
        self,
        readable: list[bytes],
        writable: list[int],
        *,
        indirect: bool = False,
        token: object = None,
        publish: bool = True,
    ) -> int:
        """Queue one request: buffers holding ``readable``, then buffers of ``writable`` sizes.

        Returns the buffer id. With ``publish=False`` the chain is written but its first
        descriptor's flags wait for ``publish()``.
        """
        arena = self.arena
        bufs: list[tuple[int, int, int]] = []
        allocs: list[int] = []
        for data in readable:
            iova = arena.alloc(max(len(data), 1))
            allocs.append(iova)
            arena.write(iova, data)
            bufs.append((iova, len(data), 0))
        wbufs: list[tuple[int, int]] = []
        for n in writable:
            iova = arena.alloc(max(n, 1))
            allocs.append(iova)
            bufs.append((iova, n, VRING_DESC_F_WRITE))
            wbufs.append((iova, n))
        if not bufs:
            raise ValueError("a request needs at least one buffer")
        if indirect:
            table = arena.alloc(DESC_SIZE * len(bufs), 16)
            allocs.append(table)
            arena.write(table, b"".join(VRING_PACKED_DESC.pack(iova, n, 0, f) for iova, n, f in bufs))
            ring: list[tuple[int, int, int]] = [(table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT)]
        else:
            ring = bufs
        if len(ring) > self.free_slots or not self.free_ids:
            self._release(allocs)
            raise RuntimeError("ring full")
        buf_id = self.free_ids.pop()
        head_flags = 0
        head_slot = self.next_avail
        for k, (iova, n, f) in enumerate(ring):
            i = self.slot(k)
            f |= self.avail_bits(k) | (VRING_DESC_F_NEXT if k + 1 < len(ring) else 0)
            if k == 0:  # everything but the flags now; the flags once the rest is there
                arena.write(
                    self.desc_addr + DESC_SIZE * i, VRING_PACKED_DESC.pack(iova, n, buf_id, 0)[:_HEAD]
                )
                head_flags = f
            else:
                self.write_desc(i, iova, n, buf_id, f)
        self.pending[buf_id] = (len(ring), wbufs, token, allocs)
        self.free_slots -= len(ring)
        self._advance_avail(len(ring))
        self._unpublished.append((head_slot, head_flags))
        if publish:
            self.publish()
        return buf_id

    def publish(self) -> None:
        """Expose chains added with ``publish=False``: the earliest chain's head flags last."""
        for head_slot, flags in reversed(self._unpublished):
            self._write_flags(head_slot, flags)
        self._unpublished.clear()

    def collect(self) -> list[Completion]:
        """Completions the device has published since the last call."""
        out = []
        for _ in range(self.num):
            # the flags first: the device writes them after the id and len
            off = self.desc_addr + DESC_SIZE * self.next_used + _HEAD
            if not is_used(int.from_bytes(self.arena.read(off, 2), "little"), self.used_wrap):
                break
            _addr, length, buf_id, flags = self.read_desc(self.next_used)
            if buf_id not in self.pending:
                raise RuntimeError(f"device completed buffer id {buf_id}, which is not in flight")
            nslots, wbufs, token, allocs = self.pending.pop(buf_id)
            pos = self.next_used + nslots
            if pos >= self.num:
                pos -= self.num
                self.used_wrap ^= 1
            self.next_used = pos
            self.free_ids.append(buf_id)
            self.free_slots += nslots
            # len is only meaningful in a used descriptor with WRITE (section 2.8.4)
            c = Completion(buf_id, length if flags & VRING_DESC_F_WRITE else 0, wbufs, token)
            c.data = self.read_writable(c)
            self._release(allocs)
            out.append(c)
        return out

    def _release(self, allocs: list[int]) -> None:
        if self._free is not None:
            for iova in allocs:
                self._free(iova)

    def read_writable(self, c: Completion) -> bytes:
        return b"".join(self.arena.read(iova, n) for iova, n in c.writable)

    def in_flight(self) -> int:
        """Buffers made available and not yet collected."""
        return len(self.pending)
