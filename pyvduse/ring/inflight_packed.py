"""The in-flight log of a packed ring: what a restarted daemon needs to lose and repeat nothing.

A packed ring has no avail index to read the driver's requests again from: the device
overwrites a chain's first descriptor with its used element (``push`` writes len and id at
once, ``publish`` the flags). So the log keeps, per queue, a *shadow* of the descriptor ring
(each chain's slots copied when it is taken) and three positions (index and wrap counter):

- ``avail``: where the next chain will be taken (logged after the chain's slots are shadowed);
- ``used``: the used position as of the last finished ``publish``;
- ``intent``: the used position a ``publish`` in progress will reach.

pyvduse's workers complete requests in the order they take them, so after a kill every chain
between ``used`` and ``avail`` was taken and not yet seen completed by the driver. A publish
writes the batch's first descriptor last, so the batch is visible iff the slot at ``used`` no
longer shows the driver's "available" pattern for that wrap; if it is, ``used`` moves to
``intent``. The chains left are walked again from the shadow, in order, and repeated.
A kill between taking a chain and logging ``avail`` is harmless: that slot is still the
driver's untouched available descriptor, taken again like a new one.
"""

from __future__ import annotations

import struct

from pyvduse.abi.virtio import DESC_SIZE
from pyvduse.ring.chain import Chain
from pyvduse.ring.packed import PackedQueue
from pyvduse.ring.packed_layout import AVAIL_PATTERN, F_AVAIL_USED
from pyvduse.ring.queue import WrappedQueue
from pyvduse.ring.stores import words32

# avail idx, avail wrap, used idx, used wrap, intent idx, intent wrap, num
_HEADER = struct.Struct("<HBxHBxHBxI")
_POS = struct.Struct("<HBx")  # as one little-endian u32: idx | wrap << 16
_AVAIL_OFF, _USED_OFF, _INTENT_OFF, _NUM_OFF = 0, 4, 8, 12


def packed_log_size(num: int) -> int:
    """Bytes one packed queue's log takes (the same as a split queue's)."""
    return _HEADER.size + DESC_SIZE * num


class PackedInflightLog:
    """One packed queue's log over a memoryview (a slice of the mmapped state file)."""

    def __init__(self, mem: memoryview, num: int) -> None:
        if len(mem) < packed_log_size(num):
            raise ValueError("log region too small")
        self.mem = mem
        self.num = num
        self.shadow = mem[_HEADER.size : packed_log_size(num)]
        # each position, and num, is one u32 store: a kill never leaves half of one
        self._w32 = words32(mem[: _HEADER.size])

    def reset(self, idx: int, wrap: int) -> None:
        """A fresh ring at ``(idx, wrap)``: nothing taken, nothing in flight."""
        self.mem[: packed_log_size(self.num)] = bytes(packed_log_size(self.num))
        for offset in (_AVAIL_OFF, _USED_OFF, _INTENT_OFF):
            self.set_position(offset, idx, wrap)
        self._w32[_NUM_OFF >> 2] = self.num  # last: until then the log reads as no log

    def position(self, offset: int) -> tuple[int, int]:
        idx, wrap = _POS.unpack_from(self.mem, offset)
        return int(idx), int(wrap)

    def set_position(self, offset: int, idx: int, wrap: int) -> None:
        self._w32[offset >> 2] = idx | (wrap & 1) << 16

    def stored_num(self) -> int:
        return int(_HEADER.unpack_from(self.mem, 0)[6])


class LoggedPackedQueue(WrappedQueue[PackedQueue]):
    """A PackedQueue whose every step is logged first; same interface as the queue itself."""

    def __init__(self, queue: PackedQueue, log: PackedInflightLog) -> None:
        super().__init__(queue)
        self.log = log

    @classmethod
    def fresh(cls, queue: PackedQueue, log: PackedInflightLog) -> LoggedPackedQueue:
        log.reset(queue.last_avail_idx, queue.avail_wrap)
        return cls(queue, log)

    @classmethod
    def recovered(cls, queue: PackedQueue, log: PackedInflightLog) -> LoggedPackedQueue:
        """Rebuild from the log after a restart; ``resubmit`` holds the chains to repeat."""
        q = queue
        if log.stored_num() != q.num:  # no usable log: nothing is known to be in flight
            lq = cls.fresh(q, log)
            return lq
        used, intent = log.position(_USED_OFF), log.position(_INTENT_OFF)
        if used != intent:
            flags = struct.unpack_from("<H", q.desc, used[0] * DESC_SIZE + 14)[0]
            if flags & F_AVAIL_USED != AVAIL_PATTERN[used[1]]:  # the batch became visible
                used = intent
                log.set_position(_USED_OFF, *used)
        avail = log.position(_AVAIL_OFF)
        chains: list[Chain] = []
        live = q.desc
        q.desc = log.shadow  # walk the chains as they were when taken
        q.last_avail_idx, q.avail_wrap = used
        try:
            for _ in range(q.num):
                if (q.last_avail_idx, q.avail_wrap) == avail:
                    break
                chain = q.pop()
                if chain is None:
                    break
                chains.append(chain)
        finally:
            q.desc = live
        q.last_avail_idx, q.avail_wrap = avail
        q.used_idx, q.used_wrap = used
        q.reset_signalled()
        log.set_position(_INTENT_OFF, *used)
        lq = cls(q, log)
        lq.resubmit = chains
        return lq

    def state(self) -> tuple[int, int, int, int]:
        return self.queue.state()

    # -- the steps that are logged -------------------------------------------------------------

    def pop(self) -> Chain | None:
        q = self.queue
        start = q.last_avail_idx
        chain = q.pop()
        if chain is not None:
            shadow, desc, num = self.log.shadow, q.desc, q.num
            for k in range(chain.ndesc):
                off = ((start + k) % num) * DESC_SIZE
                shadow[off : off + DESC_SIZE] = desc[off : off + DESC_SIZE]
            self.log.set_position(_AVAIL_OFF, q.last_avail_idx, q.avail_wrap)
        return chain

    def publish(self) -> bool:
        q = self.queue
        target = (q.used_idx, q.used_wrap)
        self.log.set_position(_INTENT_OFF, *target)
        notify = q.publish()
        self.log.set_position(_USED_OFF, *target)
        return notify
