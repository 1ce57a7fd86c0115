"""Kill the daemon between every pair of steps of the request path; restart; check that the
driver sees every request completed exactly once and the data landed (in-process, no threads).
"""

from __future__ import annotations

from typing import cast

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.model.arena import Arena
from pyvduse.model.packed_driver import DriverPackedRing
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.inflight import InflightLog, LoggedQueue, log_size
from pyvduse.ring.inflight_packed import LoggedPackedQueue, PackedInflightLog, packed_log_size
from pyvduse.ring.packed import PackedQueue
from pyvduse.ring.split import SplitQueue

NUM = 8
FEATURES = bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)
STEPS = ("taken", "backend done", "used written", "used index published", "log cleared", "interrupt")


class Crash(Exception):
    pass


class Daemon:
    """One daemon incarnation: the request path as the worker runs it, with a kill switch."""

    def __init__(
        self,
        arena: Arena,
        drv: DriverSplitRing,
        log_mem: memoryview,
        device: BlkDevice,
        fresh: bool,
        crash_at: int | None,
    ) -> None:
        ring = SplitQueue(arena.memory, NUM, drv.desc_addr, drv.avail_addr, drv.used_addr, FEATURES)
        log = InflightLog(log_mem, NUM)
        self.q = LoggedQueue.fresh(ring, log) if fresh else LoggedQueue.recovered(ring, log)
        self.device = device
        self.crash_at = crash_at
        self.step = 0
        self.interrupts = 0

    def _tick(self) -> None:
        if self.crash_at is not None and self.step == self.crash_at:
            raise Crash
        self.step += 1

    def run(self, batch: int = 2) -> None:
        q = self.q
        pending = list(q.resubmit)
        q.resubmit = []
        while True:
            done = []
            for _ in range(batch):
                chain = pending.pop(0) if pending else q.pop()
                if chain is None:
                    break
                self._tick()  # taken
                written = self.device.handle(0, chain)
                self._tick()  # backend done
                q.push(chain.head, written, chain.ndesc)
                self._tick()  # used written
                done.append(chain.head)
            if not done:
                return
            q.queue.publish()
            self._tick()  # used index published
            q.log.published(q._batch)
            q._batch = []
            self._tick()  # log cleared
            self.interrupts += 1
            self._tick()  # interrupt


def scenario(crash_at: int | None, requests: int = 5) -> tuple[int, int]:
    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, NUM)
    backend = MemoryBackend(1 << 20)
    device = BlkDevice(backend)
    log_mem = memoryview(bytearray(log_size(NUM)))
    payload = {}
    for k in range(requests):
        data = bytes([k + 1]) * 512
        payload[k] = data
        drv.add([vb.OUTHDR.pack(vb.ReqType.OUT, 0, k), data], [1], indirect=True, token=k)
    first = Daemon(arena, drv, log_mem, device, fresh=True, crash_at=crash_at)
    crashed = False
    try:
        first.run()
    except Crash:
        crashed = True
    if crashed:  # the restarted daemon recovers from the log and the ring
        Daemon(arena, drv, log_mem, device, fresh=False, crash_at=None).run()
    seen = [c.token for c in drv.collect()]
    assert sorted(seen) == list(range(requests)), f"lost or duplicated: {seen}"  # type: ignore
    buf = bytearray(512 * requests)
    backend.readv(0, [memoryview(buf)])
    assert bytes(buf) == b"".join(payload[k] for k in range(requests))
    return first.step, int(crashed)


def total_steps() -> int:
    return scenario(None)[0]


@pytest.mark.parametrize("crash_at", range(total_steps()))
def test_kill_at_every_step(crash_at: int) -> None:
    _, crashed = scenario(crash_at)
    assert crashed


def test_kill_between_pop_and_log() -> None:
    """The head left the ring but the log never heard of it: it is taken again, once."""
    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, NUM)
    device = BlkDevice(MemoryBackend(1 << 20))
    log_mem = memoryview(bytearray(log_size(NUM)))
    drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], token="a")
    d1 = Daemon(arena, drv, log_mem, device, fresh=True, crash_at=None)
    assert d1.q.queue.pop() is not None  # popped from the ring, never logged, then killed
    Daemon(arena, drv, log_mem, device, fresh=False, crash_at=None).run()
    assert [c.token for c in drv.collect()] == ["a"]


def test_kill_after_logging_before_avail_index() -> None:
    """Logged as taken, but the logged avail index is old: not taken twice."""
    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, NUM)
    device = BlkDevice(MemoryBackend(1 << 20))
    log_mem = memoryview(bytearray(log_size(NUM)))
    drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], token="a")
    drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], token="b")
    d1 = Daemon(arena, drv, log_mem, device, fresh=True, crash_at=None)
    chain = d1.q.queue.pop()
    assert chain is not None
    d1.q.log.taken(chain.head, 0)  # the head is in flight but last_avail still says 0
    Daemon(arena, drv, log_mem, device, fresh=False, crash_at=None).run()
    assert sorted(str(c.token) for c in drv.collect()) == ["a", "b"]


def test_takeover_without_a_log_starts_at_the_used_index() -> None:
    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, NUM)
    device = BlkDevice(MemoryBackend(1 << 20))
    for t in ("done", "in flight", "new"):
        drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], token=t)
    q = SplitQueue(arena.memory, NUM, drv.desc_addr, drv.avail_addr, drv.used_addr, FEATURES)
    first = q.pop()
    assert first is not None
    q.push(first.head, device.handle(0, first))
    q.publish()
    assert q.pop() is not None  # taken, then the daemon dies
    q2 = SplitQueue(arena.memory, NUM, drv.desc_addr, drv.avail_addr, drv.used_addr, FEATURES)
    q2.resume_at_used()
    while (chain := q2.pop()) is not None:
        q2.push(chain.head, device.handle(0, chain))
    q2.publish()
    assert [c.token for c in drv.collect()] == ["done", "in flight", "new"]


