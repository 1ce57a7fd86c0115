"""The split virtqueue, device side (virtio 1.2 section 2.7), as a plain object over memory.

It does no I/O: ``pop`` reads the avail ring and returns validated chains, ``push`` and
``publish`` write the used ring and say whether the driver wants an interrupt, and
``enable_kicks`` says whether more work arrived while kicks were off. A worker thread (or a
test) drives it.

Ring-level corruption (an avail index that runs ahead by more than the queue size, a head
outside the table, a head made available again while it is still in flight) raises
``RingError``: nothing on that ring can be trusted any more; so does a ring whose areas
overlap or are misaligned (``areas``), when the queue is set up. A bad chain only fails its own
request: ``pop`` returns a ``Chain`` with ``error`` set.

Requests may complete in any order: ``push`` takes any head that is in flight, and the used
ring records completions in the order they were pushed (the spec allows it unless
VIRTIO_F_IN_ORDER is negotiated, which pyvduse never offers). ``in_flight`` marks the heads
taken and not yet pushed.
"""

from __future__ import annotations

import threading

from pyvduse.abi.virtio import (
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    LE16,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    VRING_USED_F_NO_NOTIFY,
    avail_ring_size,
    has,
    need_event,
    used_ring_size,
)
from pyvduse.ring.areas import check_areas, split_areas
from pyvduse.ring.chain import Chain
from pyvduse.ring.descriptors import (
    add_buffer,
    check_writable_total,
    indirect_table,
    walk_indirect,
)
from pyvduse.ring.errors import ChainError, RingError
from pyvduse.ring.memory import GuestMemory, MemoryFault
from pyvduse.ring.stores import words16

_unpack_desc = VRING_DESC.unpack_from
_unpack16 = LE16.unpack_from
_pack_used = VRING_USED_ELEM.pack_into

MAX_QUEUE_SIZE = 32768

# Taking and releasing a lock is a locked instruction, i.e. a full memory barrier on x86 and
# a acquire/release pair elsewhere: what the spec asks between publishing avail_event and
# re-reading avail->idx, which Python has no other way to express.
_fence_lock = threading.Lock()


def full_fence() -> None:
    """A store-load barrier."""
    with _fence_lock:
        pass


