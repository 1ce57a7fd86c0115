"""The packed ring engine against a model driver: round trips, wrap-around, event suppression
in both directions, every malformed chain, state, and virtio-blk end to end."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    bit,
)
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.model.arena import Arena
from pyvduse.model.packed_driver import DriverPackedRing
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.memory import buffer_region
from pyvduse.ring.packed import PackedQueue
from pyvduse.ring.packed_layout import F_AVAIL, F_USED, event_crossed, linear, off_wrap

ALL = bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


def make(
    num: int = 8, features: int = ALL, arena_size: int = 1 << 20
) -> tuple[Arena, DriverPackedRing, PackedQueue]:
    arena = Arena(arena_size)
    drv = DriverPackedRing(arena, num, event_idx=bool(features & bit(F_RING_EVENT_IDX)))
    dev = PackedQueue(arena.memory, num, drv.desc_addr, drv.driver_addr, drv.device_addr, features)
    return arena, drv, dev


def serve_all(dev: PackedQueue, written: int = 0) -> list[Chain]:
    chains = []
    while (c := dev.pop()) is not None:
        chains.append(c)
    for c in chains:
        dev.push(c.head, written, c.ndesc)
    return chains


def in_step(drv: DriverPackedRing, dev: PackedQueue) -> None:
    assert (dev.last_avail_idx, dev.avail_wrap) == (drv.next_avail, drv.avail_wrap)


# -- happy paths -------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_round_trip(indirect: bool) -> None:
    _, drv, dev = make()
    assert dev.pending() == 0 and dev.pop() is None
    buf_id = drv.add([b"hello", b"world!"], [3, 4], indirect=indirect, token="t")
    assert dev.pending() == 1
    chain = dev.pop()
    assert chain is not None and chain.error is None
    assert chain.head == buf_id
    assert chain.ndesc == (1 if indirect else 4)
    assert b"".join(bytes(s) for s in chain.readable) == b"helloworld!"
    assert [len(s) for s in chain.writable] == [3, 4]
    chain.writable[1][:] = b"abcd"
    assert dev.pop() is None
    in_step(drv, dev)
    dev.push(chain.head, 4, chain.ndesc)
    assert drv.collect() == []  # pushed, not yet published
    assert dev.publish()  # driver area is zero: ENABLE
    (c,) = drv.collect()
    assert (c.head, c.length, c.token) == (buf_id, 4, "t")
    assert drv.read_writable(c)[3:] == b"abcd" and c.data[3:] == b"abcd"
    assert not dev.publish()  # nothing new


def test_used_descriptor_layout() -> None:
    _, drv, dev = make(4)
    drv.add([b"r"], [1, 1])  # 3 slots, id 0
    drv.add([b"r"], [])  # 1 slot, id 1
    a, b = dev.pop(), dev.pop()
    assert a is not None and b is not None
    dev.push(b.head, 0, b.ndesc)  # out of order: b first, into slot 0
    dev.push(a.head, 2, a.ndesc)  # then a, into slot 1 (b took one slot)
    dev.publish()
    _, _, id0, f0 = drv.read_desc(0)
    _, len1, id1, f1 = drv.read_desc(1)
    assert (id0, f0) == (b.head, F_AVAIL | F_USED)  # no WRITE: nothing written
    assert (id1, len1, f1) == (a.head, 2, F_AVAIL | F_USED | WRITE)
    assert [c.head for c in drv.collect()] == [b.head, a.head]
    assert dev.state() == (0, 0, 0, 0)  # 4 of 4 slots consumed and used: both wrapped


def test_indirect_table_is_sequential_and_ignores_next_and_id() -> None:
    arena, drv, dev = make()
    table = arena.alloc(48)
    bufs = [arena.alloc(4) for _ in range(3)]
    arena.write(bufs[0], b"abcd")
    # Entry 0 carries NEXT and a junk id: both reserved in a packed table and ignored.
    arena.write(
        table,
        VRING_PACKED_DESC.pack(bufs[0], 4, 0xFFFF, NEXT)
        + VRING_PACKED_DESC.pack(bufs[1], 4, 7, WRITE)
        + VRING_PACKED_DESC.pack(bufs[2], 4, 9, WRITE),
    )
    drv.write_desc(0, table, 48, 0, INDIRECT | WRITE | drv.avail_bits())
    chain = dev.pop()
    assert chain is not None and chain.error is None and chain.ndesc == 1
    assert [bytes(s) for s in chain.readable] == [b"abcd"]
    assert [len(s) for s in chain.writable] == [4, 4]


@pytest.mark.parametrize("num", [1, 3, 7, 8])
def test_wrap_around_many_times_with_chains_of_varying_length(num: int) -> None:
    rng = random.Random(num)
    _, drv, dev = make(num, arena_size=64 << 20)
    wrapped_mid_chain = 0
    for _round in range(400):
        added: dict[int, bytes] = {}
        while True:
            n = rng.randint(1, min(4, num))
            indirect = rng.random() < 0.25
            if (1 if indirect else n) > drv.free_slots:
                break
            if not indirect and drv.next_avail + n > num:
                wrapped_mid_chain += 1
            payload = os.urandom(rng.randint(1, 8))
            readable = [payload[: len(payload) // 2], payload[len(payload) // 2 :]][: max(n - 1, 1)]
            buf_id = drv.add(readable, [len(payload)] * (n - len(readable)), indirect=indirect, token=payload)
            added[buf_id] = payload
        chains = []
        while (c := dev.pop()) is not None:
            assert c.error is None
            chains.append(c)
        in_step(drv, dev)
        assert sorted(c.head for c in chains) == sorted(added)
        rng.shuffle(chains)  # complete out of order
        for c in chains:
            data = b"".join(bytes(s) for s in c.readable)
            assert data == added[c.head][: len(data)]
            for s in c.writable:
                s[:] = bytes(len(s))
            dev.push(c.head, len(data), c.ndesc)
        dev.publish()
        done = drv.collect()
        assert [c.head for c in done] == [c.head for c in chains]
        assert (dev.used_idx, dev.used_wrap) == (drv.next_used, drv.used_wrap)
        assert drv.free_slots == num
    if num > 1:
        assert wrapped_mid_chain > 10


def test_unpublished_driver_chains_are_invisible() -> None:
    _, drv, dev = make()
    drv.add([b"a"], [1], publish=False)
    drv.add([b"b"], [1], publish=False)
    assert dev.pop() is None and dev.pending() == 0
    drv.publish()
    assert len(serve_all(dev)) == 2


def test_non_power_of_two_sizes_and_limits() -> None:
    arena = Arena(1 << 20)
    PackedQueue(arena.memory, 6, 0, 0x1000, 0x2000, ALL)
    PackedQueue(arena.memory, 32768, 0x10000, 0x1000, 0x2000, ALL)
    for num in (0, 32769):
        with pytest.raises(RingError):
            PackedQueue(arena.memory, num, 0, 0x1000, 0x2000, ALL)


# -- state -------------------------------------------------------------------------------


def test_state_and_resume() -> None:
    arena, drv, dev = make(5)
    assert dev.state() == (1, 0, 1, 0)
    for _ in range(3):
        drv.add([b"x"], [1, 1])  # 3 slots each
        assert len(serve_all(dev, 1)) == 1
        dev.publish()
        assert len(drv.collect()) == 1
    assert dev.state() == (0, 4, 0, 4)  # 9 slots on a ring of 5: one wrap each
    # Two requests in flight: taken but not completed when the queue stops.
    drv.add([b"y"], [1])
    drv.add([b"z"], [1], indirect=True)
    a, b = dev.pop(), dev.pop()
    assert a is not None and b is not None
    st = dev.state()
    assert st == (1, 2, 0, 4)  # slots 4, 0 and 1 taken; completions still at slot 4
    # A new engine resumes from the saved state and completes them.
    dev2 = PackedQueue(
        arena.memory,
        5,
        drv.desc_addr,
        drv.driver_addr,
        drv.device_addr,
        ALL,
        last_avail_idx=st[1],
        used_idx=st[3],
        avail_wrap=st[0],
        used_wrap=st[2],
    )
    assert dev2.pop() is None
    dev2.push(b.head, 1, b.ndesc)
    dev2.push(a.head, 1, a.ndesc)
    assert dev2.publish()
    assert [c.head for c in drv.collect()] == [b.head, a.head]
    drv.add([b"w"], [1])
    assert dev2.pop() is not None
    assert dev2.state() == (1, 4, 1, 2)


def test_used_idx_none_means_nothing_in_flight() -> None:
    arena = Arena(1 << 16)
    q = PackedQueue(arena.memory, 8, 0, 0x1000, 0x2000, ALL, last_avail_idx=5, avail_wrap=0)
    assert q.state() == (0, 5, 0, 5)


def test_saved_state_out_of_range_is_refused() -> None:
    arena = Arena(1 << 16)
    with pytest.raises(RingError):
        PackedQueue(arena.memory, 8, 0, 0x1000, 0x2000, ALL, last_avail_idx=8)
    with pytest.raises(RingError):
        PackedQueue(arena.memory, 8, 0, 0x1000, 0x2000, ALL, used_idx=9)


# -- event suppression: device -> driver (interrupts) -------------------------------------


def complete_one(drv: DriverPackedRing, dev: PackedQueue, nbufs: int = 1) -> bool:
    drv.add([b"r"], [1] * (nbufs - 1))
    assert len(serve_all(dev)) == 1
    r = dev.publish()
    drv.collect()
    return r


def test_interrupt_enable_disable() -> None:
    _, drv, dev = make()
    assert complete_one(drv, dev)  # ENABLE (zeroed area)
    drv.suppress_interrupts()
    assert not complete_one(drv, dev)
    drv.suppress_interrupts(False)
    assert complete_one(drv, dev)
    drv.set_driver_event(3)  # reserved value: interrupt rather than lose one
    assert complete_one(drv, dev)


def test_interrupt_desc_fires_when_the_event_slot_is_used() -> None:
    _, drv, dev = make(4)
    drv.set_used_event(2, 1)  # slot 2 of the first lap
    assert not complete_one(drv, dev)  # used slot 0
    assert not complete_one(drv, dev)  # used slot 1
    assert complete_one(drv, dev)  # used slot 2: the event
    assert not complete_one(drv, dev)  # slot 3: already passed
    # The same offset in the next lap (wrap counter 0).
    drv.set_used_event(1, 0)
    assert not complete_one(drv, dev)  # slot 0, lap 2
    assert complete_one(drv, dev)  # slot 1, lap 2
    # An event skipped over by a multi-slot chain still fires (crossing, not equality).
    drv.set_used_event(3, 0)
    assert complete_one(drv, dev, nbufs=3)  # slots 2..4 used in one go


def test_interrupt_desc_batch_crossing_wrap() -> None:
    _, drv, dev = make(4)
    for _ in range(3):
        complete_one(drv, dev)  # used position: slot 3, lap 1
    drv.set_used_event(0, 0)  # the first slot of lap 2
    for _ in range(2):
        drv.add([b"r"], [])
    serve_all(dev)
    assert dev.publish()  # slots 3 (lap 1) and 0 (lap 2): crosses the event
    drv.collect()
    drv.enable_interrupts()  # DESC at the next used slot: the next completion interrupts
    assert complete_one(drv, dev)


def test_interrupt_desc_ignored_without_event_idx() -> None:
    _, drv, dev = make(features=0)
    drv.set_used_event(5, 1)  # DESC is only valid with EVENT_IDX: treated as ENABLE
    assert complete_one(drv, dev)


def test_event_crossed_matches_linear_positions() -> None:
    num = 5
    for start in range(2 * num):
        for step in range(1, num + 1):
            end = (start + step) % (2 * num)
            for ev in range(2 * num):
                idx, wrap = (ev, 1) if ev < num else (ev - num, 0)
                want = (ev - start) % (2 * num) < step
                assert event_crossed(off_wrap(idx, wrap), end, start, num) == want
    assert linear(3, 1, 5) == 3 and linear(3, 0, 5) == 8


# -- event suppression: driver -> device (kicks) ------------------------------------------


def test_kicks_without_event_idx() -> None:
    _, drv, dev = make(features=bit(F_RING_INDIRECT_DESC))
    dev.disable_kicks()
    assert drv.device_event()[2] == VRING_PACKED_EVENT_FLAG_DISABLE
    drv.add([b"a"], [1])
    assert not drv.kick_needed()
    assert dev.enable_kicks()  # work already there: do not sleep
    assert drv.device_event()[2] == VRING_PACKED_EVENT_FLAG_ENABLE
    serve_all(dev)
    assert not dev.enable_kicks()
    drv.add([b"b"], [1])
    assert drv.kick_needed()


def test_kicks_with_event_idx_desc() -> None:
    _, drv, dev = make(4)
    dev.disable_kicks()
    drv.add([b"a"], [1, 1])  # slots 0..2
    assert not drv.kick_needed()
    serve_all(dev)
    dev.publish()
    drv.collect()
    assert not dev.enable_kicks()
    assert drv.device_event() == (3, 1, VRING_PACKED_EVENT_FLAG_DESC)  # our next slot
    drv.add([b"b"], [1])  # slots 3 and 0 (wraps): covers the event slot
    assert drv.kick_needed()
    drv.add([b"c"], [])  # slot 1 of lap 2: the event was already passed
    assert not drv.kick_needed()
    serve_all(dev)
    dev.publish()
    drv.collect()
    assert not dev.enable_kicks()
    assert drv.device_event() == (2, 0, VRING_PACKED_EVENT_FLAG_DESC)  # wrap counter 0 now


def test_enable_kicks_rechecks() -> None:
    _, drv, dev = make()
    drv.add([b"a"], [1])
    assert dev.enable_kicks()
    assert dev.pop() is not None
    assert not dev.enable_kicks()


# -- malformed chains fail one request and keep the ring in step ----------------------------


def raw_chain(drv: DriverPackedRing, descs: list[tuple[int, int, int, int]]) -> None:
    """Write descriptors at the next slots with the right wrap bits, the first flags last."""
    for k in range(len(descs) - 1, -1, -1):
        addr, length, buf_id, flags = descs[k]
        drv.write_desc(drv.slot(k), addr, length, buf_id, flags | drv.avail_bits(k))


def bad_chain(
    descs: list[tuple[int, int, int, int]] | Callable[[Arena, DriverPackedRing], None],
    ndesc: int,
    *,
    features: int = ALL,
    num: int = 8,
    head_slot: int = 0,
    buf_id: int = 3,
) -> str:
    """Pop a malformed chain; check its id and slot count, complete it, then check that a
    good request still round-trips (the ring stayed in step)."""
    arena, drv, dev = make(num, features)
    for _ in range(head_slot):  # move the ring position (to test wrapping)
        complete_one(drv, dev)
    if callable(descs):
        descs(arena, drv)
    else:
        raw_chain(drv, descs)
    chain = dev.pop()
    assert chain is not None and chain.error, chain
    assert (chain.head, chain.ndesc) == (buf_id, ndesc)
    drv.commit(chain.ndesc, chain.head)
    in_step(drv, dev)
    assert BlkDevice(MemoryBackend(1 << 20)).handle(0, chain) == 0  # fails, writes nothing
    dev.push(chain.head, 0, chain.ndesc)
    dev.publish()
    assert [c.head for c in drv.collect()] == [buf_id]
    good = drv.add([b"ok"], [2])
    c = dev.pop()
    assert c is not None and c.error is None and c.head == good
    dev.push(c.head, 2, c.ndesc)
    dev.publish()
    assert [x.head for x in drv.collect()] == [good]
    return chain.error


def test_chain_longer_than_the_queue() -> None:
    descs = [(0x100, 4, 3, NEXT)] * 8  # every slot has NEXT: the chain never ends
    assert "longer than the queue" in bad_chain(descs, 8)


def test_chain_longer_than_the_queue_from_mid_ring() -> None:
    descs = [(0x100, 4, 3, NEXT)] * 5
    assert "longer than the queue" in bad_chain(descs, 5, num=5, head_slot=3)


def test_unavailable_descriptor_in_the_middle_of_a_chain() -> None:
    def setup(arena: Arena, drv: DriverPackedRing) -> None:
        raw_chain(drv, [(0x100, 4, 3, NEXT), (0x100, 4, 3, NEXT), (0x100, 4, 3, 0)])
        drv.write_desc(drv.slot(2), 0x100, 4, 3, drv.avail_bits(2) ^ F_AVAIL)  # wrong bits

    # The chain ends before the unavailable slot: 2 slots, id from the last one taken.
    assert "not available" in bad_chain(setup, 2)


def test_chain_wrapping_with_stale_wrap_bits() -> None:
    # A driver that forgets to flip its wrap counter after the ring's last slot.
    def setup(arena: Arena, drv: DriverPackedRing) -> None:
        assert drv.slot(0) == 6
        bits = drv.avail_bits(0)
        drv.write_desc(drv.slot(2), 0x100, 4, 3, bits)  # slot 0: needs the flipped bits
        drv.write_desc(drv.slot(1), 0x100, 4, 3, bits | NEXT)
        drv.write_desc(drv.slot(0), 0x100, 4, 3, bits | NEXT)

    assert "not available" in bad_chain(setup, 2, head_slot=6)


def test_chain_wrapping_correctly_is_fine() -> None:
    _, drv, dev = make(4)
    complete_one(drv, dev)
    complete_one(drv, dev)
    drv.add([b"a", b"b"], [1, 2])  # slots 2, 3, 0, 1
    c = dev.pop()
    assert c is not None and c.error is None and c.ndesc == 4
    assert [bytes(s) for s in c.readable] == [b"a", b"b"]


def test_error_early_in_chain_still_consumes_the_whole_chain() -> None:
    descs = [(1 << 40, 4, 0, NEXT), (0x100, 4, 0, NEXT), (0x200, 4, 3, WRITE)]
    assert "not mapped" in bad_chain(descs, 3)


def test_indirect_with_next() -> None:
    descs = [(0x100, 16, 0, INDIRECT | NEXT), (0x200, 4, 3, WRITE)]
    assert "NEXT" in bad_chain(descs, 2)


def test_indirect_inside_a_chain() -> None:
    descs = [(0x200, 4, 0, NEXT), (0x100, 16, 3, INDIRECT)]
    assert "inside a chain" in bad_chain(descs, 2)


def test_indirect_not_negotiated() -> None:
    err = bad_chain([(0x100, 16, 3, INDIRECT)], 1, features=bit(F_RING_EVENT_IDX))
    assert "without" in err


@pytest.mark.parametrize("length", [0, 15, 17])
def test_indirect_bad_length(length: int) -> None:
    assert "multiple of 16" in bad_chain([(0x100, length, 3, INDIRECT)], 1)


def test_indirect_table_larger_than_queue() -> None:
    assert "exceeds" in bad_chain([(0x100, 16 * 9, 3, INDIRECT)], 1)


def test_indirect_table_outside_memory() -> None:
    assert "indirect table" in bad_chain([(1 << 40, 32, 3, INDIRECT)], 1)


def test_nested_indirect() -> None:
    def setup(arena: Arena, drv: DriverPackedRing) -> None:
        table = arena.alloc(32)
        arena.write(
            table, VRING_PACKED_DESC.pack(0x100, 4, 0, 0) + VRING_PACKED_DESC.pack(table, 16, 0, INDIRECT)
        )
        raw_chain(drv, [(table, 32, 3, INDIRECT)])

    assert "nested" in bad_chain(setup, 1)


def test_readable_after_writable() -> None:
    descs = [(0x100, 4, 0, WRITE | NEXT), (0x200, 4, 3, 0)]
    assert "after a device-writable" in bad_chain(descs, 2)


def test_readable_after_writable_in_indirect_table() -> None:
    def setup(arena: Arena, drv: DriverPackedRing) -> None:
        table = arena.alloc(32)
        arena.write(
            table, VRING_PACKED_DESC.pack(0x100, 4, 0, WRITE) + VRING_PACKED_DESC.pack(0x200, 4, 0, 0)
        )
        raw_chain(drv, [(table, 32, 3, INDIRECT)])

    assert "after a device-writable" in bad_chain(setup, 1)


def test_address_outside_memory() -> None:
    assert "not mapped" in bad_chain([(1 << 40, 4, 3, 0)], 1)


def test_length_running_past_memory_end() -> None:
    assert "not mapped" in bad_chain([((1 << 20) - 2, 4, 3, WRITE)], 1)


def test_writable_buffer_in_read_only_memory() -> None:
    def setup(arena: Arena, drv: DriverPackedRing) -> None:
        arena.memory.add(buffer_region(1 << 30, bytearray(4096), writable=False))
        raw_chain(drv, [(0x100, 16, 0, NEXT), (1 << 30, 4, 3, WRITE)])

    assert "read-only" in bad_chain(setup, 2)


# -- ring-level corruption stops the queue -------------------------------------------------


def test_buffer_id_out_of_range_breaks_queue() -> None:
    _, drv, dev = make()
    raw_chain(drv, [(0x100, 4, 8, 0)])
    with pytest.raises(RingError):
        dev.pop()
    assert dev.broken
    with pytest.raises(RingError):
        dev.pop()  # stays broken


def test_buffer_id_out_of_range_in_bad_chain_breaks_queue() -> None:
    _, drv, dev = make()
    raw_chain(drv, [(1 << 40, 4, 0, NEXT), (0x100, 4, 0xFFFF, 0)])
    with pytest.raises(RingError):
        dev.pop()
    assert dev.broken


def test_only_last_descriptor_id_counts() -> None:
    _, drv, dev = make()
    raw_chain(drv, [(0x100, 4, 0xFFFF, NEXT), (0x100, 4, 5, 0)])
    c = dev.pop()
    assert c is not None and c.error is None and c.head == 5


def test_ring_outside_memory_is_refused() -> None:
    arena = Arena(4096)
    with pytest.raises(RingError):
        PackedQueue(arena.memory, 512, 0, 0x100, 0x200, ALL)  # 8 KiB ring, 4 KiB memory
    with pytest.raises(RingError):
        PackedQueue(arena.memory, 8, 0, 4094, 0x200, ALL)  # driver area straddles the end
    with pytest.raises(RingError):
        PackedQueue(arena.memory, 8, 0, 0x100, 1 << 30, ALL)


def test_read_only_ring_is_refused() -> None:
    arena = Arena(4096)
    arena.memory.add(buffer_region(1 << 20, bytearray(4096), writable=False))
    with pytest.raises(RingError):
        PackedQueue(arena.memory, 8, 1 << 20, 0x100, 0x200, ALL)  # device writes the ring
    PackedQueue(arena.memory, 8, 0, (1 << 20) + 16, 0x200, ALL)  # driver area may be read-only


# -- virtio-blk end to end -------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_blk_write_then_read_back(indirect: bool) -> None:
    _, drv, dev = make(16, arena_size=8 << 20)
    blk = BlkDevice(MemoryBackend(4 << 20))
    T, S = vb.ReqType, vb.ReqStatus

    def request(rtype: int, sector: int, out: bytes = b"", in_len: int = 0) -> tuple[int, bytes, int]:
        readable = [vb.OUTHDR.pack(rtype, 0, sector)] + ([out[:1000], out[1000:]] if out else [])
        writable = ([in_len // 3, in_len - in_len // 3] if in_len else []) + [1]
        buf_id = drv.add(readable, writable, indirect=indirect)
        chain = dev.pop()
        assert chain is not None and chain.head == buf_id and chain.error is None
        dev.push(chain.head, blk.handle(0, chain), chain.ndesc)
        dev.publish()
        (c,) = drv.collect()
        return c.data[-1], c.data[:-1], c.length

    data = os.urandom(8192)
    for i in range(40):  # enough to wrap the 16-slot ring many times
        sector = (i * 16) % 4096
        assert request(T.OUT, sector, out=data)[0] == S.OK
        assert request(T.IN, sector, in_len=len(data)) == (S.OK, data, len(data) + 1)
    assert request(T.IN, (4 << 20) // 512, in_len=512)[0] == S.IOERR
