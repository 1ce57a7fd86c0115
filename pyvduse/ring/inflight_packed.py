"""The in-flight log of a packed ring: what a restarted daemon needs to lose and repeat nothing.

A packed ring has no avail index to read the driver's requests again from, and the device
overwrites ring slots with used elements, in completion order, while other requests are still
in flight. So the log keeps its own copy of every request taken and not yet completed, by
buffer id, in a file-backed mapping that survives the process:

- three positions (index and wrap counter): ``avail``, where the next chain will be taken;
  ``used``, the used position as of the last finished ``publish``; ``intent``, the used
  position a ``publish`` in progress will reach;
- per buffer id an entry: state (free, in flight, completed but not yet published), the
  chain's first slot and wrap counter, how many slots it took, where its descriptors are
  copied, and the sequence number at which it was taken (so requests are repeated in order);
- a pool of descriptor copies (one per ring slot: a driver never has more descriptors
  outstanding than the ring holds), linked per chain.

Every step is logged before the driver can see it, with single stores (``stores``), so a
kill at any instant leaves one of these cases, each resolved by ``recovered``:

- taken, ``avail`` not yet logged: the entry is in flight and starts at ``avail``: skip it;
- completed (used element written) but not published: ``used == intent``, or the batch's
  first used slot still shows the driver's "available" pattern (a publish writes the batch's
  first slot last): the batch is not visible; any flags a partial publish wrote after that
  slot are put back, and its requests are repeated;
- published, the log not yet cleared: the batch is visible: ``used`` moves to ``intent`` and
  its entries are freed.

The requests left in flight are rebuilt from their copies, in the order they were taken.
"""

from __future__ import annotations

import struct

from pyvduse.abi.virtio import DESC_SIZE
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.packed import PackedQueue
from pyvduse.ring.packed_layout import AVAIL_PATTERN, F_AVAIL_USED
from pyvduse.ring.queue import WrappedQueue
from pyvduse.ring.stores import words16, words32, words64

# avail idx, avail wrap, used idx, used wrap, intent idx, intent wrap, num
_HEADER = struct.Struct("<HBxHBxHBxI")
_POS = struct.Struct("<HBx")  # as one little-endian u32: idx | wrap << 16
_AVAIL_OFF, _USED_OFF, _INTENT_OFF, _NUM_OFF = 0, 4, 8, 12
# Per buffer id: u8 state, u8 wrap, u16 first slot, u16 slots, u16 first copy | u64 seq.
# The first eight bytes are one u64 store: an entry appears (or changes) all at once.
_ENTRY = struct.Struct("<BBHHHQ")
FREE, IN_FLIGHT, COMPLETED = 0, 1, 2
_FLAGS_OFF = 14  # of a descriptor


def packed_log_size(num: int) -> int:
    """Bytes one packed queue's log takes: header, entries, descriptor copies, their links."""
    return _HEADER.size + (_ENTRY.size + DESC_SIZE + 2) * num


def _advance(idx: int, wrap: int, n: int, num: int) -> tuple[int, int]:
    idx += n
    while idx >= num:
        idx -= num
        wrap ^= 1
    return idx, wrap


