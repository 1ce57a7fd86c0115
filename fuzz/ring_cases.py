"""Turn arbitrary bytes into a hostile virtqueue, serve it with both engines, compare them.

``run_case(data)`` reads from ``data`` a ring's geometry and placement, descriptors, indirect
tables, avail entries, request headers, and how the device is set up (backend, io_uring,
in-flight log), then serves the ring with the Python engine (the reference) and, when the
extension is built, with the native loop and the Python engine for what it leaves (as the
daemon does), and checks what every ring must keep:

- nothing escapes but ``RingError`` (and then the queue is marked broken);
- the work is bounded: never more chains than a wakeup's budget (``ring.budget``);
- no byte changes outside the used ring and the buffers descriptors mark device-writable
  (guard patterns fill the rest of memory);
- the two engines leave byte for byte the same driver memory, disk and in-flight log, serve
  the same number of chains and break (or refuse the ring) alike.

Shapes it makes on purpose: ring areas overlapping each other or misaligned (refused by both
at setup), buffers on the rings themselves (the device's writes then change the ring it
reads: avail index, entries, descriptors), writable buffers adding up to 2^32 bytes or more
(refused: a used length is a u32), addresses at the top of the 64-bit space and across its
end, one-byte regions (a buffer crossing them is one segment per byte) and read-only memory.

Both engines publish after every request here (the native one with ``publish_ns=0``) and
serve in the same rounds, so that a request reading the used ring reads the same bytes in
both; io_uring requests are waited for one by one (``test_serial``) so they complete in the
order the Python engine completes them.

The same function serves the hypothesis property tests, the timed random fuzzer
(``fuzz/fuzz_rings.py``), the coverage-guided atheris harness and, with the extension built
under AddressSanitizer, the sanitizer run of CI (``fuzz/sanitize.sh``).
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

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
from pyvduse.backend.base import Backend
from pyvduse.backend.file import FileBackend
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.config import (
    AioMode,
    DeviceConfig,
    EngineConfig,
    EngineTuning,
    RingLayout,
    TestKnobs,
)
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.budget import Budget, wakeup_budget
from pyvduse.ring.errors import RingError
from pyvduse.ring.inflight import InflightLog, LoggedQueue, log_size
from pyvduse.ring.memory import Region, RegionMap
from pyvduse.ring.queue import VirtQueue
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.native_worker import run_native

ARENA = 1 << 16
GUARD = 0xA5
TOP_SIZE = 1 << 12
TOP = (1 << 64) - TOP_SIZE  # a page at the very top of the IOVA space
ONE_BYTE = (0xE000, 0xE040)  # 64 regions of one byte each
READ_ONLY = (0xE400, 0xE800)  # a read-only stretch
BIG = 1 << 40  # huge cases: a lazily mapped 256 MiB region, named 16 times = 2^32 bytes
BIG_SIZE = 1 << 28
DISK = 1 << 20
REQUEST_TYPES = (0, 1, 4, 8, 11, 99, 0x80000000, 1 | 0x80000000)
BACKENDS = ("memory", "memory", "memory", "file", "uring", "null")

_big: mmap.mmap | None = None


def _big_region() -> Region:
    """The huge cases' region (never written: chains that large are refused)."""
    global _big
    if _big is None:
        _big = mmap.mmap(
            -1, BIG_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        )
    return Region(BIG, BIG + BIG_SIZE - 1, memoryview(_big), True, owner=_big)


