"""The native data path (pyvduse.fastpath) against the Python engine it must agree with.

Two kinds of evidence: property tests that serve the same hostile ring with both engines and
require byte-identical results (driver memory, the disk, what was served, whether the queue
broke), and the model's virtio-blk driver doing real I/O through each data path.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.ring_cases import (
    CaseMemory,
    SplitCase,
    build_case,
    build_request_case,
    compare,
    serve,
)
from pyvduse.abi import virtio_blk as vb
from pyvduse.backend.file import FileBackend
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.config import NEVER, EngineTuning
from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.chain import Chain
from pyvduse.ring.inflight import FREE, InflightLog, log_size
from pyvduse.runtime.native_worker import NativeQueueWorker
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.runtime.worker import QueueWorker
from pyvduse.testing.rig import ModelRig

MiB = 1 << 20


def test_the_extension_is_built_where_ci_requires_it() -> None:
    if os.environ.get("PYVDUSE_REQUIRE_NATIVE") == "1":
        assert native.available(), "pip install did not build pyvduse/fastpath/_splitblk.c"


needs_native = pytest.mark.skipif(not native.available(), reason="native extension not built")
pytestmark = needs_native


def both(build: Callable[[bytes], SplitCase], data: bytes) -> None:
    logging.disable(logging.WARNING)  # bad requests are logged, rate-limited
    try:
        compare(lambda: build(data))
    finally:
        logging.disable(logging.NOTSET)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=8, max_size=400))
def test_requests_with_corruptions_are_served_identically(data: bytes) -> None:
    both(build_request_case, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=16, max_size=700))
def test_garbage_rings_are_served_identically(data: bytes) -> None:
    both(build_case, data)


def _read_over_avail_idx(_: bytes) -> SplitCase:
    """Two requests; the first (an IN the native loop serves) reads zeroes over avail->idx,
    the second (an unknown type) the native loop leaves to Python."""
    mem = CaseMemory(huge=False)
    arena = mem
    drv = DriverSplitRing(arena, 8)
    data = arena.alloc(0, 4096)
    hdr, odd, status = data, data + 16, data + 32
    arena.write(hdr, vb.OUTHDR.pack(vb.ReqType.IN, 0, 0))
    arena.write(odd, vb.OUTHDR.pack(99, 0, 0))
    drv.write_desc(0, hdr, 16, 1, 1)
    drv.write_desc(1, drv.avail_addr + 2, 2, 3, 2)  # the data buffer: avail->idx itself
    drv.write_desc(2, status, 1, 2, 0)
    drv.write_desc(3, odd, 16, 1, 4)
    drv.write_desc(4, status + 1, 1, 2, 0)
    drv.set_avail_entry(0, 0)
    drv.set_avail_idx(2)
    drv.set_avail_entry(1, 3)
    return SplitCase(mem, drv, 8, 0, mem.flat())


def test_a_hand_off_keeps_the_avail_index_as_read() -> None:
    """The Python engine alone takes both requests it read avail->idx for; handing the ring
    over after the first used to drop the index it had read, so the engines served 1 and 2
    requests (the Python engine then read the zeroes and broke the ring at once)."""
    both(_read_over_avail_idx, b"")
    assert serve(_read_over_avail_idx(b""))[0] == 2


# -- through the model's driver ----------------------------------------------------------


def device(backend: object = None, **opts: object) -> BlkDevice:
    return BlkDevice(backend or MemoryBackend(8 * MiB), BlkOptions(**opts))  # type: ignore[arg-type]


@pytest.mark.parametrize("path", [DataPath.NATIVE, DataPath.PYTHON])
def test_io_through_each_data_path(path: DataPath, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 * MiB))
    for backend in (MemoryBackend(4 * MiB), FileBackend(str(img)), NullBackend(4 * MiB)):
        dev = device(backend, serial="native-1", num_queues=2)
        with ModelRig(dev, data_path=path) as rig:
            drv = BlkDriver(rig.kernel)
            kind = NativeQueueWorker if path is DataPath.NATIVE else QueueWorker
            assert all(type(w) is kind for w in rig.server.workers.values())
            data = os.urandom(192 * 1024)
            for q in (0, 1):
                drv.write(8192 * q, data, queue=q)
                got = drv.read(8192 * q, len(data), queue=q)
                assert got == (bytes(len(data)) if backend.kind == "null" else data)
            drv.flush()
            assert drv.get_id() == "native-1"
            drv.discard(0, 4096)  # not on the native path: served by Python in between
            assert drv.read(0, 4096) == bytes(4096)
            with pytest.raises(BlkIOError):
                drv.read(4 * MiB - 512, 1024)  # past the end
            st = dev.stats
            assert st.by_type[vb.ReqType.OUT] == 2 and st.by_type[vb.ReqType.IN] == 4
            assert st.by_type[vb.ReqType.DISCARD] == 1 and st.errors == 1
            assert st.bytes_written == 2 * len(data)
            workers = rig.server.workers.values()
            assert sum(w.completed for w in workers) >= 9
            if path is DataPath.NATIVE:  # Python took only the discard and first touches
                assert sum(w.deferred for w in workers if isinstance(w, NativeQueueWorker)) <= 4

            assert sum(c.completed for c in rig.server.queue_counters.values()) >= 9
        if isinstance(backend, FileBackend):
            assert img.read_bytes()[8192 : 8192 + len(data)] == data


def test_readonly_and_resize_are_seen_by_the_native_path() -> None:
    dev = device(readonly=True)
    with ModelRig(dev, data_path=DataPath.NATIVE) as rig:
        drv = BlkDriver(rig.kernel)
        with pytest.raises(BlkIOError):
            drv.write(0, bytes(512))
        drv.flush()
    dev = device()
    with ModelRig(dev, data_path=DataPath.NATIVE) as rig:
        drv = BlkDriver(rig.kernel)
        drv.read(6 * MiB, 512)
        dev.set_capacity(4 * MiB)  # one store, seen by the running loop
        with pytest.raises(BlkIOError):
            drv.read(6 * MiB, 512)


def test_backend_errors_fail_the_request_and_are_logged(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "short.img"
    img.write_bytes(bytes(MiB))
    backend = FileBackend(str(img), direct=False)  # closes its one descriptor below
    dev = device(backend)
    with ModelRig(dev, data_path=DataPath.NATIVE) as rig:
        drv = BlkDriver(rig.kernel)
        drv.read(0, 512)
        # The engines' own fds of the file (each serves a duplicate) now refuse reads
        path = os.path.realpath(img)
        own = [n for n in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{n}") == path]
        writeonly = os.open(img, os.O_WRONLY)
        for n in own:
            if n != str(backend.fd):
                os.dup2(writeonly, int(n))
        os.close(writeonly)
        with pytest.raises(BlkIOError), caplog.at_level(logging.WARNING):
            drv.read(0, 512)
        assert "failed" in caplog.text


class CustomBlk(BlkDevice):
    """A device that changes ``handle``: only the Python engine can serve it."""

    def handle(self, queue: int, chain: Chain) -> int:
        return super().handle(queue, chain)


class CustomBackend(NullBackend):
    """A backend that changes how data moves: only its own methods may serve it."""

    kind = "custom"

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        super().readv(offset, bufs)


class Renamed(NullBackend):
    """A subclass that moves data as NullBackend does: the native path may serve it."""

    kind = "renamed"


def test_devices_the_native_path_does_not_serve_keep_the_python_worker() -> None:
    assert native.why_not(BlkDevice(Renamed(MiB)), packed=False) is None
    for dev in (CustomBlk(MemoryBackend(MiB)), BlkDevice(CustomBackend(MiB))):
        assert native.why_not(dev, packed=False) is not None
        with ModelRig(dev) as rig:
            BlkDriver(rig.kernel).read(0, 512)
            assert all(type(w) is QueueWorker for w in rig.server.workers.values())
    assert "split rings only" in (native.why_not(device(), packed=True) or "")


def test_the_log_is_clean_after_native_serving() -> None:
    """The native loop keeps the in-flight log exactly as the Python engine does."""
    from pyvduse.model.arena import Arena
    from pyvduse.model.split_driver import DriverSplitRing
    from pyvduse.ring.inflight import LoggedQueue
    from pyvduse.ring.split import SplitQueue
    from pyvduse.runtime.native_worker import run_native

    arena = Arena(1 << 16)
    drv = DriverSplitRing(arena, 8)
    dev = device()
    log = InflightLog(memoryview(bytearray(log_size(8))), 8)
    for n in range(20):
        drv.add([vb.OUTHDR.pack(vb.ReqType.IN if n % 3 else 99, 0, n)], [512, 1])
        q = SplitQueue(
            arena.memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0, last_avail_idx=n, used_idx=n
        )
        lq = LoggedQueue.fresh(q, log) if n == 0 else LoggedQueue(q, log)
        eng = native.build(
            native.require_plan(dev), 0, q, arena.memory, log, None, lambda i: None, lambda *a: None
        )
        kick, stop = os.eventfd(0), os.eventfd(1)

        def one(lq: LoggedQueue = lq) -> bool:
            chain = lq.pop()
            if chain is None:
                return False
            lq.push(chain.head, dev.handle(0, chain))
            lq.publish()
            return True

        run_native(eng, q, log, arena.memory, kick, stop, one, lambda: False)
        os.close(kick)
        os.close(stop)
        drv.collect()
        assert log.last_avail == n + 1 and log.base in (n, n + 1)
        assert all(log.state(h)[0] == FREE for h in range(8))
        assert log.seq == n + 1  # one "taken" per request, whichever engine took it
    assert struct.unpack_from("<H", arena.buf, drv.used_addr + 2)[0] == 20


def test_polling_an_empty_ring_serves_and_stops() -> None:
    """--poll-us: requests that arrive while the loop polls are served without a kick, and
    a stop still ends the loop at once."""
    dev = device()
    rig = ModelRig(dev, tuning=QueueTuning(data_path=DataPath.NATIVE, poll_us=20_000))
    with rig:
        drv = BlkDriver(rig.kernel)
        data = os.urandom(4096)
        for i in range(50):
            drv.write(4096 * i, data)
            assert drv.read(4096 * i, 4096) == data
    assert not rig.kernel.broken  # the stop ended the polling loop within the kernel's timeout
    assert dev.stats.by_type[vb.ReqType.IN] == 50


def test_a_ring_the_loop_cannot_map_falls_back_to_python() -> None:
    """The engine refuses a ring outside its regions; the server then uses the Python worker."""
    from pyvduse.model.arena import Arena
    from pyvduse.model.split_driver import DriverSplitRing
    from pyvduse.ring.split import SplitQueue

    arena = Arena(1 << 16)
    drv = DriverSplitRing(arena, 8)
    q = SplitQueue(arena.memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)
    with pytest.raises(ValueError, match="ring not inside"):
        native.build(
            native.require_plan(device()),
            0,
            q,
            type(arena.memory)(),
            None,
            None,
            lambda i: None,
            lambda *a: None,
        )
    eng = native.build(
        native.require_plan(device()), 0, q, arena.memory, None, None, lambda i: None, lambda *a: None
    )
    with pytest.raises(ValueError, match="ring not inside"):
        eng.set_regions([])  # refused, and the engine keeps its old map
    assert eng.position()[:3] == (0, 0, 0)


def test_the_disk_can_close_once_the_queues_stopped() -> None:
    """A stopped native worker lets go of the backend's memory (as a daemon's shutdown needs)."""
    backend = MemoryBackend(MiB)
    with ModelRig(device(backend), data_path=DataPath.NATIVE) as rig:
        BlkDriver(rig.kernel).read(0, 4096)
    backend.close()  # BufferError if an engine still held a view of it


def test_a_refused_native_worker_leaks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server falls back to Python when the engine refuses: by then the native worker
    has opened nothing (no stop eventfd) that would leak."""
    from pyvduse.model.arena import Arena
    from pyvduse.model.split_driver import DriverSplitRing
    from pyvduse.ring.memory import RegionMap
    from pyvduse.ring.split import SplitQueue

    opened: list[int] = []
    real = os.eventfd
    monkeypatch.setattr(os, "eventfd", lambda *a: opened.append(1) or real(*a))  # type: ignore[func-returns-value]
    arena = Arena(1 << 16)
    drv = DriverSplitRing(arena, 8)
    q = SplitQueue(arena.memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)
    with pytest.raises(ValueError):
        NativeQueueWorker(device(), 0, q, -1, lambda i: None, RegionMap(), None)
    assert not opened


