"""The split ring engine against a model driver: happy paths, suppression, and every bad chain."""

from __future__ import annotations

import pytest

from pyvduse.abi.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    bit,
)
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.errors import RingError
from pyvduse.ring.split import SplitQueue

ALL = bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)


def make(num: int = 8, features: int = ALL) -> tuple[DriverSplitRing, SplitQueue]:
    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, num)
    dev = SplitQueue(arena.memory, num, drv.desc_addr, drv.avail_addr, drv.used_addr, features)
    return drv, dev


@pytest.mark.parametrize("indirect", [False, True])
def test_chain_round_trip(indirect: bool) -> None:
    drv, dev = make()
    drv.add([b"hello", b"world!"], [3, 4], indirect=indirect)
    chain = dev.pop()
    assert chain is not None and chain.error is None
    assert b"".join(bytes(s) for s in chain.readable) == b"helloworld!"
    assert [len(s) for s in chain.writable] == [3, 4]
    chain.writable[1][:] = b"abcd"
    assert dev.pop() is None
    dev.push(chain.head, 4)
    assert dev.publish()
    (c,) = drv.collect()
    assert c.length == 4 and drv.read_writable(c)[3:] == b"abcd"


def test_indices_wrap_around_16_bits() -> None:
    arena = Arena(8 << 20)
    drv = DriverSplitRing(arena, 4)
    dev = SplitQueue(arena.memory, 4, drv.desc_addr, drv.avail_addr, drv.used_addr, ALL)
    for _ in range(70000 // 4 + 3):
        for _ in range(4):
            drv.add([], [1])
        for _ in range(4):
            chain = dev.pop()
            assert chain is not None
            dev.push(chain.head, 1)
        dev.publish()
        assert len(drv.collect()) == 4
    assert dev.last_avail_idx == drv.avail_idx


def test_event_idx_interrupt_only_when_crossing_used_event() -> None:
    drv, dev = make()
    drv.set_used_event(1)  # driver wants an interrupt once used idx passes 1
    for _ in range(3):
        drv.add([b"r"], [1])
    c = dev.pop()
    assert c
    dev.push(c.head, 1)
    assert not dev.publish()  # used idx 1: event at 1 not yet crossed
    for _ in range(2):
        c = dev.pop()
        assert c
        dev.push(c.head, 1)
    assert dev.publish()  # 1 -> 3 crosses 1
    assert not dev.publish()  # nothing new


def test_no_interrupt_flag_without_event_idx() -> None:
    drv, dev = make(features=0)
    drv.suppress_interrupts()
    drv.add([b"r"], [1])
    c = dev.pop()
    assert c
    dev.push(c.head, 1)
    assert not dev.publish()
    drv.suppress_interrupts(False)
    drv.add([b"r"], [1])
    c = dev.pop()
    assert c
    dev.push(c.head, 1)
    assert dev.publish()


def test_kick_suppression_and_recheck() -> None:
    drv, dev = make()
    drv.add([b"a"], [1])
    assert dev.enable_kicks()  # work already there: do not sleep
    assert dev.pop() is not None
    assert not dev.enable_kicks()
    assert drv.avail_event() == dev.last_avail_idx == 1
    drv2, dev2 = make(features=0)
    dev2.disable_kicks()
    assert drv2.used_flags() == VRING_USED_F_NO_NOTIFY
    assert not dev2.enable_kicks()
    assert drv2.used_flags() == 0


def test_resume_from_saved_avail_index() -> None:
    arena = Arena(1 << 16)
    drv = DriverSplitRing(arena, 8)
    for _ in range(3):
        drv.add([b"a"], [1])
    dev = SplitQueue(arena.memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, ALL, last_avail_idx=2)
    assert dev.pending() == 1


# -- malformed chains fail one request ---------------------------------------------------


def bad_chain(setup: object, features: int = ALL) -> str:
    drv, dev = make(features=features)
    setup(drv)  # type: ignore[operator]
    drv.set_avail_entry(0, 0)
    drv.set_avail_idx(1)
    chain = dev.pop()
    assert chain is not None and chain.head == 0 and chain.error
    dev.push(chain.head, 0)  # the request still completes
    assert dev.pop() is None
    return chain.error


def test_loop_is_detected() -> None:
    err = bad_chain(
        lambda d: (
            d.write_desc(0, 0x100, 4, VRING_DESC_F_NEXT, 1),
            d.write_desc(1, 0x100, 4, VRING_DESC_F_NEXT, 0),
        )
    )
    assert "longer than the queue" in err


def test_next_out_of_range() -> None:
    assert "outside" in bad_chain(lambda d: d.write_desc(0, 0x100, 4, VRING_DESC_F_NEXT, 99))


def test_address_outside_memory() -> None:
    assert "not mapped" in bad_chain(lambda d: d.write_desc(0, 1 << 40, 4, 0, 0))


def test_length_running_past_memory_end() -> None:
    assert "not mapped" in bad_chain(lambda d: d.write_desc(0, (1 << 20) - 2, 4, 0, 0))


def test_readable_after_writable() -> None:
    err = bad_chain(
        lambda d: (
            d.write_desc(0, 0x100, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            d.write_desc(1, 0x200, 4, 0, 0),
        )
    )
    assert "after a device-writable" in err


def test_indirect_not_negotiated() -> None:
    err = bad_chain(
        lambda d: d.write_desc(0, 0x100, 16, VRING_DESC_F_INDIRECT, 0), features=bit(F_RING_EVENT_IDX)
    )
    assert "without" in err


def test_indirect_with_next() -> None:
    err = bad_chain(lambda d: d.write_desc(0, 0x100, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1))
    assert "NEXT" in err


@pytest.mark.parametrize("length", [0, 15, 17])
def test_indirect_bad_length(length: int) -> None:
    assert "multiple of 16" in bad_chain(lambda d: d.write_desc(0, 0x100, length, VRING_DESC_F_INDIRECT, 0))


def test_nested_indirect() -> None:
    def setup(d: DriverSplitRing) -> None:
        table = d.arena.alloc(32)
        from pyvduse.abi.virtio import VRING_DESC

        d.arena.write(table, VRING_DESC.pack(table, 16, VRING_DESC_F_INDIRECT, 0))
        d.write_desc(0, table, 16, VRING_DESC_F_INDIRECT, 0)

    assert "nested" in bad_chain(setup)


def test_indirect_loop() -> None:
    def setup(d: DriverSplitRing) -> None:
        table = d.arena.alloc(32)
        from pyvduse.abi.virtio import VRING_DESC

        d.arena.write(
            table,
            VRING_DESC.pack(0x100, 4, VRING_DESC_F_NEXT, 1) + VRING_DESC.pack(0x100, 4, VRING_DESC_F_NEXT, 0),
        )
        d.write_desc(0, table, 32, VRING_DESC_F_INDIRECT, 0)

    assert "longer than the queue" in bad_chain(setup)


def test_indirect_table_larger_than_queue() -> None:
    assert "exceeds" in bad_chain(lambda d: d.write_desc(0, 0x100, 16 * 64, VRING_DESC_F_INDIRECT, 0))


# -- ring-level corruption stops the queue ---------------------------------------------


def test_avail_index_jump_breaks_queue() -> None:
    drv, dev = make()
    drv.set_avail_idx(9)  # more than the 8 entries the ring has
    with pytest.raises(RingError):
        dev.pop()
    with pytest.raises(RingError):
        dev.pop()  # stays broken
    assert dev.broken


def test_head_out_of_range_breaks_queue() -> None:
    drv, dev = make()
    drv.set_avail_entry(0, 8)
    drv.set_avail_idx(1)
    with pytest.raises(RingError):
        dev.pop()


def test_ring_outside_memory_is_refused() -> None:
    arena = Arena(4096)
    with pytest.raises(RingError):
        SplitQueue(arena.memory, 256, 0, 4096 * 4, 0, ALL)


def test_queue_size_must_be_power_of_two() -> None:
    arena = Arena(1 << 16)
    with pytest.raises(RingError):
        SplitQueue(arena.memory, 6, 0, 0x1000, 0x2000, ALL)


def test_threads_faulting_the_same_regions_in_at_once() -> None:
    """Each queue's worker and the control thread share one map: two of them missing the
    same region fault it in once (it raised 'overlapping region' when a resumed daemon read
    the chains left in flight while a queue's worker already served), and no lookup sees a
    half-updated index."""
    import threading
    import time as _time

    from pyvduse.ring.memory import Region, RegionMap

    backing = {k: bytearray(4096) for k in range(64)}
    faults: list[int] = []

    def fault_in(iova: int) -> Region | None:
        k = iova // 4096
        if k not in backing:
            return None
        faults.append(k)
        _time.sleep(0.0005)  # the window in which another thread misses too
        return Region(k * 4096, k * 4096 + 4095, memoryview(backing[k]), True)

    rm = RegionMap(fault_in)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        import random

        rng = random.Random(seed)
        try:
            for _ in range(400):
                iova = rng.randrange(64 * 4096)
                r = rm.find(iova)
                assert r is not None and r.start <= iova <= r.last
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted(faults) == list(range(64))  # each region faulted in exactly once