class PackedInflightLog:
    """One packed queue's log over a memoryview (a slice of the mmapped state file)."""

    def __init__(self, mem: memoryview, num: int) -> None:
        if len(mem) < packed_log_size(num):
            raise ValueError("log region too small")
        self.mem = mem
        self.num = num
        entries = _HEADER.size
        copies = entries + _ENTRY.size * num
        links = copies + DESC_SIZE * num
        self._entries = entries
        self.copies = mem[copies : copies + DESC_SIZE * num]
        # each position, and num, is one u32 store: a kill never leaves half of one
        self._w32 = words32(mem[: _HEADER.size])
        self._e64 = words64(mem[entries : entries + _ENTRY.size * num])
        self._links = words16(mem[links : links + 2 * num])
        self._free: list[int] = []  # descriptor copies not in use (rebuilt after a restart)

    def reset(self, idx: int, wrap: int) -> None:
        """A fresh ring at ``(idx, wrap)``: nothing taken, nothing in flight."""
        self.mem[: packed_log_size(self.num)] = bytes(packed_log_size(self.num))
        for offset in (_AVAIL_OFF, _USED_OFF, _INTENT_OFF):
            self.set_position(offset, idx, wrap)
        self._free = list(range(self.num - 1, -1, -1))
        self._w32[_NUM_OFF >> 2] = self.num  # last: until then the log reads as no log

    def position(self, offset: int) -> tuple[int, int]:
        idx, wrap = _POS.unpack_from(self.mem, offset)
        return int(idx), int(wrap)

    def set_position(self, offset: int, idx: int, wrap: int) -> None:
        self._w32[offset >> 2] = idx | (wrap & 1) << 16

    def stored_num(self) -> int:
        return int(_HEADER.unpack_from(self.mem, 0)[6])

    def entry(self, buf_id: int) -> tuple[int, int, int, int, int, int]:
        """(state, wrap, first slot, slots, first copy, seq) of ``buf_id``."""
        state, wrap, start, ndesc, first, seq = _ENTRY.unpack_from(
            self.mem, self._entries + _ENTRY.size * buf_id
        )
        return int(state), int(wrap), int(start), int(ndesc), int(first), int(seq)

    def set_state(self, buf_id: int, state: int) -> None:
        self.mem[self._entries + _ENTRY.size * buf_id] = state

    # -- the hot path ------------------------------------------------------------------------

    def taken(self, buf_id: int, desc: memoryview, start: int, wrap: int, ndesc: int, seq: int) -> None:
        """Copy a taken chain's ``ndesc`` slots from ``start`` and mark it in flight."""
        free = self._free
        if ndesc > len(free):
            raise RingError(f"more descriptors in flight than the queue of {self.num} holds")
        copies, links, num = self.copies, self._links, self.num
        first = prev = -1
        for k in range(ndesc):
            c = free.pop()
            slot = (start + k) % num
            copies[c * DESC_SIZE : (c + 1) * DESC_SIZE] = desc[slot * DESC_SIZE : (slot + 1) * DESC_SIZE]
            if prev < 0:
                first = c
            else:
                links[prev] = c
            prev = c
        e = 2 * buf_id
        self._e64[e + 1] = seq  # the order key, then the entry that uses it, in one store
        self._e64[e] = IN_FLIGHT | wrap << 8 | start << 16 | ndesc << 32 | first << 48

    def release(self, buf_id: int) -> None:
        """``buf_id``'s completion is visible to the driver: forget it."""
        state, _, _, ndesc, first, _ = self.entry(buf_id)
        self.set_state(buf_id, FREE)
        if state != FREE:
            self._free.extend(self._chain_copies(first, ndesc))

    def _chain_copies(self, first: int, ndesc: int) -> list[int]:
        out, c = [], first
        for _ in range(ndesc):
            if not 0 <= c < self.num:
                raise RingError("the packed in-flight log links outside its copies")
            out.append(c)
            c = int(self._links[c])
        return out

    def chain_slots(self, buf_id: int) -> list[bytes]:
        """The descriptors ``buf_id``'s chain had when it was taken."""
        _, _, _, ndesc, first, _ = self.entry(buf_id)
        return [
            bytes(self.copies[c * DESC_SIZE : (c + 1) * DESC_SIZE]) for c in self._chain_copies(first, ndesc)
        ]

    def rebuild_free(self) -> None:
        """After a restart: every copy not held by a live entry is free."""
        held: set[int] = set()
        for b in range(self.num):
            state, _, _, ndesc, first, _ = self.entry(b)
            if state != FREE:
                held.update(self._chain_copies(first, ndesc))
        self._free = [c for c in range(self.num - 1, -1, -1) if c not in held]


