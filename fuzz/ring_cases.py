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

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    bit,
    used_ring_size,
)
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.fastpath import engine as native
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.errors import RingError
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.native_worker import run_native

ARENA = 1 << 16
GUARD = 0xA5


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


@dataclass
class SplitCase:
    """A hostile split ring laid out in an arena, before any device touched it."""

    arena: Arena
    drv: DriverSplitRing
    num: int
    features: int
    allowed: bytearray  # per byte: may the device write it
    before: bytes
    disk: bytes = b""  # the backend's contents after ``serve``


def _ring(r: Reader, num: int) -> tuple[Arena, DriverSplitRing, int, int]:
    """An arena with a ring of ``num`` at its start and guard bytes above: (arena, ring,
    features read from ``r``, where data memory starts)."""
    flags = r.u8()
    feats = (bit(F_RING_INDIRECT_DESC) if flags & 1 else 0) | (
        bit(F_RING_EVENT_IDX) if flags & 2 else 0)
    arena = Arena(ARENA)
    drv = DriverSplitRing(arena, num)
    data_start = arena.alloc(0, 4096)
    arena.buf[data_start:] = bytes([GUARD]) * (ARENA - data_start)
    return arena, drv, feats, data_start


def build_case(data: bytes) -> SplitCase:
    """Lay out the ring, tables and headers that ``data`` describes."""
    r = Reader(data)
    num = 1 << (r.u8() % 5 + 1)  # 2..32
    arena, drv, feats, data_start = _ring(r, num)
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
    return SplitCase(arena, drv, num, feats, allowed_writes(arena, drv, num), bytes(arena.buf))


REQUEST_TYPES = (0, 1, 4, 8, 11, 99, 0x80000000, 1 | 0x80000000)
DISK = 1 << 20