class CaseMemory:
    """Driver memory of one case, and the driver's allocator over it (a ``DmaSpace``).

    64 KiB at IOVA 0 cut into regions -- ordinary ones, 64 one-byte regions, a read-only
    stretch -- and a page at the top of the IOVA space, plus the big region in huge cases.
    Every region has its own allocation, so a read or write past a region's end leaves its
    buffer (AddressSanitizer sees it under ``fuzz/sanitize.sh``). ``flat()`` is the contents
    of the arena then the top page, as one bytes object."""

    def __init__(self, huge: bool) -> None:
        self.parts: list[tuple[int, bytearray]] = []  # (IOVA, memory), in IOVA order
        self.map = RegionMap()

        def add(start: int, size: int, writable: bool = True) -> None:
            buf = bytearray(size)
            self.parts.append((start, buf))
            self.map.add(Region(start, start + size - 1, memoryview(buf), writable, owner=buf))

        add(0, ONE_BYTE[0])
        for a in range(*ONE_BYTE):
            add(a, 1)
        add(ONE_BYTE[1], READ_ONLY[0] - ONE_BYTE[1])
        add(READ_ONLY[0], READ_ONLY[1] - READ_ONLY[0], writable=False)
        add(READ_ONLY[1], ARENA - READ_ONLY[1])
        add(TOP, TOP_SIZE)
        if huge:
            self.map.add(_big_region())
        self._starts = [start for start, _ in self.parts]
        self._next = 0

    # -- DmaSpace: what the model's driver needs ---------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        iova = -(-self._next // align) * align
        if iova + size > ARENA:
            raise MemoryError("arena exhausted")
        self._next = iova + size
        return iova

    def alloc_coherent(self, size: int, align: int = 16) -> int:
        return self.alloc(size, align)

    def free(self, iova: int) -> None:
        """Bump allocation: nothing is reused."""

    def _spans(self, iova: int, length: int) -> Iterator[tuple[bytearray, int, int, int]]:
        """(part, offset in it, offset in the range, bytes) covering [iova, iova+length)."""
        k = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        end = iova + length
        for start, buf in self.parts[k:]:
            if start >= end:
                return
            lo, hi = max(iova, start), min(end, start + len(buf))
            if lo < hi:
                yield buf, lo - start, lo - iova, hi - lo

    def write(self, iova: int, data: bytes) -> None:
        """Write at an IOVA of the arena or the top page (across regions)."""
        for buf, at, src, n in self._spans(iova, len(data)):
            buf[at : at + n] = data[src : src + n]

    def read(self, iova: int, length: int) -> bytes:
        out = bytearray(length)
        for buf, at, dst, n in self._spans(iova, length):
            out[dst : dst + n] = buf[at : at + n]
        return bytes(out)

    def fill(self, start: int, end: int, byte: int) -> None:
        self.write(start, bytes([byte]) * (end - start))

    def flat(self) -> bytes:
        return b"".join(bytes(buf) for _, buf in self.parts)

    @staticmethod
    def offset(iova: int) -> int | None:
        """Where ``iova`` is in ``flat()`` (None: not in the arena or the top page)."""
        if 0 <= iova < ARENA:
            return iova
        if TOP <= iova < 1 << 64:
            return ARENA + iova - TOP
        return None


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

    def address(self, data_start: int, drv: DriverSplitRing) -> int:
        """Mostly addresses inside memory; sometimes on the ring itself, at the edges of
        memory, at the top of the 64-bit space (and across its end), in the one-byte or
        read-only regions, or far outside."""
        kind, raw = self.u8() % 10, self.u32()
        if kind < 4:
            return data_start + raw % (ARENA - data_start)
        if kind == 4:  # on the ring: descriptor table, avail ring, used ring
            base = (drv.desc_addr, drv.avail_addr, drv.used_addr)[raw % 3]
            return base + (raw >> 2) % 96
        if kind == 5:
            return ARENA - 64 + raw % 128
        if kind == 6:
            return raw % ARENA
        if kind == 7:
            return TOP + raw % TOP_SIZE if raw & 1 else (1 << 64) - 1 - (raw >> 1) % 64
        if kind == 8:
            return ONE_BYTE[0] - 8 + raw % (READ_ONLY[1] - ONE_BYTE[0] + 16)
        return (1 << 64) - 1 - raw % 4096 if raw & 1 else raw << 20

    def length(self) -> int:
        kind, raw = self.u8() & 3, self.u32()
        if kind < 2:
            return raw % 600
        return (16, 512, 4096, raw)[raw % 4] if kind == 2 else raw % 70000


@dataclass
class SplitCase:
    """A hostile split ring laid out in driver memory, before any device touched it."""

    mem: CaseMemory
    drv: DriverSplitRing
    num: int
    features: int
    before: bytes
    backend: str = "memory"  # memory, file (preadv), uring (io_uring), null (8 GiB)
    tuning: EngineTuning = field(default_factory=EngineTuning)  # the native engine's
    test: TestKnobs = field(default_factory=TestKnobs)  # ... and its test-only knobs
    logged: bool = False
    layout_error: bool = False  # built to be refused at setup (checked by both engines)
    allowed: bytearray = field(default_factory=lambda: bytearray(ARENA + TOP_SIZE))
    disk: bytes = b""  # after ``serve``: the backend's contents
    log: bytes = b""  # ... and the in-flight log