@pytest.mark.parametrize(
    ("publish_ns", "hold_ns", "interrupts"),
    [
        (None, None, 1),  # once per round
        (0, None, 4),  # every request counts as long
        (None, 0, 4),  # nothing may be held
        (10**9, 10**9, 1),  # 4 requests take far less than a second
    ],
)
def test_native_loop_publishes_by_the_same_rule(
    publish_ns: int | None, hold_ns: int | None, interrupts: int
) -> None:
    """The C loop's publish rule is the Python worker's: after a long request, or once the
    oldest completion is held too long (the Python side is timed in test_runtime)."""
    from pyvduse.model.arena import Arena
    from pyvduse.model.split_driver import DriverSplitRing
    from pyvduse.ring.split import SplitQueue

    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, 16, event_idx=False)
    q = SplitQueue(arena.memory, 16, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)
    for k in range(4):
        drv.add([vb.OUTHDR.pack(vb.ReqType.IN, 0, 8 * k)], [4096, 1])
    notified: list[int] = []
    dev = device(NullBackend(4 * MiB))
    tuning = EngineTuning(
        publish_ns=NEVER if publish_ns is None else publish_ns, hold_ns=NEVER if hold_ns is None else hold_ns
    )
    engine = native.build(
        native.require_plan(dev),
        0,
        q,
        arena.memory,
        None,
        None,
        notified.append,
        lambda *e: None,
        tuning=tuning,
    )
    kick, stop = os.eventfd(0), os.eventfd(1)  # stopped from the start: run() drains, returns
    try:
        assert engine.run(kick, stop) == native.RUN_STOPPED
        assert engine.position()[1] == 4 and drv.used_idx() == 4
        assert len(notified) == interrupts
    finally:
        engine.close()
        os.close(kick)
        os.close(stop)


