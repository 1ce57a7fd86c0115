"""The native engine on io_uring (AioMode.URING): many requests in flight, out of order.

The engine is driven directly, as test_native_engine.py and fuzz/ring_cases.py do: an
``Arena`` holds the driver's memory, a ``DriverSplitRing`` plays the driver, the engine
serves a regular file in ``tmp_path``. Completions out of order are made deterministic with
the engine's test-only gate (``TestKnobs.gate_fd``/``gate_mask``): a request whose sector
has a bit of the mask set is linked behind a one-byte read of a pipe, so it starts only when
the test writes a byte there. Direct I/O runs on an O_DIRECT file over mmap-backed driver
memory (page-aligned, so buffer alignment is chosen per test); the EFAULT that VDUSE's bounce
pages give direct I/O is produced for real with memfd_secret(2) memory (skipped where the
kernel has none), and through the engine's test-only ``TestKnobs.efault`` hook for buffered
I/O too (a FUSE file in direct-I/O mode faults there; tests/vm/test_fuse_file_e2e.py has the
real one).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvduse.backend.file import FileBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.config import (
    AioMode,
    DeviceConfig,
    EngineConfig,
    EngineTuning,
    Interrupts,
    RingLayout,
    StorageConfig,
    StorageKind,
    TestKnobs,
)
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import Completion, DriverSplitRing
from pyvduse.ring.inflight import FREE, InflightLog, LoggedQueue, log_size
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.native_worker import run_native

try:
    from pyvduse.fastpath import _splitblk_uring as uring
except ImportError:  # built without liburing-dev
    pytest.skip("the io_uring build of the native engine is not there", allow_module_level=True)

DISK = 1 << 20
BLOCK = 4096
BLOCKS = DISK // BLOCK
GATE = 1 << 9  # sectors with this bit set (blocks 64-127, 192-255) wait for the gate
OK, IOERR = vb.ReqStatus.OK, vb.ReqStatus.IOERR


def token(c: Completion) -> tuple[str, int, Any]:
    """(op, block, payload) of a request added by a ``Rig``: the read length or the data."""
    op, block, payload = cast(tuple[str, int, Any], c.token)
    return op, block, payload


def gated(block: int) -> bool:
    return bool(block * (BLOCK // 512) & GATE)


def ring_of(arena: Arena, drv: DriverSplitRing) -> RingLayout:
    """The driver's fresh ring, with event index and indirect descriptors."""
    return RingLayout(
        native.region_tuples(arena.memory),
        drv.num,
        drv.desc_addr,
        drv.avail_addr,
        drv.used_addr,
        event_idx=True,
        indirect=True,
    )


def _can_uring() -> str | None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        arena = Arena(1 << 16)
        drv = DriverSplitRing(arena, 8)
        uring.Engine(
            EngineConfig(
                ring_of(arena, drv),
                DeviceConfig(bytearray(8)),
                StorageConfig(StorageKind.FD, fd=fd),
                tuning=EngineTuning(AioMode.URING),
            )
        ).close()
    except OSError as e:
        return f"the kernel refuses io_uring: {e}"
    finally:
        os.close(fd)
    return None


_why_not = _can_uring()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


class Space:
    """The driver's DMA space over an arena: data buffers (512 bytes or more) start
    ``offset`` bytes past a 4 KiB boundary (0: aligned for direct I/O); the rest as the
    arena allocates. With an mmap-backed arena, IOVA alignment is address alignment."""

    def __init__(self, arena: Arena, offset: int | None = None) -> None:
        self.arena = arena
        self.offset = offset

    def alloc(self, size: int, align: int = 16) -> int:
        if self.offset is not None and size >= 512:
            return self.arena.alloc(size + self.offset, 4096) + self.offset
        return self.arena.alloc(size, align)

    def alloc_coherent(self, size: int, align: int = 16) -> int:
        return self.arena.alloc_coherent(size, align)

    def free(self, iova: int) -> None:
        pass

    def write(self, iova: int, data: bytes) -> None:
        self.arena.write(iova, data)

    def read(self, iova: int, length: int) -> bytes:
        return self.arena.read(iova, length)


