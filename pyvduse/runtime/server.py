"""The device runtime: turns a transport's control events into running queue workers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pyvduse.abi.virtio import F_RING_PACKED, has
from pyvduse.device.base import VirtioDevice
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.inflight import LoggedQueue
from pyvduse.ring.queue import VirtQueue
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.state_file import StateFile
from pyvduse.runtime.worker import QueueWorker
from pyvduse.transport.base import QueueSetup, Transport

log = logging.getLogger(__name__)


class DeviceServer:
    """Implements ``DeviceEvents`` for one device on one transport."""

    def __init__(self, device: VirtioDevice, state: StateFile | None = None) -> None:
        self.device = device
        self.state = state  # in-flight logs, for surviving a restart
        self.transport: Transport | None = None
        self.workers: dict[int, QueueWorker] = {}
        self._setups: dict[int, QueueSetup] = {}
        self.features = 0
        self.running = threading.Event()  # set between DRIVER_OK and reset
        self._lock = threading.Lock()

    def bind(self, transport: Transport) -> None:
        self.transport = transport
        self.device.bind_config_writer(transport.set_config)

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
            if has(features, F_RING_PACKED):
                raise NotImplementedError("packed rings are not served yet")
            self._setups = {q.index: q for q in queues}
            for q in queues:
                if q.ready:
                    self._start_worker(q, q.avail_index, None, "resume" if resume else "fresh")
            self.running.set()
            log.info("driver ready: features 0x%x, %d queue(s) served%s", features,
                     len(self.workers), " (resumed)" if resume else "")

    def reset(self) -> None:
        with self._lock:
            self._stop_workers()
            self._setups.clear()
            self.features = 0
            self.device.reset()
            self.running.clear()

    def remap(self, invalidate: Callable[[], None]) -> None:
        """The driver's memory map changed (UPDATE_IOTLB): pause, remap, resume in place."""
        with self._lock:
            setups = dict(self._setups)
            saved = {i: (w.queue.last_avail_idx, w.queue.used_idx) for i, w in self.workers.items()}
            self._stop_workers()
            invalidate()
            for i, (last_avail, used) in saved.items():
                self._start_worker(setups[i], last_avail, used, "continue")

    def queue_state(self, index: int) -> tuple[int, ...]:
        w = self.workers.get(index)
        return (w.queue.last_avail_idx,) if w else (0,)

    # -- helpers ------------------------------------------------------------------------

    def _start_worker(self, q: QueueSetup, last_avail: int, used_idx: int | None,
                      mode: str) -> None:
        """``mode``: "fresh" (new driver), "resume" (after a restart), "continue" (remap)."""
        assert self.transport is not None
        try:
            ring = SplitQueue(self.transport.memory, q.num, q.desc_addr, q.driver_addr,
                              q.device_addr, self.features, last_avail_idx=last_avail,
                              used_idx=used_idx)
        except RingError as e:
            log.error("queue %d cannot be served: %s", q.index, e)
            return
        queue: VirtQueue = ring
        resubmit: list[Chain] = []
        if self.state is not None:
            log_ = self.state.log(q.index, q.num)
            if mode == "resume":
                lq = LoggedQueue.recovered(ring, log_)
                resubmit = lq.resubmit
            elif mode == "fresh":
                lq = LoggedQueue.fresh(ring, log_)
            else:
                lq = LoggedQueue(ring, log_)
            queue = lq
        w = QueueWorker(self.device, q.index, queue, self.transport.kick_fd(q.index),
                        self.transport.notify, resubmit)
        self.workers[q.index] = w
        w.start()

    def _stop_workers(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.workers.clear()

    def stop(self) -> None:
        """Stop serving (used on shutdown when no reset will come)."""
        with self._lock:
            self._stop_workers()
            self.running.clear()
