"""The request contract: many requests in flight per queue, completed later, in any order.

Every style a device may use (``handle``, ``async def handle``, ``submit`` completing from
its own threads, a blocking backend on the thread pool, an asyncio backend) serves a queue
with many requests in flight on the model; an exception anywhere fails that one request and
the queue carries on; a reset or shutdown with requests in flight is answered in time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import DeviceId
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.device.request import Request, RequestError, complete_together
from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.model.virtio_driver import DriverQueue
from pyvduse.ring.chain import Chain
from pyvduse.ring.iovec import gather
from pyvduse.runtime.executors import Aio
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.testing.rig import ModelRig

MiB = 1 << 20
DEPTH = 32


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # failed requests are logged, rate-limited
    yield
    logging.disable(logging.NOTSET)


def python_rig(device: VirtioDevice, aio: Aio = Aio.THREADS, msg_timeout: float = 5.0) -> ModelRig:
    return ModelRig(device, tuning=QueueTuning(data_path=DataPath.PYTHON, aio=aio), msg_timeout=msg_timeout)


def read_request(q: DriverQueue, sector: int, length: int = 512) -> int:
    return q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, sector)], [length, 1], indirect=True)


def write_request(q: DriverQueue, sector: int, data: bytes) -> int:
    return q.submit([vb.OUTHDR.pack(vb.ReqType.OUT, 0, sector), data], [1], indirect=True)


class Concurrency:
    """Counts how many calls are inside a section at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


class SlowBackend(MemoryBackend):
    """A RAM disk with a disk's latency: each read waits, blocking its thread. With
    ``together``, the first that many reads wait until all of them are inside at once (a
    disk that answers nothing before its queue is full): proof that they were in flight
    together, whatever the machine's load does to the timing."""

    blocking = True

    def __init__(self, size: int, delay: float = 0.02, together: int = 0) -> None:
        super().__init__(size)
        self.delay = delay
        self.inside = Concurrency()
        self.together = threading.Barrier(together) if together else None
        self.calls = 0

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        with self.inside:
            with self.inside.lock:
                self.calls += 1
                first = self.calls <= (self.together.parties if self.together else 0)
            if first and self.together is not None:
                self.together.wait(timeout=10)  # BrokenBarrierError: they never were
            time.sleep(self.delay * random.random())
            super().readv(offset, bufs)


class AsyncBackend(MemoryBackend):
    """A RAM disk behind an asyncio server: many reads of one queue wait at once."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.inside = Concurrency()

    async def readv(self, offset: int, bufs: list[memoryview]) -> None:
        with self.inside:
            await asyncio.sleep(0.02 * random.random())
            MemoryBackend.readv(self, offset, bufs)


def deep_reads(rig: ModelRig, backend: MemoryBackend, n: int = 4 * DEPTH) -> None:
    """Keep DEPTH reads in flight on queue 0 and check every byte each returns."""
    image = os.urandom(64 * 512)
    backend.writev(0, [memoryview(image)])
    q = BlkDriver(rig.kernel).virtio.queues[0]
    pending: dict[int, int] = {}
    sent = 0
    while sent < n or pending:
        while sent < n and len(pending) < DEPTH:
            sector = random.randrange(64)
            pending[read_request(q, sector)] = sector
            sent += 1
        ticket = next(iter(pending))
        c = q.wait(ticket, 10)
        sector = pending.pop(ticket)
        assert c.data[-1] == vb.ReqStatus.OK
        assert c.data[:-1] == image[sector * 512 : sector * 512 + 512]


def test_a_blocking_backend_serves_a_queue_many_at_once_on_the_thread_pool() -> None:
    backend = SlowBackend(MiB, together=DEPTH)
    device = BlkDevice(backend)
    with python_rig(device, Aio.THREADS) as rig:
        deep_reads(rig, backend)
        c = rig.server.queue_counters[0]
        assert c.in_flight == 0 and c.completed == 4 * DEPTH
        assert sum(c.depth_hist[6:]) > 0  # requests taken with 32 or more in flight
    assert backend.inside.peak >= DEPTH // 4  # sync would be 1


def test_sync_aio_serves_one_at_a_time() -> None:
    backend = SlowBackend(MiB, delay=0.002)
    with python_rig(BlkDevice(backend), Aio.SYNC) as rig:
        deep_reads(rig, backend, n=40)
    assert backend.inside.peak == 1


def test_an_asyncio_backend_serves_many_at_once_on_the_runtime_loop() -> None:
    backend = AsyncBackend(MiB)
    with python_rig(BlkDevice(backend)) as rig:
        deep_reads(rig, backend)
    assert backend.inside.peak > DEPTH // 2


class EchoDevice(VirtioDevice):
    """A minimal non-blk device: copies the readable bytes into the writable ones."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = Concurrency()

    def spec(self) -> DeviceSpec:
        return DeviceSpec(DeviceId.BLOCK, REQUIRED_FEATURES, bytes(64), 1, 64)

    def accept_features(self, features: int) -> bool:
        return True

    def echo(self, chain: Chain) -> int:
        data = b"".join(bytes(b) for b in chain.readable)
        pos = 0
        for w in chain.writable:
            k = min(len(w), len(data) - pos)
            w[:k] = data[pos : pos + k]
            pos += k
        return pos


