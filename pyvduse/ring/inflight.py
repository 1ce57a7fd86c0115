"""The in-flight log: what a restarted daemon needs to lose and repeat no request.

The kernel keeps no ring state for a VDUSE daemon: which chains were taken from the avail ring
and not yet completed is known only to the daemon. This log, kept in shared memory backed by a
file (it survives the process), records per queue:

- ``last_avail``: the next avail index to take;
- per descriptor head: a state (free, in flight, completed but not yet published) and the
  sequence number at which it was taken, so in-flight requests are resubmitted in order;
- ``base``: the used index the ring had before the current, unpublished batch.

Every step writes the log before the ring changes in a way the driver can see, so a kill at
any point leaves one of these cases, each resolved by ``recover``:

- taken but the avail index not yet logged: the head is in flight *and* still at
  ``avail[last_avail]``: skip it in the avail ring (an in-flight head cannot be offered again);
- completed (used element written) but the used index not published: the ring's used index still
  equals ``base``: the request is repeated, its used element rewritten;
- published but the log not yet cleared: the ring's used index moved past ``base``: the batch
  is done, its heads are freed.
"""

from __future__ import annotations

import struct

from pyvduse.ring.chain import Chain
from pyvduse.ring.queue import WrappedQueue
from pyvduse.ring.split import SplitQueue
from pyvduse.ring.stores import words16, words32, words64

# Queue header: u16 last_avail, u16 base, u32 num, u64 sequence.
_HEADER = struct.Struct("<HHIQ")
# One entry per head: u8 state, 7 pad, u64 sequence.
_ENTRY = struct.Struct("<B7xQ")
FREE, IN_FLIGHT, COMPLETED = 0, 1, 2
# Word indices of the header fields; every field is written with one store (``stores``), so
# a kill between two stores leaves old and new fields, never a half-written or zeroed one.
_LAST_AVAIL16, _BASE16, _NUM32, _SEQ64 = 0, 1, 1, 1


def log_size(num: int) -> int:
    """Bytes one queue's log takes."""
    return _HEADER.size + _ENTRY.size * num


class InflightLog:
    """One queue's log over a memoryview (normally a slice of an mmapped state file)."""

    def __init__(self, mem: memoryview, num: int) -> None:
        if len(mem) < log_size(num):
            raise ValueError("log region too small")
        self.mem = mem
        self.num = num
        size = log_size(num)
        self._w16, self._w32, self._w64 = (words16(mem[:size]), words32(mem[:size]), words64(mem[:size]))
        _, _, stored_num, self.seq = _HEADER.unpack_from(mem, 0)
        if stored_num != num:
            self.clear()

    def clear(self) -> None:
        self.mem[: log_size(self.num)] = bytes(log_size(self.num))
        self._w32[_NUM32] = self.num  # last: until then the log reads as no log at all
        self.seq = 0

    def set_positions(self, last_avail: int, base: int) -> None:
        self._w16[_BASE16] = base
        self._w16[_LAST_AVAIL16] = last_avail

    @property
    def last_avail(self) -> int:
        return int(self._w16[_LAST_AVAIL16])

    @property
    def base(self) -> int:
        return int(self._w16[_BASE16])

    def state(self, head: int) -> tuple[int, int]:
        st, seq = _ENTRY.unpack_from(self.mem, _HEADER.size + _ENTRY.size * head)
        return int(st), int(seq)

    # -- the hot path: a few stores per request -----------------------------------------------

    def taken(self, head: int, next_avail: int) -> None:
        self.seq += 1
        entry = _HEADER.size + _ENTRY.size * head
        self._w64[(entry >> 3) + 1] = self.seq  # the order key, then the state that uses it
        self.mem[entry] = IN_FLIGHT
        self._w64[_SEQ64] = self.seq
        self._w16[_LAST_AVAIL16] = next_avail

    def batch_start(self, used_idx: int) -> None:
        self._w16[_BASE16] = used_idx

    def completed(self, head: int) -> None:
        self.mem[_HEADER.size + _ENTRY.size * head] = COMPLETED

    def published(self, heads: list[int]) -> None:
        for h in heads:
            self.mem[_HEADER.size + _ENTRY.size * h] = FREE

    # -- after a restart ------------------------------------------------------------------------

    def recover(self, ring_used_idx: int, avail_head: object) -> tuple[int, list[int]]:
        """Resolve a crash: (next avail index to take, heads to resubmit in order).

        ``avail_head(i)`` returns the head the avail ring holds at index ``i``, or None when
        the driver has not made index ``i`` available.
        """
        batch_published = ring_used_idx != self.base
        redo: list[tuple[int, int]] = []
        for h in range(self.num):
            st, seq = self.state(h)
            if st == COMPLETED and batch_published:
                self.mem[_HEADER.size + _ENTRY.size * h] = FREE
            elif st in (IN_FLIGHT, COMPLETED):
                self.mem[_HEADER.size + _ENTRY.size * h] = IN_FLIGHT
                redo.append((seq, h))
        redo.sort()
        heads = [h for _, h in redo]
        last_avail = self.last_avail
        pending = set(heads)
        for _ in range(self.num):  # at most one can be the untaken-looking duplicate
            h = avail_head(last_avail)  # type: ignore[operator]
            if h is None or h not in pending:
                break
            last_avail = (last_avail + 1) & 0xFFFF
            pending.discard(h)
        self.set_positions(last_avail, ring_used_idx)
        return last_avail, heads


class LoggedQueue(WrappedQueue[SplitQueue]):
    """A SplitQueue whose every step is logged first; same interface as the queue itself."""

    def __init__(self, queue: SplitQueue, log: InflightLog) -> None:
        super().__init__(queue)
        self.log = log
        self._batch: list[int] = []

    @classmethod
    def fresh(cls, queue: SplitQueue, log: InflightLog) -> LoggedQueue:
        log.clear()
        log.set_positions(queue.last_avail_idx, queue.used_idx)
        return cls(queue, log)

    @classmethod
    def recovered(cls, queue: SplitQueue, log: InflightLog) -> LoggedQueue:
        """Rebuild from the log after a restart; ``resubmit`` holds the chains to repeat."""
        q = queue

        def avail_head(i: int) -> int | None:
            if (q.avail_idx() - i) & 0xFFFF == 0 or (q.avail_idx() - i) & 0xFFFF > q.num:
                return None
            return q.head_at(i)

        last_avail, heads = log.recover(q.used_idx, avail_head)
        q.resume_at(last_avail)
        lq = cls(q, log)
        lq.resubmit = [q.chain_at(h) for h in heads]
        return lq

    # -- the steps that are logged -------------------------------------------------------------

    def pop(self) -> Chain | None:
        chain = self.queue.pop()
        if chain is not None:
            self.log.taken(chain.head, self.queue.last_avail_idx)
        return chain

    def push(self, head: int, written: int, ndesc: int = 1) -> None:
        if not self._batch:
            self.log.batch_start(self.queue.used_idx)
        self.log.completed(head)
        self._batch.append(head)
        self.queue.push(head, written, ndesc)

    def publish(self) -> bool:
        notify = self.queue.publish()
        if self._batch:
            self.log.published(self._batch)
            self._batch = []
        return notify
