"""The runtime's queue workers on a minimal in-process transport: kicks, interrupts, reset."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, bit
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.base import REQUIRED_FEATURES
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.fastpath import engine as native
from pyvduse.model.arena import Arena
from pyvduse.model.packed_driver import DriverPackedRing
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.memory import GuestMemory
from pyvduse.runtime.server import DeviceServer
from pyvduse.runtime.state_file import StateFile
from pyvduse.runtime.tuning import MAX_US, PUBLISH_AFTER_US, DataPath, QueueTuning
from pyvduse.transport.base import QueueSetup, Transport

FEATURES = REQUIRED_FEATURES | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)


class LoopbackTransport(Transport):
    """Just enough of a kernel half: eventfd kicks and counted interrupts."""

    def __init__(self, arena: Arena, queues: int) -> None:
        self.arena = arena
        self.kicks = {i: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for i in range(queues)}
        self.irqs = {i: 0 for i in range(queues)}
        self.irq_event = threading.Event()
        self.config: list[tuple[int, bytes]] = []

    @property
    def memory(self) -> GuestMemory:
        return self.arena.memory

    def kick_fd(self, index: int) -> int:
        return self.kicks[index]

    def notify(self, index: int) -> None:
        self.irqs[index] += 1
        self.irq_event.set()

    def set_config(self, offset: int, data: bytes) -> None:
        self.config.append((offset, data))

    def close(self) -> None:
        pass

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)


def setup(
    queues: int = 2,
    transport: type[LoopbackTransport] = LoopbackTransport,
    tuning: QueueTuning | None = None,
) -> tuple[DeviceServer, LoopbackTransport, list[DriverSplitRing]]:
    arena = Arena(8 << 20)
    rings = [DriverSplitRing(arena, 32) for _ in range(queues)]
    t = transport(arena, queues)
    server = DeviceServer(BlkDevice(MemoryBackend(4 << 20), BlkOptions(num_queues=queues)), tuning=tuning)
    server.bind(t)
    assert server.features_ok(FEATURES)
    server.driver_ok(
        FEATURES,
        [QueueSetup(i, 32, r.desc_addr, r.avail_addr, r.used_addr, True) for i, r in enumerate(rings)],
    )
    return server, t, rings


def wait_for(pred: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_requests_on_two_queues_are_served_and_interrupt() -> None:
    server, t, rings = setup()
    try:
        for q, ring in enumerate(rings):
            for k in range(20):
                ring.add(
                    [vb.OUTHDR.pack(vb.ReqType.OUT, 0, 8 * (q * 20 + k)), bytes([k]) * 4096],
                    [1],
                    indirect=True,
                )
            t.kick(q)
        done: dict[int, int] = {0: 0, 1: 0}

        def collected() -> bool:
            for q, ring in enumerate(rings):
                for c in ring.collect():
                    assert ring.read_writable(c) == b"\0"  # status OK
                    done[q] += 1
            return done == {0: 20, 1: 20}

        wait_for(collected)
        # the interrupt follows the publish the driver saw, a moment later
        wait_for(lambda: t.irqs[0] >= 1 and t.irqs[1] >= 1)
    finally:
        server.reset()


def test_reset_stops_workers_and_remap_resumes_in_place() -> None:
    server, t, rings = setup(1)
    ring = rings[0]
    ring.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1])
    t.kick(0)
    wait_for(lambda: ring.used_idx() == 1)
    server.remap(lambda: None)
    assert server.workers[0].queue.last_avail_idx == 1
    ring.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1])
    t.kick(0)
    wait_for(lambda: ring.used_idx() == 2)
    server.reset()
    assert not server.workers and not server.running.is_set()
    ring.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1])
    t.kick(0)
    time.sleep(0.05)
    assert ring.used_idx() == 2  # nobody serves a reset device


def test_corrupt_ring_stops_only_that_queue() -> None:
    server, t, rings = setup(2)
    try:
        rings[0].set_avail_idx(1000)
        t.kick(0)
        wait_for(lambda: server.workers[0].broken is not None)
        rings[1].add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1])
        t.kick(1)
        wait_for(lambda: rings[1].used_idx() == 1)
    finally:
        server.reset()


def test_capacity_change_goes_through_the_transport() -> None:
    server, t, _ = setup(1)
    try:
        assert isinstance(server.device, BlkDevice)
        server.device.set_capacity(8 << 20)
        assert t.config == [(0, (16384).to_bytes(8, "little"))]
    finally:
        server.reset()


@pytest.mark.parametrize(
    "packed, data_path", [(False, DataPath.PYTHON), (False, DataPath.NATIVE), (True, DataPath.PYTHON)]
)
def test_a_restarted_daemon_interrupts_even_with_nothing_to_repeat(
    tmp_path: Path, packed: bool, data_path: DataPath
) -> None:
    """A daemon killed between publishing completions and interrupting left the driver
    waiting: with nothing else in flight (fio at its queue depth) no later interrupt would
    come. The restarted daemon interrupts once on every queue it takes over."""
    if data_path is DataPath.NATIVE and not native.available():
        pytest.skip("native engine not built")
    arena = Arena(8 << 20)
    ring: DriverSplitRing | DriverPackedRing
    if packed:
        ring = DriverPackedRing(arena, 32)
        setup_ = QueueSetup(0, 32, ring.desc_addr, ring.driver_addr, ring.device_addr, True)
    else:
        ring = DriverSplitRing(arena, 32)
        setup_ = QueueSetup(0, 32, ring.desc_addr, ring.avail_addr, ring.used_addr, True)
    features = FEATURES | (bit(F_RING_PACKED) if packed else 0)
    device = BlkDevice(MemoryBackend(4 << 20), BlkOptions(packed=packed))
    state = StateFile.for_device("t0", tmp_path, {"test": 1}, 1, 32)
    t = LoopbackTransport(arena, 1)

    def serve(resume: bool) -> DeviceServer:
        server = DeviceServer(device, state, QueueTuning(data_path=data_path))
        server.bind(t)
        assert server.features_ok(features)
        server.driver_ok(features, [setup_], resume=resume)
        return server

    first = serve(False)
    ring.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1])
    t.kick(0)
    wait_for(lambda: t.irqs[0] == 1)
    first.stop()  # the daemon dies; say its interrupt was the one lost
    second = serve(True)
    try:
        wait_for(lambda: t.irqs[0] == 2)
        assert [ring.read_writable(c) for c in ring.collect()] == [b"\0"]  # no repeat
    finally:
        second.reset()
        state.close()


class PacedBackend(MemoryBackend):
    """Every write takes ``seconds``."""

    def __init__(self, size: int, seconds: float) -> None:
        super().__init__(size)
        self.seconds = seconds

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        time.sleep(self.seconds)
        super().writev(offset, bufs)


def first_published(request_s: float, publish_us: int) -> int:
    """Serve 4 writes of ``request_s`` each in one round: how many the driver saw first."""
    arena = Arena(8 << 20)
    ring = DriverSplitRing(arena, 32)
    t = LoopbackTransport(arena, 1)
    tuning = QueueTuning(data_path=DataPath.PYTHON, publish_us=publish_us)
    server = DeviceServer(BlkDevice(PacedBackend(4 << 20, request_s)), tuning=tuning)
    server.bind(t)
    assert server.features_ok(FEATURES)
    try:
        for k in range(4):
            ring.add([vb.OUTHDR.pack(vb.ReqType.OUT, 0, 8 * k), bytes(4096)], [1])
        server.driver_ok(FEATURES, [QueueSetup(0, 32, ring.desc_addr, ring.avail_addr, ring.used_addr, True)])
        wait_for(lambda: ring.used_idx() >= 1)
        first = ring.used_idx()
        wait_for(lambda: ring.used_idx() == 4)
        return first
    finally:
        server.reset()


@pytest.mark.parametrize("publish_us", [PUBLISH_AFTER_US, MAX_US])
def test_long_requests_are_published_before_their_round_ends(publish_us: int) -> None:
    """A round of long requests does not hold the finished ones back until the last, unless
    --publish-us says to wait longer than the round takes (4 x 50 ms is well under 1 s)."""
    first = first_published(0.05, publish_us)
    assert first == 4 if publish_us == MAX_US else first < 4


@pytest.mark.parametrize(
    ("request_s", "publish_us", "held_for_the_round"),
    [
        (0.002, 200_000, True),  # short requests (2 ms < 200 ms), a round well under the hold
        (0.020, 30_000, False),  # short (20 ms < 30 ms), but the round outlasts the hold (30 ms)
    ],
)
def test_short_requests_are_held_for_their_round_but_not_past_the_hold(
    request_s: float, publish_us: int, held_for_the_round: bool
) -> None:
    assert QueueTuning(publish_us=publish_us).hold_us == publish_us
    assert (first_published(request_s, publish_us) == 4) is held_for_the_round


def test_the_hold_is_never_shorter_than_publish_us() -> None:
    assert QueueTuning(publish_us=0).hold_us == QueueTuning().hold_us > QueueTuning().publish_us
    assert QueueTuning(publish_us=MAX_US).hold_us == MAX_US  # once per round


@pytest.mark.parametrize("field", ["poll_us", "publish_us"])
def test_tuning_refuses_out_of_range(field: str) -> None:
    for bad in (-1, MAX_US + 1):
        with pytest.raises(ValueError, match=f"{field} {bad} must be 0 to {MAX_US}"):
            QueueTuning(**{field: bad})  # type: ignore[arg-type]


CPUS = sorted(os.sched_getaffinity(0))


class PlacedIrqTransport(LoopbackTransport):
    """Queue i's interrupts on one CPU each, counted from the last one we may use."""

    def interrupt_cpus(self, index: int) -> list[int] | None:
        return [CPUS[-1 - index % len(CPUS)]]


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("data_path", [DataPath.PYTHON, DataPath.AUTO])
@pytest.mark.parametrize("on_irq_cpus", [True, False])
def test_workers_run_on_their_interrupt_cpus(data_path: DataPath, on_irq_cpus: bool) -> None:
    """Each worker thread is pinned to its queue's interrupt CPUs with workers_on_irq_cpus,
    or left to the scheduler without it (the default); serving is the same either way. Its
    OS thread name is vqN (for top -H and ps -L)."""
    server, t, rings = setup(
        2, PlacedIrqTransport, QueueTuning(data_path=data_path, workers_on_irq_cpus=on_irq_cpus)
    )
    try:
        for i, r in enumerate(rings):
            r.add([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [512, 1])
            t.kick(i)
        wait_for(lambda: all(r.used_idx() == 1 for r in rings))
        for i, w in server.workers.items():
            tid = w._thread.native_id
            assert tid is not None
            want = {CPUS[-1 - i]} if on_irq_cpus else set(CPUS)
            assert os.sched_getaffinity(tid) == want
            assert Path(f"/proc/self/task/{tid}/comm").read_text().strip() == f"vq{i}"
    finally:
        server.stop()


def test_workers_are_not_pinned_when_the_transport_cannot_tell() -> None:
    server, _, _ = setup(1)
    try:
        assert server.workers[0].cpus is None
    finally:
        server.stop()