class AsyncEcho(EchoDevice):
    async def handle(self, queue: int, chain: Chain) -> int:
        with self.inside:
            await asyncio.sleep(0.01 * random.random())
            if chain.readable and bytes(chain.readable[0][:4]) == b"boom":
                raise ValueError("boom")
            return self.echo(chain)


class ThreadedEcho(EchoDevice):
    """Completes from its own thread, in reverse order of arrival, in batches."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def submit(self, request: Request) -> None:
        with self.lock:
            self.held.append(request)
            if self.timer is None:
                self.timer = threading.Timer(0.01, self.release)
                self.timer.start()

    def release(self) -> None:
        with self.lock:
            batch, self.held, self.timer = self.held, [], None
        for r in reversed(batch):
            r.complete(self.echo(r.chain))


def echo_many(rig: ModelRig, n: int = 3 * DEPTH) -> list[tuple[bytes, int]]:
    """n requests, DEPTH in flight at a time, each checked."""
    q = BlkDriver(rig.kernel).virtio.queues[0]
    pending: dict[int, bytes] = {}
    out = []
    k = 0
    while k < n or pending:
        while k < n and len(pending) < DEPTH:
            payload = b"boom" if k % 17 == 5 else os.urandom(random.randrange(1, 40))
            pending[q.submit([payload], [64])] = payload
            k += 1
        ticket = next(iter(pending))
        payload = pending.pop(ticket)
        c = q.wait(ticket, 10)
        out.append((payload, c.length))
        if payload != b"boom":
            assert c.length == len(payload) and c.data[: len(payload)] == payload
    return out


def test_async_def_handle_runs_many_requests_of_a_queue_on_the_runtime_loop() -> None:
    device = AsyncEcho()
    with python_rig(device) as rig:
        results = echo_many(rig)
    assert device.inside.peak > 4
    assert [n for p, n in results if p == b"boom"] == [0] * 6  # failed: nothing written


def test_submit_completing_from_another_thread_in_reverse_order() -> None:
    device = ThreadedEcho()
    with python_rig(device) as rig:
        results = echo_many(rig)
        assert all(n == len(p) for p, n in results)
        assert rig.server.queue_counters[0].in_flight == 0


class Flaky(BlkDevice):
    """Breaks the contract in every way a user's device can."""

    def __init__(self) -> None:
        super().__init__(NullBackend(MiB))

    def submit(self, request: Request) -> None:
        kind = gather(request.chain.readable, 8, 8)[0] if request.chain.readable else 0
        if kind == 1:
            raise RuntimeError("submit blew up")
        if kind == 2:
            request.complete(1 << 40)  # not a used length
            return
        if kind == 3:
            request.complete(1)
            request.complete(1)  # twice: the second raises, nothing is published twice
            return
        if kind == 4:
            request.complete(1)
            raise RuntimeError("after completing")
        if kind == 5:
            request.run_blocking(lambda: 1 // 0)
            return
        super().submit(request)


def test_every_way_a_device_can_fail_fails_only_that_request() -> None:
    device = Flaky()
    with python_rig(device) as rig:
        drv = BlkDriver(rig.kernel)
        for kind in (1, 2, 5):
            with pytest.raises(BlkIOError):
                drv.read(kind * 512, 512)
        for kind in (3, 4):  # completed by the device, once
            _, _, length = drv.request(vb.ReqType.IN, kind, in_len=512)
            assert length == 1
        drv.write(0, b"x" * 512)  # the queue carries on
        assert drv.read(64 * 512, 512) == bytes(512)
        assert all(w.broken is None for w in rig.server.workers.values())


def test_a_second_completion_raises() -> None:
    done: list[int] = []

    class Sink:
        def finish(self, request: Request, written: int) -> None:
            done.append(written)

        def fail(self, request: Request, why: object) -> None:
            done.append(-1)

        def run(self, request: Request, coroutine: object) -> None: ...
        def run_blocking(self, request: Request, fn: object) -> None: ...

    r = Request(0, Chain(3, [], []), Sink())  # type: ignore[arg-type]
    r.complete(5)
    with pytest.raises(RequestError):
        r.complete(5)
    with pytest.raises(RequestError):
        r.fail()
    assert done == [5]


def test_completed_together_or_not_at_all() -> None:
    """complete_together hands every request to the sink in one call, and refuses (before
    completing any) a set with one already done, a bad length or two queues."""
    calls: list[list[tuple[int, int]]] = []

    class Sink:
        def finish_together(self, outcomes: list[tuple[Request, int]]) -> None:
            calls.append([(r.head, n) for r, n in outcomes])

    sink: Any = Sink()
    other: Any = Sink()
    a, b, c = (Request(0, Chain(h, [], []), sink) for h in (1, 2, 3))
    complete_together([(a, 10), (b, 20)])
    assert calls == [[(1, 10), (2, 20)]] and a.done and b.done
    for bad in ([(c, 5), (a, 1)], [(c, -1)], [(c, 1), (Request(1, Chain(4, [], []), other), 1)]):
        with pytest.raises(RequestError):
            complete_together(bad)
        assert not c.done
    assert len(calls) == 1


def test_a_device_without_handle_or_submit_is_refused() -> None:
    class Nothing(VirtioDevice):
        def spec(self) -> DeviceSpec:
            raise AssertionError

    with pytest.raises(TypeError, match="handle"):
        Nothing()


class Hanging(BlkDevice):
    """Reads wait for ``release`` (a backend stuck on a dead server)."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(MiB))
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def submit(self, request: Request) -> None:
        def slow() -> int:
            self.entered.release()
            self.release.wait(30)
            return self.handle(request.queue, request.chain)

        request.run_blocking(slow)


def test_a_reset_with_hung_requests_is_answered_in_time_and_drops_them() -> None:
    device = Hanging()
    rig = python_rig(device, msg_timeout=1.0)
    with rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        tickets = [read_request(q, s) for s in range(8)]
        for _ in tickets:
            assert device.entered.acquire(timeout=5)
        assert rig.server.queue_counters[0].in_flight == 8
        assert rig.kernel.reset()  # answered OK ...
        assert not rig.kernel.broken  # ... within msg_timeout (grace: half of it), not timed out
        used_before = q.ring.used_idx()  # type: ignore[union-attr]
        device.release.set()
        time.sleep(0.2)
        assert q.ring.used_idx() == used_before  # type: ignore[union-attr]  # dropped
        # the device works again after the driver probes anew
        assert BlkDriver(rig.kernel).read(0, 512) == bytes(512)


def test_a_reset_waits_for_requests_that_finish_within_the_grace() -> None:
    device = Hanging()
    rig = python_rig(device, msg_timeout=4.0)
    with rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        for s in range(4):
            read_request(q, s)
        for _ in range(4):
            assert device.entered.acquire(timeout=5)
        threading.Timer(0.3, device.release.set).start()
        assert rig.kernel.reset()
        assert all(not w.abandoned for w in rig.server.workers.values())


def test_drain_waits_for_every_request_in_flight() -> None:
    from pyvduse.ops.drain import drain

    device = Hanging()
    with python_rig(device) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        tickets = [read_request(q, s) for s in range(6)]
        for _ in tickets:
            assert device.entered.acquire(timeout=5)
        assert drain(rig.server, 0.2) == 1  # one queue still busy
        threading.Timer(0.2, device.release.set).start()
        assert drain(rig.server, 5) == 0
        for t in tickets:
            assert q.wait(t, 5).data[-1] == vb.ReqStatus.OK


def test_blk_options_unchanged_for_sync_style_subclasses() -> None:
    """A subclass that overrides ``handle`` (the examples' style) is served through it."""

    class Counting(BlkDevice):
        calls = 0

        def handle(self, queue: int, chain: Chain) -> int:
            Counting.calls += 1
            return super().handle(queue, chain)

    with python_rig(Counting(MemoryBackend(MiB), BlkOptions())) as rig:
        BlkDriver(rig.kernel).read(0, 512)
    assert Counting.calls == 1


def test_drain_does_not_wait_for_requests_taken_after_it_began() -> None:
    """A shutdown drain waits for what was in flight when it began; a busy queue taking
    more meanwhile cannot hold it up (it waited for every request in flight, new ones too:
    the mark it compared take numbers with was a timestamp)."""
    from pyvduse.ops.drain import drain

    class Gated(BlkDevice):
        """Reads wait for the event of their sector."""

        def __init__(self) -> None:
            super().__init__(MemoryBackend(MiB))
            self.gates = {s: threading.Event() for s in range(4)}
            self.entered = threading.Semaphore(0)

        def submit(self, request: Request) -> None:
            sector = vb.OUTHDR.unpack(request.chain.read(0, vb.OUTHDR.size))[2]

            def slow() -> int:
                self.entered.release()
                self.gates[sector].wait(30)
                return self.handle(request.queue, request.chain)

            request.run_blocking(slow)

    device = Gated()
    with python_rig(device) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        old = [read_request(q, s) for s in (0, 1)]
        for _ in old:
            assert device.entered.acquire(timeout=5)
        result: list[int] = []
        drainer = threading.Thread(target=lambda: result.append(drain(rig.server, 10)))
        drainer.start()
        time.sleep(0.1)
        new = read_request(q, 3)  # taken after the drain began; stays in flight
        assert device.entered.acquire(timeout=5)
        device.gates[0].set()
        device.gates[1].set()
        drainer.join(5)
        assert not drainer.is_alive() and result == [0]
        device.gates[3].set()
        for t in [*old, new]:
            assert q.wait(t, 5).data[-1] == vb.ReqStatus.OK