def _setup(r: Reader, num: int, huge: bool = False) -> tuple[CaseMemory, DriverSplitRing, int, int]:
    """Driver memory with a ring of ``num`` at its start and guard bytes above: (memory,
    ring, features read from ``r``, where data memory starts)."""
    flags = r.u8()
    feats = (bit(F_RING_INDIRECT_DESC) if flags & 1 else 0) | (bit(F_RING_EVENT_IDX) if flags & 2 else 0)
    mem = CaseMemory(huge)
    drv = DriverSplitRing(mem, num)
    return mem, drv, feats, guarded(mem)


def guarded(mem: CaseMemory) -> int:
    """Fill data memory (after the ring) with guard bytes; where it starts."""
    data_start = mem.alloc(0, 4096)
    mem.fill(data_start, ARENA, GUARD)
    mem.fill(TOP, TOP + TOP_SIZE, GUARD)
    return data_start


def write_ring(
    mem: CaseMemory,
    drv: DriverSplitRing,
    data_start: int,
    main: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, list[tuple[int, int, int, int]]]],
    avail: list[int],
    avail_idx: int,
) -> None:
    """The descriptor table ``main``, the indirect tables ``indirect`` ((slot, descriptors):
    at 0x800 + 0x80 * slot into data memory, when they fit), the avail ring's entries and
    its index."""
    for i, d in enumerate(main):
        drv.write_desc(i, *d)
    for slot, table in indirect:
        table_addr = data_start + 0x800 + slot * 0x80
        if table_addr + DESC_SIZE * len(table) <= ARENA:
            for k, d in enumerate(table):
                mem.write(table_addr + DESC_SIZE * k, VRING_DESC.pack(*d))
    for slot, head in enumerate(avail):
        drv.set_avail_entry(slot, head)
    drv.set_avail_idx(avail_idx)


def _misplace(r: Reader, drv: DriverSplitRing, num: int) -> bool:
    """Now and then move the ring's areas onto each other or off their alignment (after
    everything was written where they were): True when they were moved."""
    mode = r.u8()
    if mode < 240:
        return False
    k = r.u8()
    moves = (
        ("used_addr", drv.avail_addr),  # the self-feeding ring
        ("used_addr", drv.avail_addr + 2 * (1 + k % num)),
        ("avail_addr", drv.desc_addr + DESC_SIZE * (k % num)),
        ("used_addr", drv.desc_addr + 4 * (k % (4 * num))),
        ("desc_addr", drv.desc_addr + 8),
        ("avail_addr", drv.avail_addr + 1),
        ("used_addr", drv.used_addr + 2),
    )
    name, where = moves[mode % len(moves)]
    setattr(drv, name, where)
    return True


def _device_setup(r: Reader, case: SplitCase) -> None:
    """Backend, native knobs and the log, from one byte (the huge cases keep null)."""
    how = r.u8()
    if case.backend != "null":
        case.backend = BACKENDS[how % len(BACKENDS)]
    if case.backend == "uring":
        case.tuning = EngineTuning(AioMode.URING, nowait=bool(how & 0x10), bounce=bool(how & 0x20))
        case.test = TestKnobs(serial=True)
    elif case.backend == "file" and how & 0x20:
        case.tuning = EngineTuning(bounce=True)
    case.logged = bool(how & 0x40)


