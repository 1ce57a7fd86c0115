"""The driver side of a split virtqueue, for feeding the device engine in tests.

It lays out the three ring areas in an ``Arena``, turns (readable bytes, writable lengths)
into descriptor chains, direct or indirect, publishes them, and collects completions. Raw
setters let hostile tests write any descriptor or avail entry they like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pyvduse.abi.virtio import (
    DESC_SIZE,
    LE16,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    avail_ring_size,
    need_event,
    used_ring_size,
)
from pyvduse.ring.split import full_fence


class DmaSpace(Protocol):
    """Driver memory: streaming allocations for buffers, coherent ones for rings."""

    def alloc(self, size: int, align: int = 16) -> int: ...
    def alloc_coherent(self, size: int, align: int = 16) -> int: ...
    def free(self, iova: int) -> None: ...
    def write(self, iova: int, data: bytes) -> None: ...
    def read(self, iova: int, length: int) -> bytes: ...


@dataclass
class Completion:
    """A used element together with the writable buffers of its request."""

    head: int
    length: int
    writable: list[tuple[int, int]]  # (iova, len) of each writable buffer
    token: object = None
    data: bytes = b""  # the writable buffers' contents, read at collection


class DriverSplitRing:
    """A split ring of ``num`` entries owned by a test 'driver'."""

    def __init__(self, arena: DmaSpace, num: int, event_idx: bool = True) -> None:
        self.arena = arena
        self.num = num
        self.event_idx = event_idx
        # One coherent allocation laid out like vring_init(): desc, avail, then used aligned.
        avail_off = DESC_SIZE * num
        used_off = -(-(avail_off + avail_ring_size(num, True)) // 4096) * 4096
        size = used_off + used_ring_size(num, True)
        base = arena.alloc_coherent(size, 4096)
        arena.write(base, bytes(size))  # zeroed, as dma_alloc_coherent's memory is
        self.desc_addr = base
        self.avail_addr = base + avail_off
        self.used_addr = base + used_off
        self.free = list(range(num))
        self.avail_idx = 0
        self._kicked_idx = 0
        self.last_used = 0
        self.pending: dict[int, tuple[list[int], list[tuple[int, int]], object, list[int]]] = {}

    # -- raw access ---------------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.arena.write(self.desc_addr + DESC_SIZE * i, VRING_DESC.pack(addr, length, flags, nxt))

    def set_avail_entry(self, slot: int, head: int) -> None:
        self.arena.write(self.avail_addr + 4 + 2 * (slot % self.num), LE16.pack(head))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.arena.write(self.avail_addr + 2, LE16.pack(self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.arena.write(self.avail_addr, LE16.pack(flags))

    def set_used_event(self, idx: int) -> None:
        self.arena.write(self.avail_addr + 4 + 2 * self.num, LE16.pack(idx & 0xFFFF))

    def suppress_interrupts(self, on: bool = True) -> None:
        self.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT if on else 0)

    def arm_interrupt(self) -> None:
        """Before waiting: ask for an interrupt at the next completion, as Linux's
        ``virtqueue_get_buf`` does with EVENT_IDX (used_event = the next used index we
        have not seen); without EVENT_IDX the flags already ask for every one."""
        if self.event_idx:
            self.set_used_event(self.last_used)
            full_fence()  # the write before the re-check of the used index

    def used_idx(self) -> int:
        return int(LE16.unpack(self.arena.read(self.used_addr + 2, 2))[0])

    def avail_event(self) -> int:
        return int(LE16.unpack(self.arena.read(self.used_addr + 4 + 8 * self.num, 2))[0])

    def used_flags(self) -> int:
        return int(LE16.unpack(self.arena.read(self.used_addr, 2))[0])

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
        """Queue one request: buffers holding ``readable``, then buffers of ``writable`` sizes."""
        bufs: list[tuple[int, int, int]] = []
        allocs: list[int] = []
        for data in readable:
            iova = self.arena.alloc(max(len(data), 1))
            allocs.append(iova)
            self.arena.write(iova, data)
            bufs.append((iova, len(data), 0))
        wbufs: list[tuple[int, int]] = []
        for n in writable:
            iova = self.arena.alloc(max(n, 1))
            allocs.append(iova)
            bufs.append((iova, n, VRING_DESC_F_WRITE))
            wbufs.append((iova, n))
        if indirect:
            table = self.arena.alloc(DESC_SIZE * len(bufs), 16)
            allocs.append(table)
            for k, (iova, n, f) in enumerate(bufs):
                f |= VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self.arena.write(table + DESC_SIZE * k, VRING_DESC.pack(iova, n, f, k + 1))
            head = self.free.pop()
            self.write_desc(head, table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0)
            ids = [head]
        else:
            if len(bufs) > len(self.free):
                raise RuntimeError("ring full")
            ids = [self.free.pop() for _ in bufs]
            for k, (iova, n, f) in enumerate(bufs):
                last = k + 1 == len(bufs)
                self.write_desc(
                    ids[k], iova, n, f | (0 if last else VRING_DESC_F_NEXT), 0 if last else ids[k + 1]
                )
            head = ids[0]
        self.pending[head] = (ids, wbufs, token, allocs)
        self.set_avail_entry(self.avail_idx, head)
        if publish:
            self.set_avail_idx(self.avail_idx + 1)
        else:
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        self.set_avail_idx(self.avail_idx)

    def collect(self) -> list[Completion]:
        """Completions the device has published since the last call."""
        out = []
        used = self.used_idx()
        while self.last_used != used:
            slot = self.last_used % self.num
            head, length = VRING_USED_ELEM.unpack(self.arena.read(self.used_addr + 4 + 8 * slot, 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            ids, wbufs, token, allocs = self.pending.pop(head)
            self.free.extend(ids)
            c = Completion(head, length, wbufs, token)
            c.data = self.read_writable(c)
            for iova in allocs:
                self.arena.free(iova)
            out.append(c)
        return out

    def kick_needed(self) -> bool:
        """After publishing: does the device want a kick for what was added since the last?"""
        old, new = self._kicked_idx, self.avail_idx
        self._kicked_idx = new
        full_fence()
        if self.event_idx:
            return need_event(self.avail_event(), new, old)
        return not self.used_flags() & 1

    def in_flight(self) -> int:
        """Requests made available and not yet collected."""
        return len(self.pending)

    def read_writable(self, c: Completion) -> bytes:
        return b"".join(self.arena.read(iova, n) for iova, n in c.writable)
