"""Property tests: whatever a driver writes into a split ring, the device neither raises
(except the queue-stopping RingError), nor loops, nor writes outside the buffers it was given.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.ring_cases import allowed_writes
from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC,
    bit,
)
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.errors import RingError
from pyvduse.ring.split import SplitQueue

ARENA = 1 << 16
NUM = 8
GUARD = 0xA5

addresses = st.one_of(
    st.integers(0x1000, ARENA - 1),  # inside memory (maybe in the ring itself)
    st.integers(ARENA - 64, ARENA + 64),  # straddling the end
    st.sampled_from([0, 1 << 63, (1 << 64) - 1, (1 << 64) - 16]),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 512, 4096, 1 << 31, (1 << 32) - 1]))
flags = st.integers(0, 7)
descs = st.tuples(addresses, lengths, flags, st.integers(0, NUM + 2))
tables = st.lists(st.tuples(st.integers(0, 15), st.lists(descs, min_size=1, max_size=6)),
                  max_size=3)
headers = st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 1 << 20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    main=st.lists(descs, min_size=NUM, max_size=NUM),
    indirect=tables,
    avail=st.lists(st.integers(0, NUM + 1), min_size=NUM, max_size=NUM),
    avail_idx=st.one_of(st.integers(0, NUM), st.integers(0, 0xFFFF)),
    header=headers,
    event_idx=st.booleans(),
)
def test_hostile_split_ring(main: list[tuple[int, int, int, int]],
                            indirect: list[tuple[int, list[tuple[int, int, int, int]]]],
                            avail: list[int], avail_idx: int, header: tuple[int, int],
                            event_idx: bool) -> None:
    arena = Arena(ARENA)
    drv = DriverSplitRing(arena, NUM)
    data_start = arena.alloc(0, 4096)
    arena.buf[data_start:] = bytes([GUARD]) * (ARENA - data_start)
    # Put a plausible request header at a few addresses the generated descriptors may use.
    hdr = vb.OUTHDR.pack(header[0], 0, header[1])
    for a in range(data_start, ARENA - 16, 1024):
        arena.write(a, hdr)
    for i, (addr, length, f, nxt) in enumerate(main):
        drv.write_desc(i, addr, length, f, nxt)
    for slot, table in indirect:
        table_addr = data_start + 0x800 + slot * 0x80
        if table_addr + DESC_SIZE * len(table) <= ARENA:
            for k, d in enumerate(table):
                arena.write(table_addr + DESC_SIZE * k, VRING_DESC.pack(*d))
    for slot, head in enumerate(avail):
        drv.set_avail_entry(slot, head)
    drv.set_avail_idx(avail_idx)
    features = bit(F_RING_INDIRECT_DESC) | (bit(F_RING_EVENT_IDX) if event_idx else 0)
    allowed = allowed_writes(arena, drv, NUM)
    before = bytes(arena.buf)

    q = SplitQueue(arena.memory, NUM, drv.desc_addr, drv.avail_addr, drv.used_addr, features)
    dev = BlkDevice(MemoryBackend(1 << 20))
    popped = 0
    try:
        while True:
            chain = q.pop()
            if chain is None:
                break
            popped += 1
            assert popped <= NUM  # bounded: never more than the ring holds
            q.push(chain.head, dev.handle(0, chain))
        q.publish()
        q.enable_kicks()
    except RingError:
        assert q.broken
    changed = [i for i, (a, b) in enumerate(zip(before, arena.buf, strict=True)) if a != b]
    outside = [i for i in changed if not allowed[i]]
    assert not outside, f"device wrote outside the driver's writable buffers at 0x{outside[0]:x}"
