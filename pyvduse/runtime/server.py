"""The device runtime: turns a transport's control events into running queue workers.

Requests in flight meet three control events, with one rule: once the answer to a reset or
an unmap has gone to the kernel, nothing more is written into the driver memory concerned and
no used element is published on its behalf.

- A reset stops every worker; requests in flight get up to half the kernel's message timeout
  to finish (so the answer still comes in time); the rest are abandoned: their results are
  dropped and their mappings fenced (``fence``), so what they write later goes nowhere.
- An unmap (UPDATE_IOTLB) pauses the workers; requests whose buffers lie in the memory going
  away get the same grace; the rest are fenced and will complete as failed; the workers then
  resume where they were with every other request still running.
- Shutdown (SIGTERM) first drains, then resets (``ops.drain``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from pyvduse.abi.virtio import F_RING_PACKED, has
from pyvduse.device.base import VirtioDevice
from pyvduse.device.blk import NativeBlk
from pyvduse.device.request import Request
from pyvduse.fastpath import engine as native
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.inflight import LoggedQueue
from pyvduse.ring.inflight_packed import LoggedPackedQueue, PackedInflightLog
from pyvduse.ring.memory import Region, RegionMap
from pyvduse.ring.packed import PackedQueue
from pyvduse.ring.queue import VirtQueue
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime import fence
from pyvduse.runtime.executors import Aio, Executors
from pyvduse.runtime.native_worker import NativeQueueWorker
from pyvduse.runtime.state_file import StateFile
from pyvduse.runtime.tuning import DEFAULT_TUNING, DataPath, QueueTuning
from pyvduse.runtime.worker import DEFAULT_GRACE_SECONDS, QueueCounters, QueueWorker
from pyvduse.transport.base import QueueSetup, Transport

log = logging.getLogger(__name__)


#: How a queue worker starts: "fresh" (a new driver), "resume" (after the daemon restarted),
#: "continue" (the same driver, after a remap).
StartMode = Literal["fresh", "resume", "continue"]
Logged = TypeVar("Logged", LoggedQueue, LoggedPackedQueue)


def _opener(kind: type[Logged], mode: StartMode) -> Callable[..., Logged]:
    """How a logged queue opens its log: cleared, recovered from, or carried on."""
    openers: dict[str, Callable[..., Logged]] = {
        "fresh": kind.fresh,
        "resume": kind.recovered,
        "continue": kind,
    }
    return openers[mode]


class DeviceServer:
    """Implements ``DeviceEvents`` for one device on one transport."""

    def __init__(
        self, device: VirtioDevice, state: StateFile | None = None, tuning: QueueTuning | None = None
    ) -> None:
        self.device = device
        self.state = state  # in-flight logs, for surviving a restart
        self.tuning = tuning or DEFAULT_TUNING  # read at each DRIVER_OK
        self.transport: Transport | None = None
        self.workers: dict[int, QueueWorker] = {}
        #: Queues the driver set up that are not served, and why (a ring that fails its
        #: checks: not mapped, areas overlapping or misaligned), until the next reset.
        self.refused: dict[int, str] = {}
        self._setups: dict[int, QueueSetup] = {}
        self.features = 0
        self.running = threading.Event()  # set between DRIVER_OK and reset
        self.executors = Executors(self.tuning.python_aio, self.tuning.io_threads)
        #: Each queue's latency and depth accounting, by index: the one place it lives;
        #: every worker that serves the queue adds to it, operations read it.
        self.queue_counters: dict[int, QueueCounters] = {}
        self._lock = threading.Lock()
        self._hooks_open = False

    def bind(self, transport: Transport) -> None:
        self.transport = transport
        self.device.bind_config_writer(transport.set_config)
        self.open_hooks()

    def open_hooks(self) -> None:
        """The device's ``open_async`` on the event loop its requests will run on, once
        (its error is the caller's: the device cannot be served)."""
        if self._hooks_open or not self.device.has_loop_hooks():
            return
        self.executors.loop.run_sync(self.device.open_async())
        self._hooks_open = True

    def close_hooks(self) -> None:
        """The device's ``close_async`` on that loop, if ``open_hooks`` ran (errors logged)."""
        if not self._hooks_open:
            return
        self._hooks_open = False
        try:
            self.executors.loop.run_sync(self.device.close_async(), timeout=self.grace() or None)
        except Exception as e:
            log.warning("closing the device on the event loop failed: %s: %s", type(e).__name__, e)

    # -- DeviceEvents ---------------------------------------------------------------------

    def features_ok(self, features: int) -> bool:
        ok = self.device.accept_features(features)
        if not ok:
            log.warning("refusing features 0x%x", features)
        return ok

    def driver_ok(self, features: int, queues: list[QueueSetup], resume: bool = False) -> None:
        """Start serving; with ``resume`` the state file says where a dead daemon stopped."""
        assert self.transport is not None
        with self._lock:
            self._stop_workers()
            self.features = features
            self.device.start(features)
            self._setups = {q.index: q for q in queues}
            for q in queues:
                if q.ready:
                    self._start_worker(q, self._initial_position(q), "resume" if resume else "fresh")
            self.running.set()
            n_native = sum(isinstance(w, NativeQueueWorker) for w in self.workers.values())
            log.info(
                "driver ready: features 0x%x, %d queue(s) served%s (%s)",
                features,
                len(self.workers),
                " (resumed)" if resume else "",
                "native data path"
                if n_native == len(self.workers) and n_native
                else "Python data path"
                if not n_native
                else f"{n_native} native",
            )

    def queue_ready(self, q: QueueSetup) -> None:
        """A queue the driver enabled after DRIVER_OK (the transport saw its first kick):
        serve it from now on."""
        with self._lock:
            if not self.running.is_set() or q.index in self.workers:
                return
            self._setups[q.index] = q
            self._start_worker(q, self._initial_position(q), "fresh")

    def reset(self) -> None:
        with self._lock:
            self.device.quiesce()
            self._stop_workers(self.grace())
            self._setups.clear()
            self.features = 0
            self.device.reset()
            self.running.clear()

    def grace(self) -> float:
        """How long requests in flight may delay the answer to a reset or an unmap: half
        the kernel's message timeout (which 0 makes endless: then the default grace)."""
        timeout = self.transport.reply_timeout() if self.transport is not None else None
        return DEFAULT_GRACE_SECONDS if not timeout or timeout < 0 else timeout / 2

    def remap(
        self,
        invalidate: Callable[[], None],
        start: int = 0,
        last: int = (1 << 64) - 1,
        going: list[Region] | None = None,
    ) -> None:
        """The driver's memory map changed (UPDATE_IOTLB of ``[start, last]``; ``going``:
        the regions that really go, when the transport can tell): pause the queues, let the
        requests using that memory finish (or fence them: they will fail), remap, resume in
        place with every other request still running."""
        assert self.transport is not None
        with self._lock:
            workers = list(self.workers.values())
            for w in workers:
                if not w.pause():
                    log.warning("queue %d did not pause for the remap", w.index)
            self._settle_unmapped(workers, start, last, going)
            invalidate()
            for w in workers:
                w.resume()

    def _settle_unmapped(
        self, workers: list[QueueWorker], start: int, last: int, regions: list[Region] | None = None
    ) -> None:
        """Wait (within the grace) for the requests whose buffers are in ``regions`` (those
        in ``[start, last]`` unless given); fence the rest, which then complete as failed."""
        if regions is None:
            memory = self.transport.memory if self.transport is not None else None
            regions = [r for r in getattr(memory, "regions", []) if r.start <= last and r.last >= start]
        going = {id(r.mem.obj): r.mem.obj for r in regions}
        if not going:
            return
        deadline = time.monotonic() + self.grace()
        python = [w for w in workers if not isinstance(w, NativeQueueWorker)]

        def touching(idle: bool = False) -> list[Request]:
            return [
                r
                for w in python
                for r in w.in_flight_requests()
                if not r.done and r.idle == idle and any(id(o) in going for o in fence.owners([r.chain]))
            ]

        waiting = touching()
        while waiting and time.monotonic() < deadline:
            time.sleep(0.001)
            waiting = touching()
        # idle requests (receive buffers waiting for a packet) are not waited for: they
        # fail when their device gets to them
        lost = waiting + touching(idle=True)
        for r in lost:
            r.poisoned = True
        fenced = fence.fence_chains([r.chain for r in lost], only=set(going))
        # the native engine cannot say which memory its requests use: all of it waits
        left = sum(w.settle(deadline - time.monotonic()) for w in workers if isinstance(w, NativeQueueWorker))
        if left:
            fenced += sum(fence.fence(o) for o in going.values())
        if waiting or left:
            log.warning(
                "%d request(s) still use memory being unmapped; they will fail (%d mapping(s) fenced)",
                len(waiting) + left,
                fenced,
            )

    def queue_state(self, index: int) -> tuple[int, ...]:
        w = self.workers.get(index)
        if w is None:
            return (1, 0, 1, 0) if self.packed else (0,)
        return self._position(w.queue)[:4] if self.packed else (w.indices()[0],)

    @property
    def packed(self) -> bool:
        return has(self.features, F_RING_PACKED)

    # -- helpers ------------------------------------------------------------------------

    def _initial_position(self, q: QueueSetup) -> tuple[int, ...]:
        """Where the driver says a queue starts: split (avail, used from the ring), packed
        (avail wrap, avail idx, used wrap, used idx)."""
        return q.packed_state if self.packed else (q.avail_index,)

    def _position(self, queue: VirtQueue) -> tuple[int, ...]:
        if isinstance(queue, PackedQueue | LoggedPackedQueue):
            return queue.state()
        return (queue.last_avail_idx, queue.used_idx)

    def _open_ring(self, q: QueueSetup, position: tuple[int, ...]) -> SplitQueue | PackedQueue:
        assert self.transport is not None
        memory = self.transport.memory
        if self.packed:
            avail_wrap, last_avail, used_wrap, used = position
            return PackedQueue(
                memory,
                q.num,
                q.desc_addr,
                q.driver_addr,
                q.device_addr,
                self.features,
                last_avail_idx=last_avail,
                used_idx=used,
                avail_wrap=avail_wrap,
                used_wrap=used_wrap,
            )
        return SplitQueue(
            memory,
            q.num,
            q.desc_addr,
            q.driver_addr,
            q.device_addr,
            self.features,
            last_avail_idx=position[0],
            used_idx=position[1] if len(position) > 1 else None,
        )

    def _start_worker(self, q: QueueSetup, position: tuple[int, ...], mode: StartMode) -> None:
        assert self.transport is not None
        try:
            ring = self._open_ring(q, position)
        except RingError as e:
            log.error("queue %d cannot be served: %s", q.index, e)
            self.refused[q.index] = str(e)
            return
        queue: VirtQueue = ring
        resubmit: list[Chain] = []
        if mode == "resume" and self.state is None:
            if not isinstance(ring, SplitQueue):
                log.error("queue %d: cannot resume a packed ring without its state", q.index)
                return
            ring.resume_at_used()
        if self.state is not None:
            logged: LoggedQueue | LoggedPackedQueue
            if isinstance(ring, SplitQueue):
                logged = _opener(LoggedQueue, mode)(ring, self.state.log(q.index, q.num))
            else:
                region = self.state.region(q.index, q.num)
                logged = _opener(LoggedPackedQueue, mode)(ring, PackedInflightLog(region, q.num))
            queue, resubmit = logged, logged.resubmit  # resubmit: only after a recovery
        resumed = mode == "resume"
        cpus = self._worker_cpus(q.index)
        counters = self.queue_counters.setdefault(q.index, QueueCounters())
        w = self._native_worker(q.index, queue, resubmit, resumed, cpus, counters) or QueueWorker(
            self.device,
            q.index,
            queue,
            self.transport.kick_fd(q.index),
            self.transport.notify,
            resubmit,
            resumed=resumed,
            tuning=self.tuning,
            cpus=cpus,
            executors=self.executors,
            counters=counters,
        )
        self.workers[q.index] = w
        w.start()

    def _worker_cpus(self, index: int) -> list[int] | None:
        """Where queue ``index``'s worker runs: on its interrupt CPUs (see QueueTuning), when
        the transport knows them and they are not every CPU we may use anyway."""
        assert self.transport is not None
        if not self.tuning.workers_on_irq_cpus:
            return None
        irq_cpus = set(self.transport.interrupt_cpus(index) or ())
        allowed = os.sched_getaffinity(0)
        if not irq_cpus & allowed or allowed <= irq_cpus:
            return None
        return sorted(irq_cpus & allowed)

    def _native_worker(
        self,
        index: int,
        queue: VirtQueue,
        resubmit: list[Chain],
        resumed: bool,
        cpus: list[int] | None,
        counters: QueueCounters,
    ) -> NativeQueueWorker | None:
        """A native worker when the data path allows it and the queue is one it serves."""
        assert self.transport is not None
        memory = self.transport.memory
        plan = native.plan_of(self.device, self.packed)
        if (
            self.tuning.data_path is DataPath.PYTHON
            or isinstance(plan, str)
            or not isinstance(queue, SplitQueue | LoggedQueue)
            or not isinstance(memory, RegionMap)
            or (self.tuning.aio is Aio.THREADS and isinstance(plan, NativeBlk) and plan.blocking)
        ):
            return None
        try:
            return NativeQueueWorker(
                self.device,
                index,
                queue,
                self.transport.kick_fd(index),
                self.transport.notify,
                memory,
                self.transport.irq_ioctl(index),
                resubmit,
                resumed=resumed,
                tuning=self.tuning,
                cpus=cpus,
                irq_follow=self.transport.irq_follow(index),
                executors=self.executors,
                counters=counters,
            )
        except ValueError as e:  # e.g. a ring the native loop cannot map as one piece
            log.warning("queue %d: served by the Python engine: %s", index, e)
            return None
        except OSError as e:  # the kernel refuses io_uring (kernel.io_uring_disabled, ...)
            log.warning(
                "queue %d: io_uring is not available (%s): served by the Python engine with a thread pool",
                index,
                e.strerror or e,
            )
            return None

    def _stop_workers(self, grace: float = 0.0) -> None:
        """Stop every worker at once; requests in flight get ``grace`` seconds, then those
        still running are abandoned and their mappings fenced."""
        workers = list(self.workers.values())
        for w in workers:
            w.request_stop(grace)
        for w in workers:
            w.join()
        self.workers.clear()
        self.refused.clear()
        abandoned = [r.chain for w in workers for r in w.abandoned]
        owners = {id(o): o for o in fence.owners(abandoned)}
        for w in workers:
            if isinstance(w, NativeQueueWorker):
                owners.update((id(o), o) for o in w.abandoned_owners())
        if owners:
            n = sum(fence.fence(o) for o in owners.values())
            log.warning("requests abandoned: %d mapping(s) fenced, their writes go nowhere", n)

    def stop(self) -> None:
        """Stop serving (used on shutdown when no reset will come)."""
        with self._lock:
            self.device.quiesce()
            self._stop_workers(self.grace())
            self.running.clear()
            self.close_hooks()
            self.executors.close()