def build_request_case(data: bytes) -> SplitCase:
    """Well-formed virtio-blk requests (what real drivers send), then a few corruptions.

    Where ``build_case`` is mostly garbage, this exercises the paths that serve requests:
    any layout of header, data and status buffers, direct or indirect, reads of what earlier
    requests of the batch wrote, ranges at and past the capacity.
    """
    r = Reader(data)
    num = 1 << (r.u8() % 4 + 2)  # 4..32
    arena, drv, feats, data_start = _ring(r, num)
    free_desc = 0
    tables: list[tuple[int, int]] = []  # (address, entries) of indirect tables
    nreq = 0
    for _ in range(r.u8() % (num + 1)):
        rtype = REQUEST_TYPES[r.u8() % len(REQUEST_TYPES)]
        sector = r.u16() % (DISK // 512 + 16)
        bufs: list[tuple[int, int, int]] = []  # (addr, len, flags)
        try:
            hdr = arena.alloc(16, 1 + r.u8() % 16)
            arena.write(hdr, vb.OUTHDR.pack(rtype, 0, sector))
            split = r.u8() % 17
            if split:  # the header in two descriptors
                bufs += [(hdr, split, 0), (hdr + split, 16 - split, 0)] if split < 16 else [
                    (hdr, 16, 0)]
            else:
                bufs.append((hdr, 16, 0))
            write = 0 if rtype & 0xFF == 1 else VRING_DESC_F_WRITE
            for _ in range(r.u8() % 4):
                length = (512, 4096, 1, r.u16() % 3000)[r.u8() % 4]
                addr = arena.alloc(length, 1 + r.u8() % 512)
                if not write:
                    arena.write(addr, bytes((addr + k) & 0xFF for k in range(length)))
                bufs.append((addr, length, write))
            status = arena.alloc(1 + r.u8() % 2, 1)
            bufs.append((status, 1 if r.u8() & 3 else 2, VRING_DESC_F_WRITE))
        except MemoryError:
            break
        if feats & bit(F_RING_INDIRECT_DESC) and r.u8() & 1 and free_desc < num:
            try:
                table = arena.alloc(DESC_SIZE * len(bufs), 16)
            except MemoryError:
                break
            for k, (addr, length, f) in enumerate(bufs):
                last = k == len(bufs) - 1
                arena.write(table + DESC_SIZE * k, VRING_DESC.pack(
                    addr, length, f | (0 if last else VRING_DESC_F_NEXT), k + 1))
            tables.append((table, len(bufs)))
            drv.write_desc(free_desc, table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0)
            head, free_desc = free_desc, free_desc + 1
        elif free_desc + len(bufs) <= num:
            head = free_desc
            for k, (addr, length, f) in enumerate(bufs):
                last = k == len(bufs) - 1
                drv.write_desc(free_desc, addr, length,
                               f | (0 if last else VRING_DESC_F_NEXT), free_desc + 1)
                free_desc += 1
        else:
            break
        drv.set_avail_entry(nreq, head)
        nreq += 1
    drv.set_avail_idx(nreq)
    ring_fault = r.u8() % 16
    if ring_fault == 0:  # the avail index runs away
        drv.set_avail_idx(r.u16())
    elif ring_fault == 1 and nreq:  # a head outside the queue
        drv.set_avail_entry(r.u8() % nreq, num + r.u8() % 3)
    for _ in range(r.u8() % 4 if r.u8() & 1 else 0):  # corrupt a descriptor field
        where = r.u8()
        table, count = (drv.desc_addr, num) if not tables or where & 1 else tables[
            where % len(tables)]
        a = table + DESC_SIZE * (r.u8() % count)
        field_, value = r.u8() % 4, r.u32()
        addr, length, f, nxt = VRING_DESC.unpack(arena.read(a, DESC_SIZE))
        if field_ == 0:
            # Into data memory or far outside, never onto the rings: a buffer aliasing the
            # used ring reads bytes whose timing differs (legitimately) between engines.
            addr = (value << 20) if value & 1 else data_start + (addr ^ value) % (
                ARENA - data_start)
        elif field_ == 1:
            length = value if value & 1 else value % 8192
        elif field_ == 2:
            f = value & 7
        else:
            nxt = value % (num + 2)
        arena.write(a, VRING_DESC.pack(addr & ((1 << 64) - 1), length, f, nxt))
    drv.set_used_event(r.u16() % (nreq + 1))
    return SplitCase(arena, drv, num, feats, allowed_writes(arena, drv, num), bytes(arena.buf))


def serve(case: SplitCase, native_path: bool = False) -> tuple[int, bool]:
    """Serve the ring until it is empty or broken: (chains served, broken)."""
    a, d = case.arena, case.drv
    q = SplitQueue(a.memory, case.num, d.desc_addr, d.avail_addr, d.used_addr, case.features)
    backend = MemoryBackend(DISK)
    dev = BlkDevice(backend)
    served = 0

    def serve_one() -> bool:
        nonlocal served
        chain = q.pop()
        if chain is None:
            return False
        served += 1
        assert served <= case.num, "more chains than the ring holds"
        q.push(chain.head, dev.handle(0, chain), chain.ndesc)
        if native_path:
            q.publish()
        return True

    native_counts: list[int] = []
    try:
        if native_path:
            _serve_native(case, q, dev, serve_one, native_counts)
        else:  # as the Python worker does
            q.disable_kicks()
            while serve_one():
                pass
            q.publish()
            q.enable_kicks()
    except RingError:
        assert q.broken, "RingError without marking the queue broken"
        return served + sum(native_counts), True
    finally:
        case.disk = bytes(backend.buffer)
        backend.close()
    return served + sum(native_counts), False


def _serve_native(case: SplitCase, q: SplitQueue, dev: BlkDevice,
                  serve_one: Callable[[], bool], counts: list[int]) -> None:
    """The native loop with the Python engine for what it leaves; appends to ``counts``
    the chains the loop served (also when ``serve_one`` raises)."""
    engine = native.build(native.require_plan(dev), 0, q, case.arena.memory, None, None,
                          lambda i: None,
                          lambda *e: None)
    kick, stop = os.eventfd(0), os.eventfd(1)  # stopped from the start: run() drains, returns
    try:
        run_native(engine, q, None, case.arena.memory, kick, stop, serve_one, lambda: False)
    finally:
        os.close(kick)
        os.close(stop)
        counts.append(int(engine.counters()["completed"]))
        assert counts[-1] <= case.num, "more chains than the ring holds"


def check_writes(case: SplitCase) -> None:
    """No byte changed outside the used ring and the device-writable buffers."""
    after = case.arena.buf
    if case.before != after:
        for i in range(ARENA):
            if case.before[i] != after[i] and not case.allowed[i]:
                raise AssertionError(f"wrote outside the driver's writable buffers at 0x{i:x}")


def run_case(data: bytes, native_path: bool = False) -> int:
    """Run one case; returns the number of chains served. AssertionError on a violation."""
    case = build_case(data)
    served, _ = serve(case, native_path)
    check_writes(case)
    return served
