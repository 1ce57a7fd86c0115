"""Property tests of the native virtio-net queues (splitblk_net.c) on hostile split rings:
whatever the driver writes into the ring, the loop (with Python for the chains it leaves,
as ``NativeQueueWorker`` does) neither crashes nor loops nor writes outside the used ring
and the buffers the driver made device-writable, holds no buffer taken and empty, sends
the TAP only well-formed frames, and completes receive buffers with frames that fit them."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fuzz.ring_cases import ARENA, TOP, CaseMemory, SplitCase, check_writes, guarded, mark_allowed, write_ring
from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvduse.device.net import OFFLOAD_FEATURES, NetDevice, NetOptions
from pyvduse.fastpath import engine as native
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.errors import RingError
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.native_worker import LeftReceiveBuffers, run_native
from pyvduse.testing import FramePipe

pytestmark = pytest.mark.skipif(not native.available(), reason="the native data path is not built")

NUM = 8
HDR = vn.NET_HDR_V1_SIZE

addresses = st.one_of(
    st.integers(0x1000, ARENA - 1),
    st.integers(0, 0x1100),  # the ring itself
    st.integers(ARENA - 64, ARENA + 64),  # straddling the end of memory
    st.integers(TOP - 16, (1 << 64) - 1),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([12, 16, 1514, 4096, 1 << 31, (1 << 32) - 1]))
hostile = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, NUM + 2))


def plausible(flags: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """What a driver would write: a buffer in data memory with these flags, maybe NEXT."""
    return st.tuples(
        st.integers(0x1000, ARENA - 0x1000),
        st.integers(1, 2048),
        st.sampled_from([flags, flags | 1]),
        st.integers(0, NUM - 1),
    )


#: The descriptor table: a receive queue's buffers, a transmit queue's, with hostile ones among them
table = st.one_of(
    *(st.lists(st.one_of(plausible(f), plausible(f), hostile), min_size=NUM, max_size=NUM) for f in (0, 2))
)
tables = st.lists(st.tuples(st.integers(0, 15), st.lists(hostile, min_size=1, max_size=6)), max_size=3)


def build(
    main: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, list[tuple[int, int, int, int]]]],
    avail: list[int],
    avail_idx: int,
    event_idx: bool,
) -> SplitCase:
    mem = CaseMemory(huge=False)
    drv = DriverSplitRing(mem, NUM)
    write_ring(mem, drv, guarded(mem), main, indirect, avail, avail_idx)
    features = bit(F_RING_INDIRECT_DESC) | (bit(F_RING_EVENT_IDX) if event_idx else 0)
    return SplitCase(mem, drv, NUM, features, mem.flat())


def serve(case: SplitCase, index: int, frames: list[bytes], link_up: bool) -> tuple[list[bytes], list[int]]:
    """One wakeup of queue ``index`` with ``frames`` waiting at the TAP: (the frames the
    TAP got, the used lengths the driver sees)."""
    d = case.drv
    try:
        q = SplitQueue(case.mem.map, case.num, d.desc_addr, d.avail_addr, d.used_addr, case.features)
    except RingError:
        return [], []
    pipe = FramePipe(OFFLOAD_FEATURES)
    dev = NetDevice(pipe, NetOptions(link_up=link_up))
    plan = native.require_plan(dev)
    left = LeftReceiveBuffers(q) if index == vn.RX_QUEUE else None

    def serve_one() -> bool:  # as NativeQueueWorker._serve_one
        if left is not None and left.walk_only():
            return True
        chain = q.pop()
        if chain is None:
            return False
        q.push(chain.head, dev.handle(index, chain), chain.ndesc)
        q.publish()
        return True

    engine = native.build(
        plan, index, q, case.mem.map, None, None, lambda i: None, lambda *e: None, inflight=q.in_flight
    )
    kick, stop = os.eventfd(0), os.eventfd(1)  # stopped from the start: one wakeup
    try:
        for f in frames:
            pipe.inject(f)
        run_native(engine, q, None, case.mem.map, kick, stop, serve_one, lambda: False)
    except RingError:
        assert q.broken
    finally:
        os.close(kick)
        os.close(stop)
        assert engine.in_flight() == 0, "a buffer held taken"
        engine.close()
    sent = []
    pipe.peer.setblocking(False)
    while True:
        try:
            sent.append(pipe.peer.recv(1 << 17))
        except BlockingIOError:
            break
    pipe.close()
    used = [
        int.from_bytes(case.mem.read(d.used_addr + 4 + 8 * (k % NUM) + 4, 4), "little")
        for k in range(q.used_idx)
    ]
    return sent, used


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    main=table,
    indirect=tables,
    avail=st.lists(st.integers(0, NUM + 1), min_size=NUM, max_size=NUM),  # and out of range
    avail_idx=st.one_of(st.integers(1, NUM), st.integers(1, NUM), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    index=st.sampled_from([vn.RX_QUEUE, vn.TX_QUEUE]),
    sizes=st.lists(st.one_of(st.integers(1, 2000), st.integers(1, 70000)), min_size=1, max_size=4),
    link_up=st.sampled_from([True, True, True, False]),
)
def test_hostile_net_ring(
    main: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, list[tuple[int, int, int, int]]]],
    avail: list[int],
    avail_idx: int,
    event_idx: bool,
    index: int,
    sizes: list[int],
    link_up: bool,
) -> None:
    case = build(main, indirect, avail, avail_idx, event_idx)
    mark_allowed(case)
    frames = [bytes([n % 251]) * n for n in sizes]
    sent, used = serve(case, index, frames if index == vn.RX_QUEUE else [], link_up)
    check_writes(case)
    event(f"queue {index}: {'some' if sent or any(used) else 'no'} frame through (link {link_up})")
    if index == vn.TX_QUEUE:
        assert all(len(f) >= HDR for f in sent)
        assert used == [0] * len(used)
        if not link_up:
            assert sent == []
    else:
        assert sent == []
        delivered = [n for n in used if n]
        assert all(n >= HDR for n in delivered)
        if not link_up:
            assert delivered == []