def build_case(data: bytes) -> SplitCase:
    """Lay out the ring, tables and headers that ``data`` describes (mostly garbage)."""
    r = Reader(data)
    num = 1 << (r.u8() % 5 + 1)  # 2..32
    mem, drv, feats, data_start = _setup(r, num)
    hdr = vb.OUTHDR.pack(REQUEST_TYPES[r.u8() & 7], 0, r.u32() % 4096)
    for a in range(data_start, ARENA - 16, 2048):
        mem.write(a, hdr)
    for i in range(num):
        drv.write_desc(i, r.address(data_start, drv), r.length(), r.u8() & 7, r.u8() % (num + 2))
    for _ in range(r.u8() % 4):  # indirect tables somewhere in data memory
        table = r.address(data_start, drv) & ~15
        for k in range(r.u8() % 6 + 1):
            a = table + k * DESC_SIZE
            if data_start <= a <= ARENA - DESC_SIZE:
                mem.write(a, VRING_DESC.pack(r.address(data_start, drv), r.length(), r.u8() & 7, r.u8() % 8))
    for slot in range(num):
        drv.set_avail_entry(slot, r.u8() % (num + 2))
    jump = r.u8()
    drv.set_avail_idx(jump % (num + 1) if jump < 200 else r.u16())
    drv.set_used_event(r.u16())
    case = SplitCase(mem, drv, num, feats, b"")
    _device_setup(r, case)
    case.layout_error = _misplace(r, drv, num)
    case.before = mem.flat()
    return case


def _huge_request(r: Reader, mem: CaseMemory) -> list[tuple[int, int, int]]:
    """An IN, GET_ID or OUT whose buffers all name the big region, 2^32 bytes or more."""
    rtype = (vb.ReqType.IN, vb.ReqType.GET_ID, vb.ReqType.OUT)[r.u8() % 3]
    hdr = mem.alloc(16)
    mem.write(hdr, vb.OUTHDR.pack(rtype, 0, r.u16()))
    flag = 0 if rtype == vb.ReqType.OUT else VRING_DESC_F_WRITE
    bufs = [(hdr, 16, 0)] + [(BIG, BIG_SIZE, flag)] * (16 + r.u8() % 3)
    if flag == 0:
        bufs.append((mem.alloc(1), 1, VRING_DESC_F_WRITE))
    return bufs


def _onto_the_ring(
    r: Reader, mem: CaseMemory, drv: DriverSplitRing, num: int, tables: list[tuple[int, int]]
) -> None:
    """Point a few descriptors (direct or in an indirect table) at the ring itself: the avail
    index or entries, the used ring, the descriptor table, a few bytes long."""
    for _ in range(1 + r.u8() % 3):
        where = r.u8()
        table, count = (drv.desc_addr, num) if not tables or where & 1 else tables[where % len(tables)]
        a = table + DESC_SIZE * (r.u8() % count)
        _addr, length, f, nxt = VRING_DESC.unpack(mem.read(a, DESC_SIZE))
        if f & VRING_DESC_F_INDIRECT:
            continue
        k = r.u8()
        target = (
            drv.avail_addr + 2,
            drv.avail_addr + 4 + 2 * (k % num),
            drv.used_addr,
            drv.used_addr + 4 + 8 * (k % num),
            drv.desc_addr + DESC_SIZE * (k % num),
            drv.avail_addr,
        )[r.u8() % 6]
        mem.write(a, VRING_DESC.pack(target, 1 + r.u8() % 8 if r.u8() & 3 else length, f, nxt))


