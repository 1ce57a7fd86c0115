"""The packed virtqueue, device side (virtio 1.2 section 2.8), as a plain object over memory.

Same interface as ``SplitQueue`` so a worker can drive either: ``pop`` reads the descriptor
ring and returns validated chains, ``push`` and ``publish`` write used descriptors and say
whether the driver wants an interrupt, ``enable_kicks`` says whether more work arrived while
kicks were off, and ``state`` gives what VDUSE's GET_VQ_STATE wants.

Layout: ``desc_addr`` is the descriptor ring (``num`` 16-byte ``pvirtq_desc``, read *and*
written by the device), ``driver_addr`` the driver event suppression area (read only by
us: when to interrupt), ``device_addr`` the device event suppression area (written only by
us: when to kick).

Write order: ``push`` writes the used descriptor's ``len`` and ``id`` at once (that slot was
already consumed by ``pop``, so the driver does not look at it until its flags change) and
remembers the flags; ``publish`` writes the remembered flags (one 16-bit store each, see
``stores``), the batch's first descriptor last, so a batch becomes visible at once, exactly
like split's single ``used->idx`` store.
Until ``publish`` the driver sees nothing; ``used_idx``/``used_wrap`` (and ``state``) already
count pushed completions, as split's ``used_idx`` does, so publish before saving state.

Completions may come in any order: ``push`` writes the next used slot with whichever buffer
id finished, and moves the used position by that chain's own ``ndesc`` (the driver steps
over as many slots as that id's chain took). A buffer id the driver offers again while it
is still in flight breaks the ring.

Errors: a bad chain fails its own request: ``pop`` returns a ``Chain`` with ``error`` set,
whose ``ndesc`` covers the slots the chain occupied so the ring stays in step. Where the
chain ends is found from NEXT flags alone, even after an error, and a descriptor in the
middle of a chain that is not available (AVAIL/USED bits not matching the wrap counter)
ends the chain *before* it: that slot is not consumed. The buffer id comes from the chain's
last consumed descriptor; an id ``>= num`` cannot be completed and breaks the ring
(``RingError``, ``broken`` set), as do an unmapped ring, areas that overlap or are
misaligned (``areas``), or a bad saved state.
"""

from __future__ import annotations

import struct

from pyvduse.abi.virtio import (
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    LE16,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    has,
)
from pyvduse.ring.areas import check_areas, packed_areas
from pyvduse.ring.chain import Chain
from pyvduse.ring.descriptors import add_buffer, check_writable_total, indirect_table
from pyvduse.ring.errors import ChainError, RingError
from pyvduse.ring.memory import GuestMemory, MemoryFault
from pyvduse.ring.packed_layout import (
    AVAIL_PATTERN,
    EVENT_AREA_SIZE,
    EVENT_FLAGS_MASK,
    F_AVAIL_USED,
    USED_PATTERN,
    event_crossed,
    walk_indirect_packed,
)
from pyvduse.ring.split import full_fence
from pyvduse.ring.stores import words16

_unpack_desc = VRING_PACKED_DESC.unpack_from
_unpack16 = LE16.unpack_from
_pack_len_id = struct.Struct("<IH").pack_into  # a used descriptor's le32 len, le16 id at +8

_NEXT = VRING_DESC_F_NEXT
_INDIRECT = VRING_DESC_F_INDIRECT
_NEXT_OR_INDIRECT = _NEXT | _INDIRECT
_WRITE = VRING_DESC_F_WRITE
_DISABLE = VRING_PACKED_EVENT_FLAG_DISABLE
_ENABLE = VRING_PACKED_EVENT_FLAG_ENABLE
_DESC = VRING_PACKED_EVENT_FLAG_DESC
_WRAP_SHIFT = VRING_PACKED_EVENT_F_WRAP_CTR

MAX_QUEUE_SIZE = 32768