class SplitQueue:
    """Device-side state and operations of one split virtqueue."""

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
    ) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.num = num
        self.memory = memory
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, driver_addr, device_addr
        self.event_idx = has(features, F_RING_EVENT_IDX)
        self.indirect = has(features, F_RING_INDIRECT_DESC)
        check_areas(split_areas(num, desc_addr, driver_addr, device_addr, self.event_idx))
        self.remap()
        #: 1 at each head taken and not yet pushed (shared with a native engine serving the
        #: same ring: a head the driver offers again while it is in flight breaks the ring).
        self.in_flight = bytearray(num)
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self._avail_seen = self.last_avail_idx  # avail->idx as last read (validated)
        self.used_idx = _unpack16(self.used, 2)[0] if used_idx is None else used_idx & 0xFFFF
        self._signalled_used = self.used_idx  # used index when the driver was last notified
        self._used_event_off = 4 + 2 * num
        self._avail_event_off = 4 + 8 * num
        self.broken: str | None = None

    def remap(self) -> None:
        """(Re)take views of the three ring areas from driver memory (after its map changed).

        Raises RingError when they are not all mapped.
        """
        memory, num = self.memory, self.num
        try:
            self.desc = memory.view(self.desc_addr, DESC_SIZE * num, False)
            self.avail = memory.view(self.avail_addr, avail_ring_size(num, self.event_idx), False)
            self.used = memory.view(self.used_addr, used_ring_size(num, self.event_idx), True)
        except MemoryFault as e:
            raise RingError(f"ring not mapped: {e}") from None
        self._used16 = words16(self.used)  # flags, idx, avail_event: one store each

    def in_flight_count(self) -> int:
        return self.num - self.in_flight.count(0)

    # -- avail side ---------------------------------------------------------------------

    def avail_idx(self) -> int:
        return int(_unpack16(self.avail, 2)[0])

    def pending(self) -> int:
        """How many chains the driver has made available that we have not taken."""
        seen = _unpack16(self.avail, 2)[0]
        n: int = (seen - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            self._break(f"avail index moved by {n}, more than the queue size {self.num}")
        self._avail_seen = seen
        return n

    def resume_at(self, index: int) -> None:
        """Take the next chain from avail index ``index`` (after a restart).

        The cached avail index moves with it, so ``pop`` reads the driver's index again
        before it takes anything: it never trusts entries the driver has not published.
        """
        self.last_avail_idx = self._avail_seen = index & 0xFFFF

    def position(self) -> tuple[int, int, int, int]:
        """(last_avail_idx, used_idx, used index last signalled, avail index last read): all
        another engine serving this ring needs to take over (and ``set_position`` to hand it
        back). The avail index as read goes with it: an engine re-reads ``avail->idx`` only
        once it has taken what it saw, and one that took over re-reading it earlier would
        serve a driver that rewrites it differently from the engine alone."""
        return self.last_avail_idx, self.used_idx, self._signalled_used, self._avail_seen

    def set_position(self, last_avail: int, used: int, signalled: int, avail_seen: int | None = None) -> None:
        """Take over where another engine stands (see ``position``); without ``avail_seen``
        (or with one that is no position the ring could have reached) the avail index is
        read again before anything is taken, as after ``resume_at``."""
        self.resume_at(last_avail)
        if avail_seen is not None and (avail_seen - self.last_avail_idx) & 0xFFFF <= self.num:
            self._avail_seen = avail_seen & 0xFFFF
        self.used_idx = used & 0xFFFF
        self._signalled_used = signalled & 0xFFFF

    def resume_at_used(self) -> None:
        """Without an in-flight log, take up where the used ring says the device stopped.

        Exact for a device that completes in the order it takes (as pyvduse's workers do):
        what lies between used->idx and avail->idx was in flight or never taken.
        """
        self.resume_at(self.used_idx)

    def head_at(self, index: int) -> int:
        """The head the avail ring holds at (free-running) index ``index``."""
        return int(_unpack16(self.avail, 4 + 2 * (index % self.num))[0])

    def chain_at(self, head: int) -> Chain:
        """Walk the chain starting at ``head`` again (to repeat a request after a restart)."""
        if head >= self.num:
            self._break(f"head {head} outside the queue of {self.num}")
        self.in_flight[head] = 1
        return self._chain(head)

    def _chain(self, head: int) -> Chain:
        """The validated chain at ``head``; a malformed one comes back with ``error`` set."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        try:
            self._walk(head, readable, writable)
        except ChainError as e:
            return Chain(head, readable, writable, str(e))
        return Chain(head, readable, writable)

    def pop(self) -> Chain | None:
        """Take the next available chain, or None when the ring is empty."""
        if self.broken:
            raise RingError(self.broken)
        last = self.last_avail_idx
        if last == self._avail_seen and not self.pending():  # re-read avail->idx only when
            return None  # what we saw is used up
        slot = last % self.num
        head = _unpack16(self.avail, 4 + 2 * slot)[0]
        if head >= self.num:
            self._break(f"avail ring names head {head}, outside the queue of {self.num}")
        in_flight = self.in_flight
        if in_flight[head]:
            self._break(f"avail ring names head {head}, which is still in flight")
        in_flight[head] = 1
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return self._chain(head)

    def peek(self) -> Chain | None:
        """Walk the next available chain without taking it (its memory gets mapped), or
        None when the ring is empty or the head is out of range (``pop`` says why)."""
        if self.broken:
            raise RingError(self.broken)
        if self.last_avail_idx == self._avail_seen and not self.pending():
            return None
        head = self.head_at(self.last_avail_idx)
        return None if head >= self.num else self._chain(head)

    def _walk(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> None:
        memory, desc, num = self.memory, self.desc, self.num
        i = head
        count = 0
        wsum = 0  # bytes of device-writable buffers
        while True:
            count += 1
            if count > num:
                raise ChainError("descriptor chain is longer than the queue (or loops)")
            addr, length, flags, nxt = _unpack_desc(desc, i * DESC_SIZE)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
                if flags & VRING_DESC_F_NEXT:
                    raise ChainError("indirect descriptor with NEXT set")
                table = indirect_table(memory, addr, length, num)
                walk_indirect(memory, table, readable, writable, num - count + 1, wsum)
                return
            add_buffer(memory, addr, length, flags, readable, writable)
            if flags & VRING_DESC_F_WRITE:
                wsum += length
            if not flags & VRING_DESC_F_NEXT:
                check_writable_total(wsum)
                return
            if nxt >= num:
                raise ChainError(f"next {nxt} is outside the queue of {num}")
            i = nxt

    # -- used side ----------------------------------------------------------------------

    def push(self, head: int, written: int, ndesc: int = 1) -> None:
        """Record a completion (not yet visible to the driver: see ``publish``).

        ``ndesc`` (the ring slots the chain used) matters to packed rings only.
        """
        self.in_flight[head] = 0
        _pack_used(self.used, 4 + 8 * (self.used_idx % self.num), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed completions visible; True if the driver asked to be interrupted."""
        new = self.used_idx
        self._used16[1] = new
        old = self._signalled_used
        if new == old:
            return False
        self._signalled_used = new
        if self.event_idx:
            full_fence()
            return need_event(_unpack16(self.avail, self._used_event_off)[0], new, old)
        return not _unpack16(self.avail, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT

    # -- kick suppression ---------------------------------------------------------------

    def disable_kicks(self) -> None:
        """Ask the driver not to kick while we are busy (best effort, per the spec)."""
        if not self.event_idx:
            self._used16[0] = VRING_USED_F_NO_NOTIFY

    def ask_for_kick(self) -> None:
        """Ask the driver to kick at its next addition, whatever is pending now (a worker
        whose budget is spent waits for that kick before it serves on)."""
        if self.event_idx:
            self._used16[self._avail_event_off >> 1] = _unpack16(self.avail, 2)[0]
        else:
            self._used16[0] = 0
        full_fence()

    def enable_kicks(self) -> bool:
        """Ask for a kick on new work; True if work is already there (process it now)."""
        if self.event_idx:
            self._used16[self._avail_event_off >> 1] = self.last_avail_idx
        else:
            self._used16[0] = 0
        full_fence()
        return self.pending() > 0

    def _break(self, why: str) -> None:
        self.broken = why
        raise RingError(why)