def test_restart_takes_nothing_the_driver_has_not_published() -> None:
    """A daemon that resumes at avail index N must read avail->idx before taking slot N:
    the slots past it hold stale or no heads (a real kernel test once saw phantom requests)."""
    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, NUM)
    device = BlkDevice(MemoryBackend(1 << 20))
    log_mem = memoryview(bytearray(log_size(NUM)))
    for k in range(3):
        drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], token=k)
    Daemon(arena, drv, log_mem, device, fresh=True, crash_at=None).run()
    assert [c.token for c in drv.collect()] == [0, 1, 2]
    second = Daemon(arena, drv, log_mem, device, fresh=False, crash_at=None)
    assert second.q.pop() is None  # nothing new: nothing taken
    drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], token="new")
    second.run()
    assert [c.token for c in drv.collect()] == ["new"]
    assert device.stats.bad_chains == 0 and device.stats.errors == 0


# -- packed rings ---------------------------------------------------------------------------


class PackedDaemon:
    """The packed request path as the worker runs it, with a kill switch between steps."""

    def __init__(
        self,
        arena: Arena,
        drv: DriverPackedRing,
        log_mem: memoryview,
        device: BlkDevice,
        fresh: bool,
        crash_at: int | None,
    ) -> None:
        ring = PackedQueue(arena.memory, NUM, drv.desc_addr, drv.driver_addr, drv.device_addr, FEATURES)
        log = PackedInflightLog(log_mem, NUM)
        self.q = LoggedPackedQueue.fresh(ring, log) if fresh else LoggedPackedQueue.recovered(ring, log)
        self.device = device
        self.crash_at = crash_at
        self.step = 0

    def _tick(self) -> None:
        if self.crash_at is not None and self.step == self.crash_at:
            raise Crash
        self.step += 1

    def run(self, batch: int = 3) -> None:
        """Rounds of ``batch`` requests, completed in the reverse of the order taken."""
        q, ring = self.q, self.q.queue
        pending = list(q.resubmit)
        q.resubmit = []
        while True:
            taken = []
            for _ in range(batch):
                chain = pending.pop(0) if pending else q.pop()
                if chain is None:
                    break
                self._tick()  # taken
                taken.append(chain)
            if not taken:
                return
            for chain in reversed(taken):  # out of order
                written = self.device.handle(0, chain)
                self._tick()  # backend done
                q.push(chain.head, written, chain.ndesc)
                self._tick()  # used written
            target = (ring.used_idx, ring.used_wrap)
            q.log.set_position(8, *target)
            self._tick()  # intent logged
            ring.publish()
            self._tick()  # used published
            for b in q._batch:
                q.log.release(b)
                self._tick()  # entry freed
            q._batch = []
            q.log.set_position(4, *target)
            self._tick()  # used logged


def packed_scenario(crash_at: int | None, requests: int = 5) -> tuple[int, int]:
    arena = Arena(1 << 20)
    drv = DriverPackedRing(arena, NUM)
    backend = MemoryBackend(1 << 20)
    device = BlkDevice(backend, BlkOptions(packed=True))
    log_mem = memoryview(bytearray(packed_log_size(NUM)))
    payload = {}
    for k in range(requests):
        data = bytes([k + 1]) * 512
        payload[k] = data
        drv.add(
            [vb.OUTHDR.pack(vb.ReqType.OUT, 0, k), data], [1], indirect=k != 1, token=k
        )  # the direct chain takes three slots, indirect ones one
    first = PackedDaemon(arena, drv, log_mem, device, fresh=True, crash_at=crash_at)
    crashed = False
    try:
        first.run()
    except Crash:
        crashed = True
    if crashed:
        PackedDaemon(arena, drv, log_mem, device, fresh=False, crash_at=None).run()
    seen = [c.token for c in drv.collect()]
    assert sorted(seen) == list(range(requests)), f"lost or duplicated: {seen}"  # type: ignore
    buf = bytearray(512 * requests)
    backend.readv(0, [memoryview(buf)])
    assert bytes(buf) == b"".join(payload[k] for k in range(requests))
    assert device.stats.bad_chains == 0 and device.stats.errors == 0
    return first.step, int(crashed)


@pytest.mark.parametrize("crash_at", range(packed_scenario(None)[0]))
def test_packed_kill_at_every_step(crash_at: int) -> None:
    _, crashed = packed_scenario(crash_at)
    assert crashed


def test_packed_restart_then_new_requests_across_wraps() -> None:
    """Restarts between rounds that wrap the ring several times: nothing lost or repeated."""
    arena = Arena(1 << 20)
    drv = DriverPackedRing(arena, NUM)
    device = BlkDevice(MemoryBackend(1 << 20), BlkOptions(packed=True))
    log_mem = memoryview(bytearray(packed_log_size(NUM)))
    fresh = True
    for rnd in range(12):
        for k in range(3):
            drv.add([vb.OUTHDR.pack(vb.ReqType.FLUSH, 0, 0)], [1], indirect=k == 0, token=(rnd, k))
        d = PackedDaemon(arena, drv, log_mem, device, fresh=fresh, crash_at=None if rnd % 3 else 4)
        fresh = False
        try:
            d.run()
        except Crash:
            PackedDaemon(arena, drv, log_mem, device, fresh=False, crash_at=None).run()
        assert sorted(cast(tuple[int, int], c.token) for c in drv.collect()) == [(rnd, k) for k in range(3)]
    assert device.stats.bad_chains == 0