class PackedQueue:
    """Device-side state and operations of one packed virtqueue."""

    def __init__(
        self,
        memory: GuestMemory,
        num: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        features: int,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
        *,
        avail_wrap: int = 1,
        used_wrap: int = 1,
    ) -> None:
        """Attach to a ring at the given position.

        ``last_avail_idx``/``avail_wrap`` and ``used_idx``/``used_wrap`` are VDUSE's packed
        VQ state (both counters start at 1). ``used_idx=None`` means nothing is in flight:
        the used position is the avail position (and ``used_wrap`` is taken from
        ``avail_wrap``), which is what a fresh ring or a drained one looks like.
        """
        if not 0 < num <= MAX_QUEUE_SIZE:
            raise RingError(f"queue size {num} is not between 1 and {MAX_QUEUE_SIZE}")
        if used_idx is None:
            used_idx, used_wrap = last_avail_idx, avail_wrap
        if not (0 <= last_avail_idx < num and 0 <= used_idx < num):
            raise RingError(
                f"ring state avail {last_avail_idx} / used {used_idx} is outside the queue of {num}"
            )
        self.num = num
        self.memory = memory
        self.event_idx = has(features, F_RING_EVENT_IDX)
        self.indirect = has(features, F_RING_INDIRECT_DESC)
        self.desc_addr, self.driver_addr, self.device_addr = desc_addr, driver_addr, device_addr
        check_areas(packed_areas(num, desc_addr, driver_addr, device_addr))
        self.remap()
        #: 1 at each buffer id taken and not yet pushed: an id the driver offers again while
        #: it is in flight breaks the ring.
        self.in_flight = bytearray(num)
        self.last_avail_idx = last_avail_idx
        self.avail_wrap = avail_wrap & 1
        self.used_idx = used_idx
        self.used_wrap = used_wrap & 1
        # (flags word index << 16 | flags) of pushed, not yet published, used descriptors
        self._unpublished: list[int] = []
        self._signalled = self._used_pos()  # used position when the driver was last notified
        self.broken: str | None = None

    def remap(self) -> None:
        """(Re)take views of the ring areas from driver memory (after its map changed)."""
        memory = self.memory
        try:
            self.desc = memory.view(self.desc_addr, DESC_SIZE * self.num, True)
            self.driver_event = memory.view(self.driver_addr, EVENT_AREA_SIZE, False)
            self.device_event = memory.view(self.device_addr, EVENT_AREA_SIZE, True)
        except MemoryFault as e:
            raise RingError(f"ring not mapped: {e}") from None
        self._desc16 = words16(self.desc)  # flags the driver polls: one store each
        self._device16 = words16(self.device_event)

    def in_flight_count(self) -> int:
        return self.num - self.in_flight.count(0)

    def reset_signalled(self) -> None:
        """After the used position was moved by hand (a restart): count from there."""
        self._signalled = self._used_pos()

    def _used_pos(self) -> int:
        return self.used_idx if self.used_wrap else self.used_idx + self.num

    def state(self) -> tuple[int, int, int, int]:
        """(last_avail_counter, last_avail_idx, last_used_counter, last_used_idx) for VDUSE."""
        return self.avail_wrap, self.last_avail_idx, self.used_wrap, self.used_idx

    # -- avail side ---------------------------------------------------------------------

    def pending(self) -> int:
        """1 if the driver has made a descriptor available that we have not taken, else 0.

        A packed ring has no avail index: counting chains would mean walking them, so this
        only looks at the next slot (any non-zero result means "call ``pop``").
        """
        flags = _unpack16(self.desc, self.last_avail_idx * DESC_SIZE + 14)[0]
        return 1 if flags & F_AVAIL_USED == AVAIL_PATTERN[self.avail_wrap] else 0

    def pop(self) -> Chain | None:
        """Take the next available chain, or None when the ring is empty.

        Bounded: reads at most ``num`` ring descriptors plus one indirect table of at most
        ``num`` entries.
        """
        if self.broken:
            raise RingError(self.broken)
        desc, num = self.desc, self.num
        idx = self.last_avail_idx
        wrap = self.avail_wrap
        off = idx * DESC_SIZE
        # The flags first: the driver writes them after the rest of the descriptor (and the
        # head's after the rest of the chain), so once they say "available" the rest is there.
        flags = _unpack16(desc, off + 14)[0]
        if flags & F_AVAIL_USED != AVAIL_PATTERN[wrap]:
            return None
        addr, length, bid, _ = _unpack_desc(desc, off)
        memory = self.memory
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        error: str | None = None
        count = 1
        if not flags & _NEXT_OR_INDIRECT:  # the common cases first: one direct descriptor
            try:
                add_buffer(memory, addr, length, flags, readable, writable)
            except ChainError as e:
                error = str(e)
        elif flags & _NEXT_OR_INDIRECT == _INDIRECT and self.indirect:  # ... or one table
            try:
                walk_indirect_packed(memory, indirect_table(memory, addr, length, num), readable, writable)
            except ChainError as e:
                error = str(e)
        else:
            wsum = 0  # bytes of device-writable buffers
            while True:
                if error is None:
                    try:
                        if flags & _INDIRECT:
                            if not self.indirect:
                                raise ChainError("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
                            if flags & _NEXT:
                                raise ChainError("indirect descriptor with NEXT set")
                            if count > 1:
                                raise ChainError("indirect descriptor inside a chain")
                            table = indirect_table(memory, addr, length, num)
                            walk_indirect_packed(memory, table, readable, writable)
                        else:
                            add_buffer(memory, addr, length, flags, readable, writable)
                            if flags & _WRITE:
                                wsum += length
                        if not flags & _NEXT:
                            check_writable_total(wsum)
                    except ChainError as e:
                        error = str(e)
                if not flags & _NEXT:
                    break
                if count == num:
                    if error is None:
                        error = "descriptor chain is longer than the queue"
                    break
                idx += 1
                if idx == num:
                    idx = 0
                    wrap ^= 1
                addr, length, nbid, flags = _unpack_desc(desc, idx * DESC_SIZE)
                if flags & F_AVAIL_USED != AVAIL_PATTERN[wrap]:
                    if error is None:
                        error = (
                            f"descriptor {idx} in the middle of a chain is not available "
                            f"(wrap counter {wrap})"
                        )
                    break  # that slot is not part of this chain: not consumed
                bid = nbid
                count += 1
        if bid >= num:
            self._break(f"buffer id {bid} is outside the queue of {num}")
        if self.in_flight[bid]:
            self._break(f"buffer id {bid} made available again while it is in flight")
        self.in_flight[bid] = 1
        pos = self.last_avail_idx + count
        if pos >= num:
            pos -= num
            self.avail_wrap ^= 1
        self.last_avail_idx = pos
        return Chain(bid, readable, writable, error, count)

    # -- used side ----------------------------------------------------------------------

    def push(self, head: int, written: int, ndesc: int = 1) -> None:
        """Record a completion of buffer id ``head`` occupying ``ndesc`` slots.

        Writes the used descriptor's len and id now; its flags (which hand it to the driver)
        wait for ``publish``. ``head`` and ``ndesc`` must be a popped chain's ``head`` and
        ``ndesc``.
        """
        self.in_flight[head] = 0
        idx = self.used_idx
        off = idx * DESC_SIZE
        _pack_len_id(self.desc, off + 8, written, head)
        self._unpublished.append(
            (off + 14) >> 1 << 16 | USED_PATTERN[self.used_wrap] | (_WRITE if written else 0)
        )
        idx += ndesc
        if idx >= self.num:
            idx -= self.num
            self.used_wrap ^= 1
        self.used_idx = idx

    def publish(self) -> bool:
        """Make pushed completions visible; True if the driver asked to be interrupted."""
        pend = self._unpublished
        if not pend:
            return False
        desc16 = self._desc16
        for k in range(len(pend) - 1, -1, -1):  # the batch's first descriptor last
            v = pend[k]
            desc16[v >> 16] = v & 0xFFFF
        pend.clear()
        new = self.used_idx if self.used_wrap else self.used_idx + self.num
        old = self._signalled
        self._signalled = new
        full_fence()  # flags stores before reading the driver's event suppression
        flags = _unpack16(self.driver_event, 2)[0] & EVENT_FLAGS_MASK
        if flags == _DISABLE:
            return False
        if flags != _DESC or not self.event_idx:
            return True  # ENABLE; DESC without EVENT_IDX or the reserved 3: interrupt
        # off_wrap after flags: the driver writes it before switching flags to DESC
        return event_crossed(_unpack16(self.driver_event, 0)[0], new, old, self.num)

    # -- kick suppression ---------------------------------------------------------------

    def disable_kicks(self) -> None:
        """Ask the driver not to kick while we are busy (best effort, per the spec)."""
        self._device16[1] = _DISABLE

    def ask_for_kick(self) -> None:
        """Ask the driver to kick at its next addition, whatever is pending now (a worker
        whose budget is spent waits for that kick before it serves on)."""
        self._device16[1] = _ENABLE
        full_fence()

    def enable_kicks(self) -> bool:
        """Ask for a kick on new work; True if work is already there (process it now).

        With EVENT_IDX: a kick once the driver makes our next slot available (DESC with our
        avail offset and wrap counter); without: any kick (ENABLE).
        """
        if self.event_idx:  # the offset before the flags that make the driver use it
            self._device16[0] = self.last_avail_idx | self.avail_wrap << _WRAP_SHIFT
            self._device16[1] = _DESC
        else:
            self._device16[1] = _ENABLE
        full_fence()
        return self.pending() > 0

    def _break(self, why: str) -> None:
        self.broken = why
        raise RingError(why)