@pytest.mark.skipif(not native.available(), reason="native data path not built")
def test_the_loop_points_the_interrupts_at_its_own_cpu(tmp_path: Path) -> None:
    """--irq-cpus follow: the engine writes the cpumask of the CPU it runs on to the
    affinity file when it starts serving, in the kernel's text (hex, 32-bit groups); not
    when that CPU is not one it may follow to."""
    from pyvduse.model.arena import Arena
    from pyvduse.model.split_driver import DriverSplitRing
    from pyvduse.ring.split import SplitQueue
    from pyvduse.transport.kernel.irq_affinity import format_cpumask

    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, 16)
    q = SplitQueue(arena.memory, 16, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)
    drv.add([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [4096, 1])
    affinity = tmp_path / "irq_cb_affinity"
    affinity.write_text("")
    fd = os.open(affinity, os.O_WRONLY)
    cpu = max(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)

    def following(cpus: list[int]) -> native.Engine:
        """An engine of a null device on the ring that may point its interrupts at ``cpus``."""

        def nothing(*args: object) -> None:
            return None

        plan = native.require_plan(device(NullBackend(4 * MiB)))
        return native.build(
            plan, 0, q, arena.memory, None, None, nothing, nothing, affinity_fd=fd, follow_cpus=cpus
        )

    engine = following(sorted(before))
    kick, stop = os.eventfd(0), os.eventfd(1)
    try:
        os.sched_setaffinity(0, {cpu})
        assert engine.run(kick, stop) == native.RUN_STOPPED
        assert drv.used_idx() == 1
        assert affinity.read_text() == format_cpumask([cpu])
        affinity.write_text("")  # a CPU outside the ones given: left alone
        drv.add([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [4096, 1])
        elsewhere = following([c for c in before if c != cpu])
        q.set_position(*engine.position()[:3])  # hand the ring over where the first left it
        assert elsewhere.run(kick, stop) == native.RUN_STOPPED
        elsewhere.close()
        assert drv.used_idx() == 2 and affinity.read_text() == ""
    finally:
        os.sched_setaffinity(0, before)
        engine.close()
        for f in (kick, stop, fd):
            os.close(f)