class LoggedPackedQueue(WrappedQueue[PackedQueue]):
    """A PackedQueue whose every step is logged first; same interface as the queue itself."""

    def __init__(self, queue: PackedQueue, log: PackedInflightLog, seq: int = 0) -> None:
        super().__init__(queue)
        self.log = log
        self._seq = seq
        self._batch: list[int] = []

    @classmethod
    def fresh(cls, queue: PackedQueue, log: PackedInflightLog) -> LoggedPackedQueue:
        log.reset(queue.last_avail_idx, queue.avail_wrap)
        return cls(queue, log)

    @classmethod
    def recovered(cls, queue: PackedQueue, log: PackedInflightLog) -> LoggedPackedQueue:
        """Rebuild from the log after a restart; ``resubmit`` holds the chains to repeat."""
        q, num = queue, queue.num
        if log.stored_num() != num:  # no usable log: nothing is known to be in flight
            return cls.fresh(q, log)
        used, intent = log.position(_USED_OFF), log.position(_INTENT_OFF)
        visible = False
        if used != intent:
            flags = struct.unpack_from("<H", q.desc, used[0] * DESC_SIZE + _FLAGS_OFF)[0]
            visible = flags & F_AVAIL_USED != AVAIL_PATTERN[used[1]]
            if not visible:
                _scrub(q, used, intent)
        entries = [(b, *log.entry(b)) for b in range(num)]
        redo: list[tuple[int, int]] = []
        for b, state, _wrap, _start, _ndesc, _first, seq in entries:
            if state == COMPLETED and visible:
                log.set_state(b, FREE)
            elif state in (IN_FLIGHT, COMPLETED):
                log.set_state(b, IN_FLIGHT)
                redo.append((seq, b))
        if visible:
            used = intent
        log.set_position(_USED_OFF, *used)
        log.set_position(_INTENT_OFF, *used)
        redo.sort()
        avail = log.position(_AVAIL_OFF)
        for _, b in redo:  # taken, then killed before ``avail`` moved past it
            _, wrap, start, ndesc, _, _ = log.entry(b)
            if (start, wrap) == avail:
                avail = _advance(start, wrap, ndesc, num)
                log.set_position(_AVAIL_OFF, *avail)
                break
        log.rebuild_free()
        chains = [_rebuild(q, log, b) for _, b in redo]
        q.last_avail_idx, q.avail_wrap = avail
        q.used_idx, q.used_wrap = used
        q.reset_signalled()
        lq = cls(q, log, max((s for s, _ in redo), default=0))
        lq.resubmit = chains
        return lq

    def state(self) -> tuple[int, int, int, int]:
        return self.queue.state()

    # -- the steps that are logged -------------------------------------------------------------

    def pop(self) -> Chain | None:
        q = self.queue
        start, wrap = q.last_avail_idx, q.avail_wrap
        chain = q.pop()
        if chain is not None:
            self._seq += 1
            self.log.taken(chain.head, q.desc, start, wrap, chain.ndesc, self._seq)
            self.log.set_position(_AVAIL_OFF, q.last_avail_idx, q.avail_wrap)
        return chain

    def push(self, head: int, written: int, ndesc: int = 1) -> None:
        self.log.set_state(head, COMPLETED)
        self._batch.append(head)
        self.queue.push(head, written, ndesc)

    def publish(self) -> bool:
        q = self.queue
        target = (q.used_idx, q.used_wrap)
        self.log.set_position(_INTENT_OFF, *target)
        notify = q.publish()
        for b in self._batch:
            self.log.release(b)
        self._batch = []
        self.log.set_position(_USED_OFF, *target)
        return notify


def _scrub(q: PackedQueue, used: tuple[int, int], intent: tuple[int, int]) -> None:
    """Put back the driver's "available" flags on slots ``[used, intent)`` that a publish
    cut short may have marked used: the driver saw none of them (the first is unchanged),
    and none may be seen as completed before the requests are repeated."""
    num = q.num
    idx, wrap = used
    for _ in range(num):
        if (idx, wrap) == intent:
            return
        off = idx * DESC_SIZE + _FLAGS_OFF
        flags = struct.unpack_from("<H", q.desc, off)[0]
        struct.pack_into("<H", q.desc, off, flags & ~F_AVAIL_USED | AVAIL_PATTERN[wrap])
        idx, wrap = _advance(idx, wrap, 1, num)


def _rebuild(q: PackedQueue, log: PackedInflightLog, buf_id: int) -> Chain:
    """Walk ``buf_id``'s chain again from its copies, placed at the slots it was taken from
    in a scratch ring (so wrap counters and NEXT flags read as they did)."""
    _, wrap, start, _, _, _ = log.entry(buf_id)
    scratch = bytearray(DESC_SIZE * q.num)
    for k, desc in enumerate(log.chain_slots(buf_id)):
        slot = (start + k) % q.num
        scratch[slot * DESC_SIZE : (slot + 1) * DESC_SIZE] = desc
    live, position = q.desc, (q.last_avail_idx, q.avail_wrap)
    q.desc = memoryview(scratch)
    q.last_avail_idx, q.avail_wrap = start, wrap
    try:
        chain = q.pop()
    finally:
        q.desc = live
        q.last_avail_idx, q.avail_wrap = position
    if chain is None or chain.head != buf_id:
        raise RingError(f"buffer id {buf_id}'s logged chain cannot be walked again")
    return chain
