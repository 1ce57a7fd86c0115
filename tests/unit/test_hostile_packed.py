"""Property tests: whatever a driver writes into a packed ring (descriptors with any wrap bits,
any ids, any indirect tables, any event suppression words, any saved state), the device neither
raises (except the queue-stopping RingError), nor loops, nor writes outside the descriptor
ring, its own event suppression area and the buffers descriptors mark device-writable.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_DESC_EVENT,
    bit,
)
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.model.arena import Arena
from pyvduse.model.packed_driver import DriverPackedRing
from pyvduse.ring.errors import RingError
from pyvduse.ring.packed import PackedQueue
from pyvduse.ring.packed_layout import AVAIL_PATTERN, EVENT_AREA_SIZE, F_AVAIL_USED

ARENA = 1 << 16
MAX_NUM = 8
GUARD = 0xA5
ROUNDS = 3
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT

DATA = 0x1000  # where the arena's data area starts (after the ring)
TABLES = DATA + 0x800  # where generated indirect tables go: 16 slots of 0x80 bytes

addresses = st.one_of(
    st.integers(0, 59).map(lambda k: DATA + 1024 * k),  # a plausible blk request header
    st.integers(0, 15).map(lambda k: TABLES + 0x80 * k),  # a generated indirect table
    st.integers(0, ARENA - 1),  # inside memory (maybe in the ring itself)
    st.integers(ARENA - 64, ARENA + 64),  # straddling the end
    st.sampled_from([0, 1 << 63, (1 << 64) - 1, (1 << 64) - 16]),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([1, 16, 32, 512, 4096, 1 << 31, (1 << 32) - 1]))
# Mostly ids that are valid once reduced modulo the queue size; sometimes not.
ids = st.one_of(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.sampled_from([256, 0x7FFF, 0xFFFF]),
)  # 256: exactly the queue size
low_flags = st.one_of(st.integers(0, 7), st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT]))
# How the AVAIL/USED bits are chosen: "ok" gives the pattern that makes the slot available
# in the lap the device reads it in; anything else is written as is (the wrong lap, used,
# zero, or arbitrary bits).
bit_modes = st.one_of(
    st.just("ok"),
    st.just("ok"),
    st.just("ok"),
    st.sampled_from([0, 0x80, 0x8000, 0x8080]),
    st.integers(0, 0xFFFF),
)
ring_descs = st.tuples(addresses, lengths, ids, low_flags, bit_modes)
table_descs = st.tuples(addresses, lengths, st.integers(0, 0xFFFF), low_flags)
tables = st.lists(st.tuples(st.integers(0, 15), st.lists(table_descs, min_size=1, max_size=6)), max_size=3)
headers = st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 1 << 20))
rewrites = st.lists(st.tuples(st.integers(0, MAX_NUM - 1), ring_descs), max_size=MAX_NUM)


def _id(raw: int, num: int) -> int:
    return raw % num if raw < 256 else num if raw == 256 else raw


def _flags(low: int, mode: object, slot: int, pos: int, wrap: int) -> int:
    if mode == "ok":  # available in the lap the device reads slot ``slot`` in
        lap_wrap = wrap if slot >= pos else wrap ^ 1
        return low | AVAIL_PATTERN[lap_wrap]
    assert isinstance(mode, int)
    return low | mode if mode <= 0x8080 and not mode & ~F_AVAIL_USED else mode


def _allow_writes(ok: bytearray, arena: Arena, drv: DriverPackedRing, num: int) -> None:
    """Mark what the device may change: the ring, its event area, every WRITE buffer."""

    def allow(addr: int, length: int) -> None:
        lo, hi = max(addr, 0), min(addr + length, ARENA)
        if lo < hi:
            ok[lo:hi] = b"\1" * (hi - lo)

    allow(drv.desc_addr, DESC_SIZE * num)
    allow(drv.device_addr, EVENT_AREA_SIZE)
    for i in range(num):
        addr, length, _id, f = drv.read_desc(i)
        if f & VRING_DESC_F_INDIRECT:  # WRITE is ignored on the descriptor naming a table
            for k in range(min(length // DESC_SIZE, num)):
                a = addr + k * DESC_SIZE
                if a + DESC_SIZE > ARENA:
                    break
                t_addr, t_len, _tid, t_f = VRING_PACKED_DESC.unpack(arena.read(a, DESC_SIZE))
                if t_f & VRING_DESC_F_WRITE:
                    allow(t_addr, t_len)
        elif f & VRING_DESC_F_WRITE:
            allow(addr, length)


requests = st.lists(
    st.tuples(
        st.sampled_from([vb.ReqType.IN, vb.ReqType.OUT, vb.ReqType.FLUSH, vb.ReqType.GET_ID, 99]),
        st.integers(0, 2100),
        st.integers(0, 2),
        st.booleans(),
    ),
    max_size=MAX_NUM,
)


def _valid_ring(
    arena: Arena, drv: DriverPackedRing, num: int, warmup: int, reqs: list[tuple[int, int, int, bool]]
) -> tuple[int, int, int, int]:
    """Cycle ``warmup`` one-slot requests through a scratch engine (so the ring starts at any
    position and lap), then queue well-formed blk requests; returns the engine state."""
    q0 = PackedQueue(
        arena.memory, num, drv.desc_addr, drv.driver_addr, drv.device_addr, bit(F_RING_INDIRECT_DESC)
    )
    for _ in range(warmup):
        drv.add([b"w"], [])
        c = q0.pop()
        assert c is not None
        q0.push(c.head, 0, c.ndesc)
        q0.publish()
        assert len(drv.collect()) == 1
    for rtype, sector, nsect, indirect in reqs:
        readable = [vb.OUTHDR.pack(rtype, 0, sector)]
        writable = [1]
        if rtype == vb.ReqType.OUT:
            readable.append(bytes(range(256)) * 2 * nsect)
        elif nsect:
            writable.insert(0, 512 * nsect)
        try:
            drv.add(readable, writable, indirect=indirect)
        except RuntimeError:  # ring full
            break
    return q0.state()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 5, 8]),
    valid=st.booleans(),
    main=st.lists(ring_descs, min_size=MAX_NUM, max_size=MAX_NUM),
    warmup=st.integers(0, 2 * MAX_NUM),
    reqs=requests,
    mutations=st.lists(st.tuples(st.integers(0, MAX_NUM - 1), ring_descs), max_size=3),
    indirect=tables,
    later=rewrites,
    state=st.tuples(
        st.integers(0, MAX_NUM - 1),
        st.integers(0, 1),
        st.integers(0, MAX_NUM - 1),
        st.integers(0, 1),
        st.booleans(),
    ),
    driver_event=st.tuples(st.integers(0, 0xFFFF), st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF))),
    header=headers,
    features=st.tuples(st.booleans(), st.booleans()),
)
def test_hostile_packed_ring(
    num: int,
    valid: bool,
    main: list[tuple[int, int, int, int, object]],
    warmup: int,
    reqs: list[tuple[int, int, int, bool]],
    mutations: list[tuple[int, tuple[int, int, int, int, object]]],
    indirect: list[tuple[int, list[tuple[int, int, int, int]]]],
    later: list[tuple[int, tuple[int, int, int, int, object]]],
    state: tuple[int, int, int, int, bool],
    driver_event: tuple[int, int],
    header: tuple[int, int],
    features: tuple[bool, bool],
) -> None:
    arena = Arena(ARENA)
    drv = DriverPackedRing(arena, num)
    assert arena.alloc(0, 4096) == DATA
    arena.buf[DATA:] = bytes([GUARD]) * (ARENA - DATA)
    hdr = vb.OUTHDR.pack(header[0], 0, header[1])  # plausible requests where buffers may land
    for a in range(DATA, ARENA - 16, 1024):
        arena.write(a, hdr)
    for slot, table in indirect:
        table_addr = TABLES + slot * 0x80
        if table_addr + DESC_SIZE * len(table) <= ARENA:
            for k, d in enumerate(table):
                arena.write(table_addr + DESC_SIZE * k, VRING_PACKED_DESC.pack(*d))

    def rewrite(descs: list[tuple[int, tuple[int, int, int, int, object]]], pos: int, wrap: int) -> None:
        for slot, (addr, length, buf_id, low, mode) in descs:
            i = slot % num
            drv.write_desc(i, addr, length, _id(buf_id, num), _flags(low, mode, i, pos, wrap))

    if valid:  # well-formed requests (from any ring position), a few descriptors corrupted
        arena.alloc(0x8000 - DATA)  # the model's buffers go above the generated tables
        avail_wrap, avail_idx, used_wrap, used_idx = _valid_ring(arena, drv, num, warmup, reqs)
        fresh = False
        rewrite(mutations, avail_idx, avail_wrap)
    else:  # an arbitrary ring and an arbitrary saved state
        avail_idx, avail_wrap, used_idx, used_wrap, fresh = state
        avail_idx %= num
        used_idx %= num
        rewrite(list(enumerate(main[:num])), avail_idx, avail_wrap)
    arena.write(drv.driver_addr, VRING_PACKED_DESC_EVENT.pack(*driver_event))
    feats = (bit(F_RING_INDIRECT_DESC) if features[0] or valid else 0) | (
        bit(F_RING_EVENT_IDX) if features[1] else 0
    )
    ok = bytearray(ARENA)
    _allow_writes(ok, arena, drv, num)
    before = bytes(arena.buf)

    q = PackedQueue(
        arena.memory,
        num,
        drv.desc_addr,
        drv.driver_addr,
        drv.device_addr,
        feats,
        last_avail_idx=avail_idx,
        used_idx=None if fresh else used_idx,
        avail_wrap=avail_wrap,
        used_wrap=used_wrap,
    )
    dev = BlkDevice(MemoryBackend(1 << 20))
    try:
        for rnd in range(ROUNDS):
            if rnd == 1:  # the driver keeps writing, relative to where the device now is
                _check(before, arena.buf, ok)  # what the device did so far
                rewrite(later, q.last_avail_idx, q.avail_wrap)
                before = bytes(arena.buf)  # the driver's rewrite is the new baseline
            q.disable_kicks()
            popped = 0
            while popped < num:
                _allow_writes(ok, arena, drv, num)  # buffers may have rewritten descriptors
                a_wrap, a_idx, u_wrap, u_idx = q.state()
                chain = q.pop()
                if chain is None:
                    assert q.state() == (a_wrap, a_idx, u_wrap, u_idx)
                    break
                popped += 1
                # bounded, consistent: one chain is 1..num slots and the position moved by it
                assert 1 <= chain.ndesc <= num and 0 <= chain.head < num
                moved = q.last_avail_idx + (0 if q.avail_wrap == a_wrap else num) - a_idx
                assert moved == chain.ndesc
                q.push(chain.head, dev.handle(0, chain), chain.ndesc)
            q.publish()
            q.enable_kicks()
    except RingError:
        assert q.broken
    _check(before, arena.buf, ok)


def _check(before: bytes, memory: bytearray | memoryview, ok: bytearray) -> None:
    after = bytes(memory)
    for blk in range(0, ARENA, 256):
        if before[blk : blk + 256] == after[blk : blk + 256]:
            continue
        for i in range(blk, blk + 256):
            if before[i] != after[i]:
                assert ok[i], f"device wrote outside the driver's writable buffers at 0x{i:x}"


HUGE = 32 << 20  # one buffer, named by 128 descriptors: 2^32 device-writable bytes


@pytest.mark.parametrize("indirect", [False, True])
def test_a_packed_chain_whose_writable_buffers_total_2_32_bytes_is_refused(indirect: bool) -> None:
    """Its used length (a u32) would not fit: struct.error used to stop the queue. The chain
    is refused (length 0, status byte untouched, nothing read) and the next one served."""
    arena = Arena(HUGE + (1 << 16))
    drv = DriverPackedRing(arena, 256)
    buf = arena.alloc(HUGE, 4096)
    arena.write(buf + HUGE - 1, b"\xee")
    hdr = arena.alloc(16)
    arena.write(hdr, vb.OUTHDR.pack(vb.ReqType.IN, 0, 0))
    bufs = [(hdr, 16, 0)] + [(buf, HUGE, WRITE)] * 128
    avail = AVAIL_PATTERN[1]
    if indirect:
        table = arena.alloc(DESC_SIZE * len(bufs))
        for k, (a, n, f) in enumerate(bufs):
            arena.write(table + DESC_SIZE * k, VRING_PACKED_DESC.pack(a, n, 0, f))
        drv.write_desc(0, table, DESC_SIZE * len(bufs), 7, INDIRECT | avail)
        slots = 1
    else:
        for k, (a, n, f) in enumerate(bufs):
            drv.write_desc(k, a, n, 7, f | avail | (NEXT if k + 1 < len(bufs) else 0))
        slots = len(bufs)
    drv.commit(slots, 7)
    drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1])
    q = PackedQueue(
        arena.memory, 256, drv.desc_addr, drv.driver_addr, drv.device_addr, bit(F_RING_INDIRECT_DESC)
    )
    dev = BlkDevice(NullBackend(8 << 30))
    while (chain := q.pop()) is not None:
        q.push(chain.head, dev.handle(0, chain), chain.ndesc)
    q.publish()
    assert q.broken is None
    got = {c.head: c.length for c in drv.collect()}
    assert got[7] == 0 and len(got) == 2 and set(got.values()) == {0, 1}
    assert arena.read(buf + HUGE - 1, 1) == b"\xee"
    assert dev.stats.bad_chains == 1 and dev.stats.bytes_read == 0