@dataclass
class Rig:
    """A driver, a disk file with its model, and an engine serving them."""

    arena: Arena
    drv: DriverSplitRing
    num: int
    path: Path
    fd: int
    model: bytearray
    engine: uring.Engine
    log: InflightLog
    inflight: bytearray
    kick: int
    stop: int
    interrupts: list[int] = field(default_factory=list)
    errors: list[tuple[int, int, int]] = field(default_factory=list)
    gate_r: int = -1
    gate_w: int = -1
    thread: threading.Thread | None = None
    codes: list[int] = field(default_factory=list)
    errors_expected: bool = False

    # -- the driver ---------------------------------------------------------------------

    def read(self, block: int, length: int = BLOCK) -> int:
        return self.drv.add(
            [vb.OUTHDR.pack(vb.ReqType.IN, 0, block * (BLOCK // 512))],
            [length, 1],
            indirect=True,
            token=("r", block, length),
            publish=False,
        )

    def write(self, block: int, data: bytes) -> int:
        return self.drv.add(
            [vb.OUTHDR.pack(vb.ReqType.OUT, 0, block * (BLOCK // 512)), data],
            [1],
            indirect=True,
            token=("w", block, data),
            publish=False,
        )

    def flush(self) -> int:
        return self.drv.add(
            [vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], indirect=True, token=("f", 0, b""), publish=False
        )

    def go(self) -> None:
        """Publish what was added and kick."""
        self.drv.publish()
        os.eventfd_write(self.kick, 1)

    def collect(self, n: int, timeout: float = 10.0) -> list[Completion]:
        got: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            got += self.drv.collect()  # KeyError on a head completed twice
            assert time.monotonic() < deadline, f"{len(got)} of {n} completions in {timeout}s"
            time.sleep(0.0005)
        assert len(got) == n, "more completions than requests"
        return got

    def release(self, n: int) -> None:
        os.write(self.gate_w, b"g" * n)

    # -- the engine ---------------------------------------------------------------------

    def start(self) -> None:
        assert self.thread is None

        def run() -> None:
            self.codes.append(self.engine.run(self.kick, self.stop))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> int:
        """Stop run() (if it has not returned by itself) and wait for it."""
        assert self.thread is not None
        os.eventfd_write(self.stop, 1)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.thread = None
        os.eventfd_read(self.stop)
        return self.codes[-1]

    def verify(self, done: list[Completion]) -> None:
        """Check each completion against the model, then apply the writes to it (the
        requests of one batch touch distinct blocks, so their order does not matter)."""
        for c in done:
            op, block, payload = token(c)
            assert c.data[-1] == OK, f"{op} at block {block} failed"
            if op == "r":
                assert c.length == payload + 1
                assert c.data[:-1] == self.model[block * BLOCK : block * BLOCK + payload]
        for c in done:
            op, block, payload = token(c)
            if op == "w":
                self.model[block * BLOCK : block * BLOCK + len(payload)] = payload

    def log_clean(self) -> bool:
        return all(self.log.state(h)[0] == FREE for h in range(self.num))

    def log_seq(self) -> int:
        """The sequence number stored in the log (the engine's takes count there)."""
        return int(struct.unpack_from("<Q", self.log.mem, 8)[0])


def make_rig(
    tmp_path: Path,
    num: int = 64,
    *,
    arena: Arena | None = None,
    space_offset: int | None = None,
    flags: int = 0,
    gate: bool = False,
    aio: int = AioMode.URING,
    nowait: bool = False,
    direct: bool = False,
    bounce: bool = False,
    dio_align: int = 512,
    efault: int = 0,
    unpinnable: bytearray | None = None,
    on_unpinnable: Callable[[], object] | None = None,
    folder: Path | None = None,
    serial: bool = False,
) -> Rig:
    """A rig whose engine serves a file of DISK random bytes (opened with ``flags``, in
    ``folder``, default ``tmp_path``) on ``aio``; ``gate``: requests at GATE sectors wait
    for the test to release them; ``serial``: each request is waited for once submitted."""
    arena = arena or Arena(16 << 20)
    drv = DriverSplitRing(Space(arena, space_offset), num)
    path = (folder or tmp_path) / "disk.img"
    model = bytearray(os.urandom(DISK))
    path.write_bytes(model)
    fd = os.open(path, os.O_RDWR | flags)
    log = InflightLog(memoryview(bytearray(log_size(num))), num)
    log.clear()
    inflight = bytearray(num)
    gate_r, gate_w = os.pipe() if gate else (-1, -1)
    interrupts: list[int] = []
    errors: list[tuple[int, int, int]] = []
    engine = uring.Engine(
        EngineConfig(
            replace(ring_of(arena, drv), log=log.mem, inflight=inflight),
            DeviceConfig(bytearray(struct.pack("<Q", DISK)), serial=b"uring"),
            StorageConfig(
                StorageKind.FD,
                fd=fd,
                direct=direct,
                dio_align=dio_align,
                unpinnable=unpinnable,
                on_unpinnable=on_unpinnable,
            ),
            Interrupts(notify=interrupts.append, on_error=lambda *a: errors.append(a)),
            EngineTuning(AioMode(aio), bounce=bounce, nowait=nowait),
            TestKnobs(gate_fd=gate_r, gate_mask=GATE if gate else 0, efault=efault, serial=serial),
        )
    )
    return Rig(
        arena,
        drv,
        num,
        path,
        fd,
        model,
        engine,
        log,
        inflight,
        os.eventfd(0),
        os.eventfd(0),
        interrupts,
        errors,
        gate_r,
        gate_w,
    )


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    """Rigs made by a test, torn down after it (engines closed, fds closed)."""
    made: list[Rig] = []
    yield made
    for rig in made:
        if rig.thread is not None:
            rig.join()
        if rig.gate_w >= 0:
            rig.release(rig.num)
        assert rig.engine.wait_idle(5 * 10**9) == 0
        rig.engine.close()
        assert rig.errors_expected or not rig.errors, f"backend errors: {rig.errors}"
        for fd in (rig.fd, rig.kick, rig.stop, rig.gate_r, rig.gate_w):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def rig_of(tmp_path: Path, rigs: list[Rig]) -> Callable[..., Rig]:
    def make(**kw: Any) -> Rig:
        rig = make_rig(tmp_path, **kw)
        rigs.append(rig)
        return rig

    return make


def random_batch(rig: Rig, rnd: random.Random, n: int) -> None:
    for block in rnd.sample(range(BLOCKS), n):
        if rnd.random() < 0.5:
            rig.read(block)
        else:
            rig.write(block, rnd.randbytes(BLOCK))


# -- many in flight ------------------------------------------------------------------------


def test_a_full_ring_in_flight_completes_each_request_once(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of()
    rnd = random.Random(16)
    rig.start()
    for _ in range(8):
        random_batch(rig, rnd, 64)  # all 64 heads, published at once
        rig.go()
        rig.verify(rig.collect(64))
    rig.flush()
    rig.go()
    rig.verify(rig.collect(1))
    assert rig.join() == native.RUN_STOPPED
    assert rig.engine.wait_idle(10**9) == 0 and rig.engine.in_flight() == 0
    assert rig.path.read_bytes() == rig.model
    assert rig.log_clean() and rig.log_seq() == rig.engine.position()[3] == 8 * 64 + 1
    assert not any(rig.inflight)
    c = rig.engine.counters()
    assert c["completed"] == c["taken"] == 8 * 64 + 1 and c["in_flight"] == 0
    assert c["oldest_taken"] == 0 and c["started"] == 0 and rig.engine.started == 0
    assert sum(c["depth_hist"]) == c["taken"]
    assert sum(c["depth_hist"][2:]) > 0, "never more than one request in flight"
    assert c["depth_hist"][7] >= 1, "the 64 requests of a batch were never all in flight"
    assert sum(c["latency"]) == c["completed"] and c["latency_ns"] > 0
    assert c["bytes_read"] + c["bytes_written"] == 8 * 64 * BLOCK
    assert c["errors"] == 0 and not rig.errors and c["bounced"] == 0
    assert rig.engine.aio == uring.AIO_URING
    assert rig.interrupts, "the driver was never interrupted"


def serve_random_batches(rig: Rig, seed: int, rounds: int = 4, size: int = 32) -> dict[str, Any]:
    """Random reads and writes, a batch at a time, each verified; the engine's counters."""
    rnd = random.Random(seed)
    rig.start()
    for _ in range(rounds):
        random_batch(rig, rnd, size)
        rig.go()
        rig.verify(rig.collect(size))
    assert rig.join() == native.RUN_STOPPED
    assert rig.path.read_bytes() == rig.model
    c = rig.engine.counters()
    assert c["completed"] == rounds * size and c["errors"] == 0
    assert rig.log_clean() and not any(rig.inflight)
    return c


def test_reads_and_writes_the_page_cache_can_take_are_served_inline(rig_of: Callable[..., Rig]) -> None:
    """nowait (the default): a read the page cache holds and a write it absorbs are served
    at once (RWF_NOWAIT) with no io_uring submission; the results are the same."""
    c = serve_random_batches(rig_of(nowait=True), seed=3)
    assert c["inline"] > 0


def test_a_file_in_memory_is_served_inline_though_it_refuses_nowait(rig_of: Callable[..., Rig]) -> None:
    """tmpfs refuses RWF_NOWAIT (EOPNOTSUPP, Linux 6.12 to 6.18 at least), so io_uring
    could only hand each read to an io-wq thread (2.2 times slower in the test VM): reads
    and writes of a file in memory are served inline, blocking, which cannot wait for a
    device there."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize < 4 * DISK:
        pytest.skip("no /dev/shm with room")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        c = serve_random_batches(rig_of(nowait=True, folder=folder), seed=5)
        assert c["inline"] == c["completed"]
        assert sum(c["depth_hist"][2:]) == 0, "a request went to io_uring"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_completions_arrive_in_the_order_requests_finish(rig_of: Callable[..., Rig]) -> None:
    """Gated requests start only when the test says: the ones behind them complete first,
    the used ring carries completion order, and everything still verifies."""
    rig = rig_of(gate=True)
    rnd = random.Random(3)
    blocks = rnd.sample(range(BLOCKS), 32)
    order: list[int] = []
    for block in blocks:
        order.append(rig.write(block, rnd.randbytes(BLOCK)) if rnd.random() < 0.5 else rig.read(block))
    slow = [h for h, b in zip(order, blocks, strict=True) if gated(b)]
    assert slow and len(slow) < len(order)
    rig.start()
    rig.go()
    fast = rig.collect(len(order) - len(slow))
    assert {c.head for c in fast} == set(order) - set(slow)
    time.sleep(0.05)
    assert not rig.drv.collect(), "a gated request completed before its gate opened"
    c = rig.engine.counters()
    assert rig.engine.in_flight() == c["in_flight"] == len(slow)
    first_slow = order.index(slow[0]) + 1  # take numbers are 1-based, in avail order
    assert c["oldest_taken"] == first_slow and rig.engine.started > 0
    assert all(rig.inflight[h] for h in slow) and sum(rig.inflight) == len(slow)
    rig.release(len(slow))
    late = rig.collect(len(slow))
    used_order = [x.head for x in fast + late]
    assert used_order != order and sorted(used_order) == sorted(order)
    rig.verify(fast + late)
    rig.join()
    assert rig.engine.in_flight() == 0 and rig.log_clean()
    assert rig.path.read_bytes() == rig.model


def test_publishing_runs_with_out_of_order_completions_and_the_log(rig_of: Callable[..., Rig]) -> None:
    """Between publishes the log holds COMPLETED heads in any order, IN_FLIGHT ones beside
    them, and base is the used index of the batch: checked while gated requests wait."""
    rig = rig_of(gate=True)
    heads = [rig.read(b) for b in (0, 64, 1, 65, 2)]  # 64 and 65 are gated
    rig.start()
    rig.go()
    rig.collect(3)
    for h, b in zip(heads, (0, 64, 1, 65, 2), strict=True):
        assert rig.log.state(h)[0] == (1 if gated(b) else FREE)
    assert rig.log.last_avail == 5 and rig.log.base in (0, 1, 2)
    rig.release(2)
    rig.verify(rig.collect(2))
    assert rig.log_clean() and rig.log.base in (3, 4)


# -- stopping with requests in flight -------------------------------------------------------


def test_wait_idle_reaps_pushes_and_interrupts(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of(gate=True)
    for b in (64, 65, 66, 1):
        rig.read(b)
    rig.start()
    rig.go()
    rig.collect(1)
    assert rig.join() == native.RUN_STOPPED  # and returns with three in flight
    assert rig.engine.in_flight() == 3
    with pytest.raises(RuntimeError, match="in flight"):
        rig.engine.close()
    assert rig.engine.wait_idle(20_000_000) == 3  # nothing can finish: the gate is shut
    assert rig.engine.in_flight() == 3  # it gave up at its timeout, with all three kept
    before = len(rig.interrupts)
    rig.drv.set_used_event(rig.drv.last_used)  # event idx: interrupt at the next completion
    rig.release(3)
    assert rig.engine.wait_idle(5 * 10**9) == 0
    assert len(rig.interrupts) > before, "wait_idle published without an interrupt"
    rig.verify(rig.collect(3, timeout=0.1))  # already published
    assert rig.engine.position()[1] == 4 and rig.log_clean()
    assert rig.engine.wait_idle(0) == 0


def test_abandon_writes_no_byte_and_drops_what_completes(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of(gate=True)
    for b in (64, 65, 66):
        rig.write(b, os.urandom(BLOCK))
    rig.read(67)
    rig.read(0)
    rig.start()
    rig.go()
    rig.collect(1)
    rig.join()
    memory, log = bytes(rig.arena.buf), bytes(rig.log.mem)
    inflight, interrupts = bytes(rig.inflight), len(rig.interrupts)
    rig.engine.abandon()
    with pytest.raises(RuntimeError, match="abandoned"):
        rig.engine.run(rig.kick, rig.stop)
    rig.release(4)
    assert rig.engine.wait_idle(5 * 10**9) == 0 and rig.engine.in_flight() == 0
    time.sleep(0.02)
    assert bytes(rig.arena.buf) == memory, "driver memory changed after abandon()"
    assert bytes(rig.log.mem) == log, "the log changed after abandon()"
    assert bytes(rig.inflight) == inflight and len(rig.interrupts) == interrupts
    assert not rig.errors
    rig.engine.close()


def test_poisoned_requests_fail_whatever_the_backend_did(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of(gate=True)
    r1 = rig.read(64)
    w1 = rig.write(65, os.urandom(BLOCK))
    rig.start()
    rig.go()
    deadline = time.monotonic() + 5
    while rig.engine.in_flight() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    rig.engine.poison_in_flight()  # while run() serves: requests are numbered at take
    r2 = rig.read(1)  # taken after: not poisoned
    rig.go()
    (fine,) = rig.collect(1)
    assert fine.head == r2 and fine.data[-1] == OK
    rig.release(2)
    done = {c.head: c for c in rig.collect(2)}
    assert done[r1].data[-1] == IOERR and done[r1].length == 1
    assert done[w1].data[-1] == IOERR
    assert rig.engine.counters()["errors"] == 2 and not rig.errors
    assert rig.log_clean()


def test_old_regions_live_while_requests_use_them(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of(gate=True)
    backing = rig.arena.buf
    assert isinstance(backing, bytearray)
    old = memoryview(backing)
    rig.engine.set_regions([(0, len(backing) - 1, old, True)])
    rig.read(64)
    rig.start()
    rig.go()
    deadline = time.monotonic() + 5
    while rig.engine.in_flight() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    rig.join()
    new = memoryview(backing)
    rig.engine.set_regions([(0, len(backing) - 1, new, True)])
    with pytest.raises(BufferError):
        old.release()  # the engine still holds it: the read in flight points into it
    rig.read(2)  # served under the new regions
    rig.start()
    rig.go()
    rig.verify(rig.collect(1))
    rig.release(1)
    rig.verify(rig.collect(1))
    rig.join()
    old.release()  # let go once the last request taken under it completed


def test_an_engine_dropped_with_requests_in_flight_leaks_their_memory(tmp_path: Path) -> None:
    """Deallocated with a transfer still in the kernel, the engine keeps (leaks) the driver
    memory it points into instead of letting it go."""
    rig = make_rig(tmp_path, 8, gate=True)
    rig.read(64)
    rig.start()
    rig.go()
    deadline = time.monotonic() + 5
    while rig.engine.in_flight() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    rig.join()
    region = rig.arena.memory.regions[0].mem
    engine = rig.engine
    del rig.engine
    del engine  # dealloc with one request in flight
    with pytest.raises(BufferError):
        region.release()  # still exported: leaked on purpose
    rig.release(1)
    for fd in (rig.fd, rig.kick, rig.stop, rig.gate_r, rig.gate_w):
        os.close(fd)


# -- a hostile driver -----------------------------------------------------------------------


def test_a_head_offered_again_while_in_flight_is_left_to_python(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of(gate=True)
    head = rig.read(64)
    rig.start()
    rig.go()
    deadline = time.monotonic() + 5
    while rig.engine.in_flight() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    rig.drv.set_avail_entry(rig.drv.avail_idx, head)  # the same head again
    rig.drv.set_avail_idx(rig.drv.avail_idx + 1)
    os.eventfd_write(rig.kick, 1)
    assert rig.thread is not None
    rig.thread.join(5)
    assert rig.codes == [native.RUN_DEFER]
    rig.thread = None
    assert rig.engine.position()[0] == 1, "the engine took the head twice"
    assert rig.inflight[head] == 1 and rig.engine.in_flight() == 1
    assert rig.engine.counters()["taken"] == 1
    rig.release(1)
    assert rig.engine.wait_idle(5 * 10**9) == 0 and rig.inflight[head] == 0


# -- with the Python engine on the same ring --------------------------------------------------


def test_python_serves_a_deferred_chain_while_requests_stay_in_flight(rig_of: Callable[..., Rig]) -> None:
    """A DISCARD among reads: C defers it, Python serves it on the same ring and log while
    C's gated requests stay in io_uring, then C carries on; each completes once."""
    rig = rig_of(gate=True)
    q = SplitQueue(
        rig.arena.memory,
        rig.num,
        rig.drv.desc_addr,
        rig.drv.avail_addr,
        rig.drv.used_addr,
        bit(F_RING_INDIRECT_DESC) | bit(F_RING_EVENT_IDX),
    )
    lq = LoggedQueue(q, rig.log)
    dev = BlkDevice(FileBackend(str(rig.path)))
    served: list[int] = []

    def serve_one() -> bool:
        chain = lq.pop()
        if chain is None:
            return False
        served.append(chain.head)
        lq.push(chain.head, dev.handle(0, chain))
        lq.publish()
        return True

    slow = [rig.read(b) for b in (64, 65)]
    seg = vb.DISCARD_SEGMENT.pack(8, 8, 0)  # block 1
    discard = rig.drv.add(
        [vb.OUTHDR.pack(vb.ReqType.DISCARD, 0, 0), seg],
        [1],
        indirect=True,
        token=("d", 1, b""),
        publish=False,
    )
    after = rig.read(2)
    rig.drv.publish()
    stopping = threading.Event()
    worker = threading.Thread(
        target=run_native,
        args=(rig.engine, q, rig.log, rig.arena.memory, rig.kick, rig.stop, serve_one, stopping.is_set),
        daemon=True,
    )
    worker.start()
    got = rig.collect(2)
    assert [c.head for c in got] == [discard, after]
    assert served == [discard] and rig.engine.in_flight() == 2
    rig.release(2)
    got += rig.collect(2)
    assert sorted(c.head for c in got) == sorted([*slow, discard, after])
    stopping.set()
    os.eventfd_write(rig.stop, 1)
    worker.join(5)
    assert not worker.is_alive()
    os.eventfd_read(rig.stop)
    assert rig.engine.wait_idle(10**9) == 0 and rig.log_clean()
    assert rig.log.seq == rig.log_seq() == 4 and q.position()[:2] == (4, 4)
    rig.model[BLOCK : 2 * BLOCK] = bytes(BLOCK)
    rig.verify([c for c in got if token(c)[0] == "r"])
    dev.backend.close()


# -- direct I/O -----------------------------------------------------------------------------


def _direct_flags(tmp_path: Path) -> int:
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"{tmp_path} cannot do O_DIRECT")
        raise
    return os.O_DIRECT


def mmap_arena(size: int) -> Arena:
    """An arena whose IOVA alignment is the address alignment (mmap is page-aligned)."""
    return Arena(size, buf=memoryview(mmap.mmap(-1, size)))


@pytest.mark.parametrize("aio", ["sync", "uring"])
@pytest.mark.parametrize(
    ("offset", "bounce", "copied"),
    [
        (0, False, False),  # aligned buffers: straight into driver memory
        (8, False, True),  # not aligned: through the engine's buffers
        (0, True, True),  # bounce=True: copied from the start
    ],
)
def test_direct_io(
    tmp_path: Path, rigs: list[Rig], aio: str, offset: int, bounce: bool, copied: bool
) -> None:
    flags = _direct_flags(tmp_path)
    rig = make_rig(
        tmp_path,
        32,
        arena=mmap_arena(4 << 20),
        space_offset=offset,
        flags=flags,
        direct=True,
        bounce=bounce,
        aio=uring.AIO_URING if aio == "uring" else uring.AIO_SYNC,
    )
    rigs.append(rig)
    rnd = random.Random(offset)
    rig.start()
    for _ in range(3):
        random_batch(rig, rnd, 32)
        rig.go()
        rig.verify(rig.collect(32))
    rig.read(3, 3 * BLOCK)  # several blocks in one request
    rig.go()
    rig.verify(rig.collect(1))
    rig.join()
    c = rig.engine.counters()
    assert c["bounced"] == (3 * 32 + 1 if copied else 0) and c["efaults"] == 0
    assert c["bounce_all"] == bounce and not rig.errors
    assert rig.path.read_bytes() == rig.model


def test_direct_io_at_an_unaligned_offset_is_left_to_python(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = make_rig(
        tmp_path,
        8,
        arena=mmap_arena(1 << 20),
        space_offset=0,
        flags=_direct_flags(tmp_path),
        direct=True,
        dio_align=4096,
    )
    rigs.append(rig)
    rig.drv.add([vb.OUTHDR.pack(vb.ReqType.IN, 0, 1)], [4096, 1], indirect=True)  # sector 1
    rig.drv.publish()
    os.eventfd_write(rig.stop, 1)
    assert rig.engine.run(rig.kick, rig.stop) == native.RUN_DEFER
    assert rig.engine.position()[0] == 0
    os.eventfd_read(rig.stop)


@pytest.mark.parametrize(
    ("aio", "cache"),
    [
        ("sync", "none"),
        ("uring", "none"),  # O_DIRECT: VDUSE's bounce pages
        ("sync", "writeback"),
        ("uring", "writeback"),  # a FUSE file in direct-I/O mode
        ("uring-nowait", "writeback"),  # ... whose inline attempt (RWF_NOWAIT) faults
    ],
)
def test_efault_makes_the_engine_copy_from_then_on(
    tmp_path: Path, rigs: list[Rig], aio: str, cache: str
) -> None:
    """Through the test-only hook: the first transfers between the file and driver memory
    'fail' with EFAULT as they do where the kernel cannot pin VDUSE's bounce pages (O_DIRECT,
    or any I/O on a virtiofs file with cache=none); they are redone through the engine's
    buffers, every request after is copied from the start, the storage's shared byte says
    so and the engine that set it tells Python once. A second engine of the same storage
    copies from its start, with no EFAULT of its own."""
    direct = cache == "none"
    flags = _direct_flags(tmp_path) if direct else 0
    shared, told = bytearray(1), []
    mode = uring.AIO_SYNC if aio == "sync" else uring.AIO_URING
    rig = make_rig(
        tmp_path,
        16,
        arena=mmap_arena(2 << 20),
        space_offset=0,
        flags=flags,
        direct=direct,
        aio=mode,
        nowait=aio == "uring-nowait",
        efault=2,
        unpinnable=shared,
        on_unpinnable=lambda: told.append(1),
    )
    rigs.append(rig)
    rnd = random.Random(5)
    rig.start()
    for _ in range(2):
        random_batch(rig, rnd, 16)
        rig.go()
        rig.verify(rig.collect(16))
    rig.join()
    c = rig.engine.counters()
    assert c["efaults"] == (2 if aio == "uring" else 1) and c["bounce_all"] == 1
    assert shared == b"\1" and told == [1], "not said exactly once"
    assert 16 + 1 <= c["bounced"] <= 32, "after the EFAULT every request is copied"
    assert c["inline"] == 0 or aio == "uring-nowait"
    assert not rig.errors and rig.path.read_bytes() == rig.model

    again = make_rig(
        tmp_path,
        16,
        arena=mmap_arena(2 << 20),
        space_offset=0,
        flags=flags,
        direct=direct,
        aio=mode,
        unpinnable=shared,
        on_unpinnable=lambda: told.append(2),
    )
    rigs.append(again)
    again.start()
    random_batch(again, rnd, 16)
    again.go()
    again.verify(again.collect(16))
    again.join()
    c = again.engine.counters()
    assert (c["efaults"], c["bounce_all"], c["bounced"], told) == (0, 1, 16, [1])
    assert again.path.read_bytes() == again.model


def _secret_arena(size: int) -> Arena:
    """Driver memory the kernel cannot pin, like VDUSE's bounce pages: memfd_secret(2)
    pages are mapped in this process only, so direct I/O into them fails with EFAULT."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(447, 0)  # memfd_secret, x86-64 and arm64
    if fd < 0:
        pytest.skip(f"no memfd_secret: {os.strerror(ctypes.get_errno())}")
    try:
        os.ftruncate(fd, size)
        mem = mmap.mmap(fd, size)
    except OSError as e:
        pytest.skip(f"memfd_secret memory cannot be mapped: {e}")
    finally:
        os.close(fd)
    return Arena(size, buf=memoryview(mem))


@pytest.mark.parametrize("aio", ["sync", "uring"])
def test_efault_from_memory_the_kernel_cannot_pin(tmp_path: Path, rigs: list[Rig], aio: str) -> None:
    flags = _direct_flags(tmp_path)
    rig = make_rig(
        tmp_path,
        16,
        arena=_secret_arena(1 << 20),
        space_offset=0,
        flags=flags,
        direct=True,
        aio=uring.AIO_URING if aio == "uring" else uring.AIO_SYNC,
    )
    rigs.append(rig)
    rnd = random.Random(7)
    rig.start()
    for _ in range(2):
        for block in rnd.sample(range(BLOCKS), 8):
            rig.write(block, rnd.randbytes(BLOCK))
        rig.go()
        rig.verify(rig.collect(8))
        for block in rnd.sample(range(BLOCKS), 8):
            rig.read(block)
        rig.go()
        rig.verify(rig.collect(8))
    rig.join()
    c = rig.engine.counters()
    assert c["efaults"] >= 1 and c["bounce_all"] == 1 and not rig.errors
    assert c["bounced"] == 32  # each request once, copied from the start or after EFAULT
    if aio == "sync":
        assert c["efaults"] == 1
    assert rig.path.read_bytes() == rig.model


# -- the end of the file, errors, the build -----------------------------------------------------


@pytest.mark.parametrize("aio", ["sync", "uring"])
def test_reads_past_the_end_of_the_file_read_zeroes(rig_of: Callable[..., Rig], aio: str) -> None:
    """A file shorter than the capacity: a read across its end is short, the rest is
    submitted again and reads 0 bytes, so it is zeroes, as the synchronous path does."""
    rig = rig_of(aio=uring.AIO_URING if aio == "uring" else uring.AIO_SYNC)
    os.truncate(rig.path, DISK // 2)
    rig.model[DISK // 2 :] = bytes(DISK // 2)
    half = BLOCKS // 2
    rig.read(half - 1, 2 * BLOCK)  # across the end
    rig.read(half + 3, 3 * BLOCK)  # wholly past it
    rig.read(half - 5, 4 * BLOCK)  # before it
    rig.start()
    rig.go()
    rig.verify(rig.collect(3))
    rig.write(half + 8, os.urandom(BLOCK))  # a write past the end extends the file
    rig.go()
    rig.verify(rig.collect(1))
    rig.read(half + 8)
    rig.go()
    rig.verify(rig.collect(1))
    assert rig.engine.counters()["bytes_read"] == 10 * BLOCK


def test_a_sync_engine_has_nothing_in_flight_once_run_returns(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of(aio=uring.AIO_SYNC)
    assert rig.engine.aio == uring.AIO_SYNC
    for b in range(4):
        rig.read(b)
    os.eventfd_write(rig.stop, 1)
    rig.drv.publish()
    assert rig.engine.run(rig.kick, rig.stop) == native.RUN_STOPPED
    os.eventfd_read(rig.stop)
    assert rig.engine.in_flight() == 0 and rig.engine.wait_idle(0) == 0
    rig.verify(rig.collect(4, timeout=0.1))
    c = rig.engine.counters()
    assert c["depth_hist"][1] == 4 and c["taken"] == 4 and c["oldest_taken"] == 0
    rig.engine.abandon()  # nothing to drop; the engine is done
    with pytest.raises(RuntimeError):
        rig.engine.run(rig.kick, rig.stop)


def engine_fds(path: Path, besides: int) -> list[int]:
    """The fds of ``path`` in this process but ``besides``: the engines' own."""
    fds = [int(n) for n in os.listdir("/proc/self/fd") if n != str(besides)]
    return [fd for fd in fds if _names(fd, path)]


def _names(fd: int, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(path)
    except OSError:  # the fd listdir itself used, gone now
        return False


def test_backend_errors_fail_the_request_and_are_reported(rig_of: Callable[..., Rig]) -> None:
    rig = rig_of()
    rig.errors_expected = True
    rig.read(1)
    rig.start()
    rig.go()
    rig.verify(rig.collect(1))
    rig.join()
    (own,) = engine_fds(rig.path, besides=rig.fd)
    readonly = os.open(rig.path, os.O_RDONLY)
    os.dup2(readonly, own)  # the engine's own fd now names a read-only file
    os.close(readonly)
    w = rig.drv.add([vb.OUTHDR.pack(vb.ReqType.OUT, 0, 0), bytes(BLOCK)], [1], indirect=True)
    rig.start()
    rig.go()
    (c,) = rig.collect(1)
    assert c.head == w and c.data[-1] == IOERR
    assert rig.errors and rig.errors[0][0] == vb.ReqType.OUT
    assert rig.errors[0][2] in (errno.EBADF, errno.EINVAL)


def test_the_engine_serves_its_own_fd_of_the_file_whatever_takes_the_callers_number(
    rig_of: Callable[..., Rig],
) -> None:
    """Issue 34: the README's test command hung for good in the differential fuzzer, the
    engine waiting in sb_uring_wait (test_serial) with no io-wq worker in the process. One
    state that gives exactly that: the number of the engine's fd closed under it (the
    caller's close, a stray close of a stale number) and taken by a pipe or an eventfd,
    which an io_uring read then waits on for good. The engine serves its own duplicate of
    the file's fd, so what happens to the caller's number changes nothing."""
    rig = rig_of(serial=True)
    r, w = os.pipe()
    os.dup2(r, rig.fd)  # the caller's number now names a pipe nobody writes to
    os.close(r)
    try:
        for block in (3, 7):
            rig.read(block)
        rig.write(5, bytes(range(256)) * (BLOCK // 256))
        rig.start()
        rig.go()
        try:
            done = rig.collect(3)
        except AssertionError:
            os.write(w, bytes(3 * BLOCK))  # let the reads of the pipe end, for the teardown
            rig.errors_expected = True  # the write to the pipe's read end fails
            raise
        rig.verify(done)
        assert rig.join() == native.RUN_STOPPED
        assert rig.engine.wait_idle(0) == 0
    finally:
        os.close(w)
    with open(rig.path, "rb") as f:
        assert f.read() == rig.model


class Alarm(Exception):
    pass


def _raise_alarm(signum: int, frame: object) -> None:
    raise Alarm


@pytest.mark.parametrize("where", ["run, idle", "run, serial", "wait_idle"])
def test_a_signal_handler_that_raises_ends_the_engines_waits(rig_of: Callable[..., Rig], where: str) -> None:
    """A hang in the engine fails its own test with its stack, and Ctrl-C ends it: a signal
    handler that raises (pytest-timeout's SIGALRM) runs while run() or wait_idle() waits on
    the main thread -- in poll(2) with nothing to do, for a request under test_serial
    (where issue 34's run waited), for the requests in flight -- and the call raises what
    it raised. Requests in flight stay (as after a stop); ``safety`` ends the wait if the
    signal does not."""
    rig = rig_of(gate=True, serial=where == "run, serial")
    block = next(b for b in range(BLOCKS) if gated(b))
    if where != "run, idle":
        rig.read(block)
    rig.drv.publish()
    if where == "wait_idle":  # submitted, then run() returns at once
        os.eventfd_write(rig.stop, 1)
        assert rig.engine.run(rig.kick, rig.stop) == native.RUN_STOPPED
        os.eventfd_read(rig.stop)
    fired: list[bool] = []

    def safety() -> None:
        fired.append(True)
        rig.release(1)
        os.eventfd_write(rig.stop, 1)

    timer = threading.Timer(10, safety)
    old = signal.signal(signal.SIGALRM, _raise_alarm)
    timer.start()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Alarm):
            if where == "wait_idle":
                rig.engine.wait_idle(60 * 10**9)
            else:
                rig.engine.run(rig.kick, rig.stop)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        timer.cancel()
        timer.join()
    assert not fired, "the signal handler ran only once the wait had ended by itself"
    assert rig.engine.in_flight() == (0 if where == "run, idle" else 1)
    rig.release(1)
    assert rig.engine.wait_idle(5 * 10**9) == 0
    if where != "run, idle":
        rig.verify(rig.collect(1))


def test_build_passes_the_new_arguments_and_defaults_to_sync(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(DISK))
    dev = BlkDevice(FileBackend(str(img)))
    arena = Arena(1 << 16)
    drv = DriverSplitRing(arena, 8)
    q = SplitQueue(arena.memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)
    assert native.uring_built()
    sync = native.build(
        native.require_plan(dev), 0, q, arena.memory, None, None, lambda i: None, lambda *a: None
    )
    assert sync.aio == native.AIO_SYNC
    sync.close()
    shared = bytearray(8)
    eng = native.build(
        native.require_plan(dev),
        0,
        q,
        arena.memory,
        None,
        None,
        lambda i: None,
        lambda *a: None,
        tuning=EngineTuning(AioMode.URING),
        inflight=shared,
    )
    assert eng.aio == native.AIO_URING and eng.in_flight() == 0
    drv.add([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [512, 1])
    kick, stop = os.eventfd(0), os.eventfd(1)
    try:
        assert eng.run(kick, stop) == native.RUN_STOPPED
        assert eng.wait_idle(5 * 10**9) == 0 and drv.used_idx() == 1
        assert not any(shared)
    finally:
        eng.close()
        os.close(kick)
        os.close(stop)
    with pytest.raises(ValueError, match="inflight"):
        native.build(
            native.require_plan(dev),
            0,
            q,
            arena.memory,
            None,
            None,
            lambda i: None,
            lambda *a: None,
            inflight=bytearray(4),
        )
    dev.backend.close()


def test_engine_py_falls_back_to_the_build_without_liburing() -> None:
    code = (
        "import sys; sys.modules['pyvduse.fastpath._splitblk_uring'] = None\n"
        "sys.modules['pyvduse.fastpath._splitblk_full'] = None\n"
        "from pyvduse.fastpath import engine\n"
        "assert engine.available() and not engine.uring_built()\n"
        "assert engine._splitblk.__name__ == 'pyvduse.fastpath._splitblk'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYVDUSE_NO_NATIVE"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_the_build_without_liburing_refuses_uring() -> None:
    try:
        from pyvduse.fastpath import _splitblk as plain
    except ImportError:
        pytest.skip("the build without liburing is not there")
    assert plain.HAS_URING == 0 and uring.HAS_URING == 1
    arena = Arena(1 << 16)
    drv = DriverSplitRing(arena, 8)
    with pytest.raises(ValueError, match="io_uring"):
        plain.Engine(
            EngineConfig(
                ring_of(arena, drv),
                DeviceConfig(bytearray(8)),
                StorageConfig(StorageKind.FD, fd=0),
                tuning=EngineTuning(AioMode.URING),
            )
        )


def test_without_io_uring_in_the_build_files_stay_on_the_native_engine(tmp_path: Path) -> None:
    """The default --aio io_uring on a build without liburing: the native engine serves the
    file with synchronous I/O (not the Python engine), and says so once for all queues."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    code = (
        "import sys, logging, io\n"
        "sys.modules['pyvduse.fastpath._splitblk_uring'] = None\n"
        "sys.modules['pyvduse.fastpath._splitblk_full'] = None\n"
        "out = io.StringIO(); logging.basicConfig(stream=out, level=logging.INFO)\n"
        "from pyvduse import BlkDevice, BlkDriver, BlkOptions, FileBackend, ModelRig\n"
        "from pyvduse.fastpath import engine\n"
        "from pyvduse.runtime.native_worker import NativeQueueWorker\n"
        "assert engine.available() and not engine.uring_built()\n"
        f"dev = BlkDevice(FileBackend({str(image)!r}), BlkOptions(num_queues=2))\n"
        "with ModelRig(dev) as rig:\n"
        "    disk = BlkDriver(rig.kernel)\n"
        "    disk.write(0, b'n' * 4096)\n"
        "    assert disk.read(0, 4096) == b'n' * 4096\n"
        "    workers = list(rig.server.workers.values())\n"
        "    assert len(workers) == 2 and all(isinstance(w, NativeQueueWorker) for w in workers)\n"
        "    assert {w.aio for w in workers} == {'sync'}\n"
        "text = out.getvalue()\n"
        "assert text.count('has no io_uring') == 1, text\n"
        "assert 'served by the Python engine' not in text and '(native data path)' in text, text\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYVDUSE_NO_NATIVE"}
    p = subprocess.run([sys.executable, "-c", code], env=env, timeout=60, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
