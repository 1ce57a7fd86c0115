"""Turn arbitrary bytes into a hostile virtqueue and check the device survives it.

``run_case(data)`` reads ring geometry, descriptors, indirect tables, avail entries and request
headers from ``data``, runs a virtio-blk device over the ring until it is empty or stopped, and
checks the properties every ring must keep:

- nothing escapes but ``RingError`` (and then the queue is marked broken);
- the work is bounded: never more chains than the ring holds;
- no byte changes outside the used ring and the buffers descriptors mark device-writable
  (guard patterns fill the rest of memory).

The same function serves the hypothesis property test, the timed random fuzzer
(``fuzz/fuzz_rings.py``) and the coverage-guided atheris harness.
"""

from __future__ import annotations

import struct

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_WRITE,
    bit,
    used_ring_size,
)
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.errors import RingError
from pyvduse.ring.split import SplitQueue

ARENA = 1 << 16
GUARD = 0xA5
_BACKEND = MemoryBackend(1 << 20)


class Reader:
    """Reads integers from fuzz input; past the end everything is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def address(self, data_start: int) -> int:
        """Mostly addresses inside memory, sometimes at its edges or far outside."""
        kind, raw = self.u8() & 7, self.u32()
        if kind < 5:
            return data_start + raw % (ARENA - data_start)
        if kind == 5:
            return ARENA - 64 + raw % 128
        if kind == 6:
            return raw % ARENA  # anywhere, the ring itself included
        return (1 << 64) - 1 - raw % 4096 if raw & 1 else raw << 20

    def length(self) -> int:
        kind, raw = self.u8() & 3, self.u32()
        if kind < 2:
            return raw % 600
        return (16, 512, 4096, raw)[raw % 4] if kind == 2 else raw % 70000


def allowed_writes(arena: Arena, drv: DriverSplitRing, num: int) -> bytearray:
    """Bytes the device may change: the used ring and every buffer a descriptor (in the
    table or an indirect table it names) marks device-writable."""
    ok = bytearray(len(arena.buf))
    size = used_ring_size(num)
    ok[drv.used_addr : drv.used_addr + size] = b"\1" * size

    def allow(addr: int, length: int) -> None:
        lo, hi = max(addr, 0), min(addr + length, len(ok))
        if lo < hi:
            ok[lo:hi] = b"\1" * (hi - lo)

    def scan(table: int, count: int, nested: bool) -> None:
        for i in range(min(count, len(ok) // DESC_SIZE)):
            a = table + i * DESC_SIZE
            if not 0 <= a <= len(ok) - DESC_SIZE:
                return
            addr, length, f, _ = VRING_DESC.unpack(arena.read(a, DESC_SIZE))
            if f & VRING_DESC_F_INDIRECT and not nested:
                scan(addr, length // DESC_SIZE, True)
            elif f & VRING_DESC_F_WRITE:
                allow(addr, length)

    scan(drv.desc_addr, num, False)
    return ok


def run_case(data: bytes) -> int:
    """Run one case; returns the number of chains served. AssertionError on a violation."""
    r = Reader(data)
    num = 1 << (r.u8() % 5 + 1)  # 2..32
    features = r.u8()
    feats = (bit(F_RING_INDIRECT_DESC) if features & 1 else 0) | (
        bit(F_RING_EVENT_IDX) if features & 2 else 0)
    arena = Arena(ARENA)
    drv = DriverSplitRing(arena, num)
    data_start = arena.alloc(0, 4096)
    arena.buf[data_start:] = bytes([GUARD]) * (ARENA - data_start)
    hdr = vb.OUTHDR.pack((0, 1, 4, 8, 11, 13, 14, 99)[r.u8() & 7], 0, r.u32() % 4096)
    for a in range(data_start, ARENA - 16, 2048):
        arena.write(a, hdr)
    for i in range(num):
        drv.write_desc(i, r.address(data_start), r.length(), r.u8() & 7, r.u8() % (num + 2))
    for _ in range(r.u8() % 4):  # indirect tables somewhere in data memory
        table = r.address(data_start) & ~15
        for k in range(r.u8() % 6 + 1):
            a = table + k * DESC_SIZE
            if data_start <= a <= ARENA - DESC_SIZE:
                arena.write(a, VRING_DESC.pack(r.address(data_start), r.length(), r.u8() & 7,
                                               r.u8() % 8))
    for slot in range(num):
        drv.set_avail_entry(slot, r.u8() % (num + 2))
    jump = r.u8()
    drv.set_avail_idx(jump % (num + 1) if jump < 200 else r.u16())
    drv.set_used_event(r.u16())
    allowed = allowed_writes(arena, drv, num)
    before = bytes(arena.buf)

    q = SplitQueue(arena.memory, num, drv.desc_addr, drv.avail_addr, drv.used_addr, feats)
    dev = BlkDevice(_BACKEND)
    served = 0
    try:
        while True:
            chain = q.pop()
            if chain is None:
                break
            served += 1
            assert served <= num, "more chains than the ring holds"
            q.push(chain.head, dev.handle(0, chain), chain.ndesc)
        q.publish()
        q.enable_kicks()
    except RingError:
        assert q.broken, "RingError without marking the queue broken"
    after = arena.buf
    if before != after:
        for i in range(ARENA):
            if before[i] != after[i] and not allowed[i]:
                raise AssertionError(f"wrote outside the driver's writable buffers at 0x{i:x}")
    return served