def build_request_case(data: bytes) -> SplitCase:
    """Well-formed virtio-blk requests (what real drivers send), then a few corruptions.

    Where ``build_case`` is mostly garbage, this exercises the paths that serve requests:
    any layout of header, data and status buffers, direct or indirect, reads of what earlier
    requests of the batch wrote, ranges at and past the capacity, huge chains, and buffers
    moved onto the rings.
    """
    r = Reader(data)
    num = 1 << (r.u8() % 4 + 2)  # 4..32
    huge = r.u8() < 16
    mem, drv, feats, data_start = _setup(r, num, huge)
    free_desc = 0
    tables: list[tuple[int, int]] = []  # (address, entries) of indirect tables
    nreq = 0
    for _ in range(r.u8() % (num + 1)):
        rtype = REQUEST_TYPES[r.u8() % len(REQUEST_TYPES)]
        sector = r.u16() % (DISK // 512 + 16)
        bufs: list[tuple[int, int, int]] = []  # (addr, len, flags)
        jump = r.u8()
        if jump < 32:  # the next buffers across the edges of the one-byte or read-only regions
            edge = (ONE_BYTE[0], ONE_BYTE[1], READ_ONLY[0], READ_ONLY[1])[jump % 4]
            mem._next = max(mem._next, edge - jump % 24)  # bump forward only
        try:
            if huge and r.u8() & 1:
                bufs = _huge_request(r, mem)
            else:
                hdr = mem.alloc(16, 1 + r.u8() % 16)
                mem.write(hdr, vb.OUTHDR.pack(rtype, 0, sector))
                split = r.u8() % 17
                if split:  # the header in two descriptors
                    bufs += [(hdr, split, 0), (hdr + split, 16 - split, 0)] if split < 16 else [(hdr, 16, 0)]
                else:
                    bufs.append((hdr, 16, 0))
                write = 0 if rtype & 0xFF == 1 else VRING_DESC_F_WRITE
                for _ in range(r.u8() % 4):
                    length = (512, 4096, 1, r.u16() % 3000)[r.u8() % 4]
                    addr = mem.alloc(length, 1 + r.u8() % 512)
                    if not write:
                        mem.write(addr, bytes((addr + k) & 0xFF for k in range(length)))
                    bufs.append((addr, length, write))
                status = mem.alloc(1 + r.u8() % 2, 1)
                bufs.append((status, 1 if r.u8() & 3 else 2, VRING_DESC_F_WRITE))
        except MemoryError:
            break
        if feats & bit(F_RING_INDIRECT_DESC) and r.u8() & 1 and free_desc < num:
            place = r.u8()
            try:  # in data memory (now and then misaligned), or at the top of the IOVA space
                table = (
                    TOP + TOP_SIZE - DESC_SIZE * (len(bufs) + place % 4)
                    if place < 24
                    else mem.alloc(DESC_SIZE * len(bufs), 16 if place > 40 else 4)
                )
            except MemoryError:
                break
            for k, (addr, length, f) in enumerate(bufs):
                last = k == len(bufs) - 1
                mem.write(
                    table + DESC_SIZE * k,
                    VRING_DESC.pack(addr, length, f | (0 if last else VRING_DESC_F_NEXT), k + 1),
                )
            tables.append((table, len(bufs)))
            drv.write_desc(free_desc, table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0)
            head, free_desc = free_desc, free_desc + 1
        elif free_desc + len(bufs) <= num:
            head = free_desc
            for k, (addr, length, f) in enumerate(bufs):
                last = k == len(bufs) - 1
                drv.write_desc(free_desc, addr, length, f | (0 if last else VRING_DESC_F_NEXT), free_desc + 1)
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
    for _ in range(r.u8() % 4 if r.u8() & 1 and not huge else 0):  # corrupt a field
        where = r.u8()
        table, count = (drv.desc_addr, num) if not tables or where & 1 else tables[where % len(tables)]
        a = table + DESC_SIZE * (r.u8() % count)
        field_, value = r.u8() % 4, r.u32()
        addr, length, f, nxt = VRING_DESC.unpack(mem.read(a, DESC_SIZE))
        if field_ == 0:  # elsewhere in data memory, onto the rings, or far outside
            addr = (
                (
                    r.address(data_start, drv)
                    if value & 2
                    else data_start + (addr ^ value) % (ARENA - data_start)
                )
                if value & 1 == 0
                else value << 20
            )
        elif field_ == 1:
            length = value if value & 1 else value % 8192
        elif field_ == 2:
            f = value & 7
        else:
            nxt = value % (num + 2)
        mem.write(a, VRING_DESC.pack(addr & ((1 << 64) - 1), length, f, nxt))
    if r.u8() < 96 and not huge:  # buffers onto the ring: the device then rewrites it
        _onto_the_ring(r, mem, drv, num, tables)
    drv.set_used_event(r.u16() % (nreq + 1))
    case = SplitCase(mem, drv, num, feats, b"", backend="null" if huge else "memory")
    _device_setup(r, case)
    case.layout_error = _misplace(r, drv, num)
    case.before = mem.flat()
    return case


# -- what the device may write --------------------------------------------------------------


def mark_allowed(case: SplitCase) -> None:
    """Add to ``case.allowed`` what the device may change now: the used ring and every
    buffer a descriptor (in the table or an indirect table it names) marks device-writable.
    Called before each chain is taken: the device's own writes may have rewritten the table
    (a buffer on the ring), and what the driver's memory says then is what counts."""
    ok, mem, drv, num = case.allowed, case.mem, case.drv, case.num

    def allow(addr: int, length: int) -> None:
        for lo_iova, hi_iova in ((0, ARENA), (TOP, 1 << 64)):
            lo, hi = max(addr, lo_iova), min(addr + length, hi_iova)
            if lo < hi:
                a, b = CaseMemory.offset(lo), CaseMemory.offset(hi - 1)
                assert a is not None and b is not None
                ok[a : b + 1] = b"\1" * (b + 1 - a)

    def read_desc(a: int) -> tuple[int, int, int, int] | None:
        off = CaseMemory.offset(a)
        end = CaseMemory.offset(a + DESC_SIZE - 1) if a + DESC_SIZE <= 1 << 64 else None
        if off is None or end is None or end != off + DESC_SIZE - 1:
            return None
        addr, length, f, nxt = VRING_DESC.unpack(mem.read(a, DESC_SIZE))
        return int(addr), int(length), int(f), int(nxt)

    def scan(table: int, count: int, nested: bool) -> None:
        for i in range(min(count, num)):
            d = read_desc(table + i * DESC_SIZE)
            if d is None:
                return
            addr, length, f, _ = d
            if f & VRING_DESC_F_INDIRECT and not nested:
                scan(addr, length // DESC_SIZE, True)
            elif f & VRING_DESC_F_WRITE:
                allow(addr, length)

    allow(drv.used_addr, used_ring_size(num))
    scan(drv.desc_addr, num, False)


_TO_MASK = bytes.maketrans(b"\0\1", b"\0\xff")


def check_writes(case: SplitCase) -> None:
    """No byte changed outside the used ring and the device-writable buffers."""
    after = case.mem.flat()
    if case.before == after:
        return
    changed = int.from_bytes(case.before, "big") ^ int.from_bytes(after, "big")
    outside = changed & ~int.from_bytes(bytes(case.allowed).translate(_TO_MASK), "big")
    if outside:
        i = len(after) - 1 - (outside.bit_length() - 1) // 8  # the first byte that differs
        iova = i if i < ARENA else TOP + i - ARENA
        raise AssertionError(f"wrote outside the driver's writable buffers at 0x{iova:x}")


# -- serving ---------------------------------------------------------------------------------


def _backend(case: SplitCase, files: list[str]) -> Backend:
    if case.backend == "null":
        return NullBackend(8 << 30)
    if case.backend == "memory":
        return MemoryBackend(DISK)
    fd, path = tempfile.mkstemp(prefix="pyvduse-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.write(fd, bytes(range(256)) * (DISK // 256))
    os.close(fd)
    files.append(path)
    return FileBackend(path)


def _disk(backend: Backend, files: list[str]) -> bytes:
    if isinstance(backend, MemoryBackend):
        return bytes(backend.buffer)
    if files:
        with open(files[0], "rb") as f:
            return f.read()
    return b""


def _refused_by_the_native_engine(case: SplitCase) -> bool:
    d = case.drv
    try:
        native.extension().Engine(
            EngineConfig(
                RingLayout(
                    native.region_tuples(case.mem.map),
                    case.num,
                    d.desc_addr,
                    d.avail_addr,
                    d.used_addr,
                    event_idx=bool(case.features & bit(F_RING_EVENT_IDX)),
                    indirect=True,
                ),
                DeviceConfig(bytearray(8)),
            )
        ).close()
    except ValueError:
        return True
    return False


def serve(case: SplitCase, native_path: bool = False) -> tuple[int, bool]:
    """Serve the ring for one wakeup (until it is empty, broken or the budget is spent):
    (chains served, broken). A ring refused at setup is (0, True)."""
    d = case.drv
    try:
        q = SplitQueue(case.mem.map, case.num, d.desc_addr, d.avail_addr, d.used_addr, case.features)
    except RingError:
        assert case.layout_error, "a ring laid out as a driver does was refused"
        if native_path:
            assert _refused_by_the_native_engine(case), "the native engine took a bad layout"
        return 0, True
    assert not case.layout_error, "a ring whose areas overlap or are misaligned was accepted"
    files: list[str] = []
    backend = _backend(case, files)
    dev = BlkDevice(backend)
    log = InflightLog(memoryview(bytearray(log_size(case.num))), case.num)
    queue: VirtQueue = LoggedQueue.fresh(q, log) if case.logged else q
    served = 0

    def serve_one() -> bool:
        nonlocal served
        if not native_path:
            mark_allowed(case)
        chain = queue.pop()
        if chain is None:
            return False
        served += 1
        queue.push(chain.head, dev.handle(0, chain), chain.ndesc)
        queue.publish()
        return True

    native_counts: list[int] = []
    try:
        if native_path:
            _serve_native(case, q, dev, log, serve_one, native_counts)
        else:
            _serve_python(queue, serve_one)
    except RingError:
        assert q.broken, "RingError without marking the queue broken"
        return served + sum(native_counts), True
    finally:
        case.disk = _disk(backend, files)
        case.log = bytes(log.mem) if case.logged else b""
        backend.close()
        for path in files:
            os.unlink(path)
        total = served + sum(native_counts)
        assert total <= wakeup_budget(case.num), "more chains than a wakeup's budget"
    return total, False


def _serve_python(q: VirtQueue, serve_one: Callable[[], bool]) -> None:
    """One wakeup of the Python worker (``QueueWorker._serve``), publishing after every
    request: rounds of at most num chains, on a budget; spent, it asks for a kick."""
    budget = Budget(q.num)
    while True:
        if not budget.credit:
            q.publish()
            if budget.sleep(0):
                q.ask_for_kick()
            return
        q.disable_kicks()
        n = 0
        while n < q.num and budget.credit:
            if not serve_one():
                break
            budget.credit -= 1
            n += 1
        q.publish()
        if n < q.num and budget.credit and not q.enable_kicks():
            return


def _serve_native(
    case: SplitCase,
    q: SplitQueue,
    dev: BlkDevice,
    log: InflightLog,
    serve_one: Callable[[], bool],
    counts: list[int],
) -> None:
    """The native loop with the Python engine for what it leaves; appends to ``counts``
    the chains the loop served (also when ``serve_one`` raises)."""
    engine = native.build(
        native.require_plan(dev),
        0,
        q,
        case.mem.map,
        log if case.logged else None,
        None,
        lambda i: None,
        lambda *e: None,
        tuning=replace(case.tuning, publish_ns=0),
        test=case.test,
        inflight=q.in_flight,
    )
    kick, stop = os.eventfd(0), os.eventfd(1)  # stopped from the start: one wakeup, then back
    try:
        run_native(
            engine, q, log if case.logged else None, case.mem.map, kick, stop, serve_one, lambda: False
        )
    finally:
        os.close(kick)
        os.close(stop)
        assert engine.wait_idle(10**10) == 0, "io_uring requests still in flight"
        counts.append(int(engine.counters()["completed"]))
        engine.close()


def compare(build: Callable[[], SplitCase]) -> tuple[SplitCase, SplitCase | None, int]:
    """Serve a case with the Python engine and, when the extension is built, a second copy
    with the native one; check the writes and require identical outcomes. Returns both
    cases and the chains served."""
    ref = build()
    ref_result = serve(ref, False)
    check_writes(ref)
    if not native.available():
        return ref, None, ref_result[0]
    nat = build()
    nat.allowed = ref.allowed
    nat_result = serve(nat, True)
    check_writes(nat)
    assert nat_result == ref_result, (
        f"the engines served or broke differently: {ref_result} (Python) against {nat_result} (native)"
    )
    assert nat.disk == ref.disk, "the engines left different disks"
    assert nat.log == ref.log, "the engines left different in-flight logs"
    ref_mem, nat_mem = ref.mem.flat(), nat.mem.flat()
    if nat_mem != ref_mem:
        at = next(i for i in range(len(ref_mem)) if ref_mem[i] != nat_mem[i])
        raise AssertionError(f"the engines left different driver memory (at offset 0x{at:x})")
    return ref, nat, ref_result[0]


def run_case(data: bytes) -> int:
    """Run one case (the first byte picks garbage or requests), on both engines; returns
    the number of chains served. AssertionError on a violation or a difference."""
    builder = build_request_case if data[:1] and data[0] & 1 else build_case
    rest = data[1:]
    return compare(lambda: builder(rest))[2]
