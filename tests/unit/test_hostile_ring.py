"""Property tests: whatever a driver writes into a split ring, the device neither raises
(except the queue-stopping RingError), nor loops, nor writes outside the buffers it was given;
and the native loop (with the Python engine for what it leaves) does exactly what the Python
engine alone does, byte for byte (``fuzz.ring_cases.compare``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.ring_cases import (
    ONE_BYTE,
    READ_ONLY,
    TOP,
    TOP_SIZE,
    CaseMemory,
    SplitCase,
    compare,
    guarded,
    write_ring,
)
from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    DESC_SIZE,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    bit,
)
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.fastpath import engine as native
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.descriptors import MAX_WRITABLE, check_writable_total
from pyvduse.ring.errors import ChainError
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.native_worker import run_native

ARENA = 1 << 16
NUM = 8
GUARD = 0xA5

addresses = st.one_of(
    st.integers(0x1000, ARENA - 1),  # inside memory (maybe in the ring itself)
    st.integers(0, 0x1100),  # the ring: descriptor table, avail ring, used ring
    st.integers(ARENA - 64, ARENA + 64),  # straddling the end
    st.integers(ONE_BYTE[0] - 4, READ_ONLY[1] + 4),  # one-byte and read-only regions
    st.integers(TOP - 16, (1 << 64) - 1),  # the top of the IOVA space (and across its end)
    st.sampled_from([0, 1 << 63, (1 << 64) - 1, (1 << 64) - 16, TOP, TOP + TOP_SIZE - 16]),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 512, 4096, 1 << 31, (1 << 32) - 1]))
flags = st.integers(0, 7)
descs = st.tuples(addresses, lengths, flags, st.integers(0, NUM + 2))
tables = st.lists(st.tuples(st.integers(0, 15), st.lists(descs, min_size=1, max_size=6)), max_size=3)
headers = st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 1 << 20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    main=st.lists(descs, min_size=NUM, max_size=NUM),
    indirect=tables,
    avail=st.lists(st.integers(0, NUM + 1), min_size=NUM, max_size=NUM),
    avail_idx=st.one_of(st.integers(0, NUM), st.integers(0, 0xFFFF)),
    header=headers,
    event_idx=st.booleans(),
    logged=st.booleans(),
)
def test_hostile_split_ring(
    main: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, list[tuple[int, int, int, int]]]],
    avail: list[int],
    avail_idx: int,
    header: tuple[int, int],
    event_idx: bool,
    logged: bool,
) -> None:
    def build() -> SplitCase:
        mem = CaseMemory(huge=False)
        drv = DriverSplitRing(mem, NUM)
        data_start = guarded(mem)
        # A plausible request header at a few addresses the generated descriptors may use.
        hdr = vb.OUTHDR.pack(header[0], 0, header[1])
        for a in (*range(data_start, ARENA - 16, 1024), TOP):
            mem.write(a, hdr)
        write_ring(mem, drv, data_start, main, indirect, avail, avail_idx)
        features = bit(F_RING_INDIRECT_DESC) | (bit(F_RING_EVENT_IDX) if event_idx else 0)
        return SplitCase(mem, drv, NUM, features, mem.flat(), logged=logged)

    compare(build)


# -- a used length that does not fit u32 --------------------------------------------------

HUGE = 32 << 20  # one buffer, named by 128 descriptors: 2^32 device-writable bytes


def _huge_read_ring(indirect: bool) -> tuple[Arena, DriverSplitRing, int]:
    """An IN whose 128 writable descriptors all name one 32 MiB buffer (2^32 bytes in all,
    so its used length would be 2^32), then a FLUSH; returns the buffer's address."""
    arena = Arena(HUGE + (1 << 16))
    drv = DriverSplitRing(arena, 256)
    buf = arena.alloc(HUGE, 4096)
    arena.write(buf + HUGE - 1, b"\xee")  # the status byte: untouched if the chain is refused
    hdr = arena.alloc(16)
    arena.write(hdr, vb.OUTHDR.pack(vb.ReqType.IN, 0, 0))
    bufs = [(hdr, 16, 0)] + [(buf, HUGE, VRING_DESC_F_WRITE)] * 128
    if indirect:
        table = arena.alloc(DESC_SIZE * len(bufs))
        for k, (a, n, f) in enumerate(bufs):
            more = VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0
            arena.write(table + DESC_SIZE * k, VRING_DESC.pack(a, n, f | more, k + 1))
        drv.write_desc(0, table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0)
    else:
        for k, (a, n, f) in enumerate(bufs):
            more = VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0
            drv.write_desc(k, a, n, f | more, k + 1)
    drv.set_avail_entry(0, 0)
    flush_hdr, status = arena.alloc(16), arena.alloc(1)
    arena.write(flush_hdr, vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0))
    drv.write_desc(200, flush_hdr, 16, VRING_DESC_F_NEXT, 201)
    drv.write_desc(201, status, 1, VRING_DESC_F_WRITE, 0)
    drv.set_avail_entry(1, 200)
    drv.set_avail_idx(2)
    return arena, drv, buf


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("engine", ["python", "native"])
def test_a_chain_whose_writable_buffers_total_2_32_bytes_is_refused(engine: str, indirect: bool) -> None:
    """Its used length would wrap to 0 (native) or raise struct.error and stop the queue
    (Python): both refuse the chain instead (used length 0, status byte untouched, nothing
    read), and the next request is served."""
    if engine == "native" and not native.available():
        pytest.skip("native extension not built")
    arena, drv, buf = _huge_read_ring(indirect)
    features = bit(F_RING_INDIRECT_DESC) | bit(F_RING_EVENT_IDX)
    q = SplitQueue(arena.memory, 256, drv.desc_addr, drv.avail_addr, drv.used_addr, features)
    dev = BlkDevice(NullBackend(8 << 30))

    def serve_one() -> bool:
        chain = q.pop()
        if chain is None:
            return False
        q.push(chain.head, dev.handle(0, chain), chain.ndesc)
        q.publish()
        return True

    if engine == "native":
        eng = native.build(
            native.require_plan(dev), 0, q, arena.memory, None, None, lambda i: None, lambda *a: None
        )
        kick, stop = os.eventfd(0), os.eventfd(1)
        try:
            run_native(eng, q, None, arena.memory, kick, stop, serve_one, lambda: False)
            assert eng.counters()["bytes_read"] == 0
        finally:
            eng.close()
            os.close(kick)
            os.close(stop)
    else:
        while serve_one():
            pass
    assert q.broken is None
    assert drv.used_idx() == 2
    used = [VRING_USED_ELEM.unpack(arena.read(drv.used_addr + 4 + 8 * k, 8)) for k in (0, 1)]
    assert dict(used) == {0: 0, 200: 1}
    assert arena.read(buf + HUGE - 1, 1) == b"\xee"
    assert dev.stats.bad_chains == 1 and dev.stats.bytes_read == 0


def test_the_writable_limit_is_a_used_length() -> None:
    check_writable_total(MAX_WRITABLE)
    with pytest.raises(ChainError, match="2\\^32-1"):
        check_writable_total(MAX_WRITABLE + 1)
    assert MAX_WRITABLE == (1 << 32) - 1
