"""A queue worker whose hot loop is the native engine (``pyvduse.fastpath``).

The thread calls ``Engine.run``, which serves the queue with the GIL released until a stop
or until the next chain is one it leaves to Python (a malformed or unusual request, memory
not yet mapped, ring corruption). The worker then takes exactly that chain with the Python
engine -- the same ring object, the same in-flight log, the same device -- hands the ring's
position and the (maybe grown) memory map back, and re-enters the loop. So every request is
served once, in order, by one of two engines that agree on the ring's state.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from typing import Any

from pyvduse.device.blk import BlkDevice, BlkStats, bad_request_log
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.engine import Engine
from pyvduse.ring.errors import RingError
from pyvduse.ring.inflight import InflightLog, LoggedQueue
from pyvduse.ring.memory import RegionMap
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.tuning import DEFAULT_TUNING, QueueTuning
from pyvduse.runtime.worker import QueueWorker

log = logging.getLogger(__name__)


def stats_of(counters: dict[str, Any]) -> BlkStats:
    """A native engine's request counters as ``BlkStats``."""
    return BlkStats(by_type={int(t): n for t, n in counters["by_type"].items() if n},
                    errors=counters["errors"], bytes_read=counters["bytes_read"],
                    bytes_written=counters["bytes_written"])


def run_native(engine: Engine, ring: SplitQueue, inflight: InflightLog | None,
               memory: RegionMap, kick_fd: int, stop_fd: int, serve_one: Callable[[], bool],
               stopping: Callable[[], bool]) -> None:
    """Alternate the native loop and ``serve_one`` (the Python engine taking the one chain
    the loop left) until the loop returns stopped; raises what ``serve_one`` raises."""
    while not stopping():
        engine.set_position(*ring.position())
        code = engine.run(kick_fd, stop_fd)
        last_avail, used, signalled, seq = engine.position()
        ring.set_position(last_avail, used, signalled)
        if inflight is not None:
            inflight.seq = seq
        if code == native.RUN_STOPPED:
            return
        if not serve_one():  # the loop saw a chain there a moment ago
            raise RingError("the avail index went backwards")
        engine.set_regions(native.region_tuples(memory))


class NativeQueueWorker(QueueWorker):
    """Serves one split virtio-blk queue with the native engine, Python for the rest."""

    def __init__(
        self,
        device: BlkDevice,
        index: int,
        queue: SplitQueue | LoggedQueue,
        kick_fd: int,
        notify: Callable[[int], None],
        memory: RegionMap,
        irq: tuple[int, int] | None,
        resubmit: list[Any] | None = None,
        *,
        resumed: bool = False,
        tuning: QueueTuning = DEFAULT_TUNING,
        cpus: list[int] | None = None,
        irq_follow: tuple[str, list[int]] | None = None,
    ) -> None:
        self.index = index
        self.ring = queue.queue if isinstance(queue, LoggedQueue) else queue
        self.log: InflightLog | None = queue.log if isinstance(queue, LoggedQueue) else None
        # The engine writes its CPU there (--irq-cpus follow); ours to close.
        path, follow_cpus = irq_follow or (None, [])
        self._affinity_fd = _open_for_writing(path, index)
        try:  # first, as it may refuse (ValueError) before the worker holds anything else
            self.engine = native.build(device, index, self.ring, memory, self.log, irq, notify,
                                       self._backend_error, tuning.poll_us * 1000,
                                       tuning.publish_us * 1000, tuning.hold_us * 1000,
                                       self._affinity_fd, follow_cpus)
        except BaseException:
            self._close_affinity()
            raise
        super().__init__(device, index, queue, kick_fd, notify, resubmit, resumed=resumed,
                         tuning=tuning, cpus=cpus)
        self.blk = device
        self.memory = memory
        self.deferred = 0  # chains the native loop left to Python
        self.counters.native = self.engine
        device.stats_sources[index] = self._engine_stats

    @property
    def completed(self) -> int:
        live = self.counters.native is self.engine
        return self._completed + (int(self.engine.counters()["completed"]) if live else 0)

    def indices(self) -> tuple[int, int]:
        last_avail, used, _, _ = self.engine.position()
        return last_avail, used

    def _engine_stats(self) -> BlkStats:
        return stats_of(self.engine.counters())

    def _backend_error(self, rtype: int, sector: int, err: int) -> None:
        bad_request_log.warning("queue %d: request type %d at sector %d failed: %s", self.index,
                                rtype, sector, OSError(err, "").strerror or err)

    def stop(self) -> None:
        self.engine.request_stop()
        super().stop()
        self._retire_engine()
        self._close_affinity()

    def _close_affinity(self) -> None:
        if self._affinity_fd >= 0:
            os.close(self._affinity_fd)
            self._affinity_fd = -1

    def _retire_engine(self) -> None:
        """Fold the engine's counters into the Python ones, which outlive this worker."""
        live = self.counters.native is self.engine
        if not live:
            return
        c = self.engine.counters()
        self.counters.absorb(c["latency"], c["latency_ns"])
        self._completed += c["completed"]
        self.blk.queue_stats[self.index].add(stats_of(c))
        self.counters.native = None
        self.blk.stats_sources.pop(self.index, None)
        self.engine.close()  # its views of the disk and the log would keep them from closing

    def _run(self) -> None:
        try:
            if self._resumed:
                self._replay()
            run_native(self.engine, self.ring, self.log, self.memory, self.kick_fd,
                       self._stop_fd, self._serve_one, lambda: self._stopping)
        except RingError as e:
            self.broken = str(e)
            log.error("queue %d: the ring is corrupt, stopping it until reset: %s",
                      self.index, e)
            self._wait_for_stop()
        except Exception as e:  # never let a ring take the process down
            self.broken = f"{type(e).__name__}: {e}"
            log.exception("queue %d stopped", self.index)
        finally:
            self.counters.started_at = 0

    def _serve_one(self) -> bool:
        """The chain the native loop left: take it with the Python engine."""
        q, c = self.queue, self.counters
        chain = q.pop()
        if chain is None:
            return False
        self.deferred += 1
        c.started_at = t = time.monotonic_ns()
        q.push(chain.head, self.device.handle(self.index, chain), chain.ndesc)
        done = time.monotonic_ns()
        c.started_at = 0
        c.hist[((done - t) // 1000).bit_length()] += 1
        c.sum_ns += done - t
        self._completed += 1
        self._publish()
        return True

    def _wait_for_stop(self) -> None:
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        while not self._stopping:
            poller.poll()


def _open_for_writing(path: str | None, index: int) -> int:
    """An fd of ``path`` open for writing, or -1 (no path, or it cannot be opened: logged,
    and the interrupts stay where they were put)."""
    if path is None:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        log.warning("queue %d: interrupts cannot follow the worker: %s", index, e)
        return -1
