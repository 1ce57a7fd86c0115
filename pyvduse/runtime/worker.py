"""A queue worker: the thread that serves one virtqueue.

It sleeps on the queue's kick eventfd, then drains the ring in rounds (at most one queue's
worth of requests per round, so a flood cannot starve the stop check), publishes the used
index once per round, interrupts the driver only when it asked, and re-enables kicks with
the re-check the spec requires before sleeping again. Nothing a ring contains can make it
raise: a corrupt ring stops this queue and is reported, the process carries on.

Accounting: each queue has a ``QueueCounters`` (when the request in flight was taken, a log2
microsecond latency histogram) that outlives its workers, since a reset or an IOTLB change
starts new ones. Only the queue's worker writes it: per request one clock read, two stores
and one list increment, no lock; readers on other threads (the management socket, metrics)
see values that are at most one request old.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pyvduse.device.base import VirtioDevice
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.queue import VirtQueue
from pyvduse.runtime.tuning import DEFAULT_TUNING, QueueTuning

log = logging.getLogger(__name__)

#: Latency buckets: bucket b counts requests that took less than 2**b µs and at least
#: 2**(b-1) µs (bucket 0: under 1 µs). 64 covers any duration a clock can measure.
LATENCY_BUCKETS = 64
DRAIN_POLL_SECONDS = 0.01


class QueueCounters:
    """In-flight and latency accounting of one queue, written by its worker only.

    A request's latency runs from when the worker takes it from the ring to when its
    completion is pushed (the device's own time, queueing in the driver excluded). While a
    native engine serves the queue (``native``), its own counters are added in.
    """

    __slots__ = ("hist", "native", "started_at", "sum_ns")

    def __init__(self) -> None:
        #: ``time.monotonic_ns()`` when the request in flight was taken; 0 when none is.
        self.started_at = 0
        self.hist = [0] * LATENCY_BUCKETS
        self.sum_ns = 0  # sum of the latencies of the completed requests
        self.native: NativeCounters | None = None

    @property
    def started(self) -> int:
        n = self.native
        return (n.started if n is not None else 0) or self.started_at

    def latency_totals(self) -> tuple[list[int], int]:
        """(histogram, sum of latencies in ns), from one read of a native engine's counters
        so that the two agree."""
        n = self.native
        if n is None:
            return list(self.hist), self.sum_ns
        c = n.counters()
        extra: list[int] = c["latency"]
        return ([a + b for a, b in zip(self.hist, extra, strict=True)],
                self.sum_ns + int(c["latency_ns"]))

    @property
    def latency(self) -> list[int]:
        return self.latency_totals()[0]

    @property
    def latency_ns(self) -> int:
        return self.latency_totals()[1]

    @property
    def in_flight(self) -> int:
        """Requests taken but not completed (the device handles one at a time: 0 or 1)."""
        return 1 if self.started else 0

    @property
    def completed(self) -> int:
        return sum(self.latency)

    def absorb(self, hist: list[int], sum_ns: int) -> None:
        """Add a finished native engine's latency counters to our own."""
        for b, n in enumerate(hist):
            self.hist[b] += n
        self.sum_ns += sum_ns


class NativeCounters(Protocol):
    """What ``QueueCounters`` reads of a native engine."""

    @property
    def started(self) -> int: ...

    def counters(self) -> dict[str, Any]: ...


_counters: weakref.WeakKeyDictionary[VirtioDevice, dict[int, QueueCounters]] = (
    weakref.WeakKeyDictionary())
_counters_lock = threading.Lock()


def queue_counters(device: VirtioDevice) -> dict[int, QueueCounters]:
    """The counters of every queue of ``device`` that has been served, by queue index."""
    with _counters_lock:
        return dict(_counters.get(device, {}))


def _counters_for(device: VirtioDevice, index: int) -> QueueCounters:
    with _counters_lock:
        per_device = _counters.setdefault(device, {})
        c = per_device.get(index)
        if c is None:
            c = per_device[index] = QueueCounters()
        return c


class QueueWorker:
    """Serves one queue on its own thread until ``stop``."""

    def __init__(
        self,
        device: VirtioDevice,
        index: int,
        queue: VirtQueue,
        kick_fd: int,
        notify: Callable[[int], None],
        resubmit: list[Chain] | None = None,
        *,
        resumed: bool = False,
        tuning: QueueTuning = DEFAULT_TUNING,
        cpus: list[int] | None = None,
    ) -> None:
        self.device = device
        self.index = index
        self.queue = queue
        self.tuning = tuning
        self.cpus = cpus  # the CPUs the thread runs on; None: any
        self.kick_fd = kick_fd
        self._notify = notify
        self._resubmit = resubmit or []  # requests in flight when the last daemon died
        self._resumed = resumed  # this queue was served by a daemon that died
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self.broken: str | None = None
        self._completed = 0
        self.counters = _counters_for(device, index)
        self._thread = threading.Thread(target=self._main, name=f"vq{index}", daemon=True)

    @property
    def completed(self) -> int:
        """Requests this worker has completed."""
        return self._completed

    def indices(self) -> tuple[int, int]:
        """(last avail index taken, used index pushed), as the serving engine has them."""
        return self.queue.last_avail_idx, self.queue.used_idx

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait: after this returns the worker touches no driver memory."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._stop_fd)
        self._stop_fd = -1

    def drain(self, timeout: float, abort: threading.Event | None = None) -> bool:
        """Drain hook: wait until the request in flight now has completed (True), or until
        ``timeout`` seconds pass or ``abort`` is set (False). Requests taken meanwhile are not
        waited for, so a busy queue cannot keep this waiting forever."""
        return self.wait_done(self.counters.started, timeout, abort)

    def wait_done(self, mark: int, timeout: float,
                  abort: threading.Event | None = None) -> bool:
        """Wait until the request that was in flight when ``counters.started`` read ``mark``
        has completed (at once if ``mark`` is 0), or the worker has ended."""
        c = self.counters
        deadline = time.monotonic() + timeout
        while mark and c.started == mark and self._thread.is_alive():
            if time.monotonic() >= deadline or (abort is not None and abort.is_set()):
                return False
            time.sleep(DRAIN_POLL_SECONDS)
        return True

    def _main(self) -> None:
        with contextlib.suppress(OSError):  # the thread's name in top -H, ps -L and /proc
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(
                self._thread.name)
        if self.cpus:
            try:
                os.sched_setaffinity(0, self.cpus)  # 0: this thread
            except OSError as e:  # e.g. a cgroup that does not allow those CPUs
                log.warning("queue %d: worker left unpinned: %s", self.index, e)
        self._run()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            if self._resumed:
                self._replay()
            self._drain()  # requests may be waiting from before we started
            while not self._stopping:
                events = poller.poll()
                if self._stopping:
                    break
                for fd, _ in events:
                    if fd == self.kick_fd:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self.kick_fd)
                if self.broken is None:
                    self._drain()
        except Exception as e:  # never let a ring take the process down
            self.broken = f"{type(e).__name__}: {e}"
            log.exception("queue %d stopped", self.index)
        finally:
            self.counters.started_at = 0  # nothing is in flight any more

    def _replay(self) -> None:
        """Take over from a dead daemon: serve again, in their original order, the requests
        it left in flight, then interrupt the driver once whatever it asked for. The dead
        daemon may have published completions and died before its interrupt: with nothing
        else in flight the driver would wait for that interrupt forever (a spurious one is
        harmless: the driver finds nothing new)."""
        q, dev, idx = self.queue, self.device, self.index
        if self._resubmit:
            for chain in self._resubmit:
                q.push(chain.head, dev.handle(idx, chain), chain.ndesc)
            self._completed += len(self._resubmit)
            log.info("queue %d: repeated %d request(s) left in flight", idx,
                     len(self._resubmit))
            self._resubmit = []
            q.publish()
        self._notify(idx)

    def _publish(self) -> None:
        """Make the pushed completions visible; interrupt if the driver asked for it."""
        if self.queue.publish():
            self._notify(self.index)

    def _drain(self) -> None:
        q, dev, idx = self.queue, self.device, self.index
        pop, push = q.pop, q.push
        c, hist, clock = self.counters, self.counters.hist, time.monotonic_ns
        publish_ns, hold_ns = self.tuning.publish_us * 1000, self.tuning.hold_us * 1000
        try:
            while not self._stopping:
                q.disable_kicks()
                n = 0
                t = start = published = clock()  # one read per request: its end, next start
                while n < q.num and not self._stopping:
                    chain = pop()
                    if chain is None:
                        break
                    c.started_at = t
                    push(chain.head, dev.handle(idx, chain), chain.ndesc)
                    done = clock()
                    c.started_at = 0
                    took, t = done - t, done
                    hist[(took // 1000).bit_length()] += 1
                    n += 1
                    if took >= publish_ns or done - published >= hold_ns:  # a long request:
                        published = done  # do not hold it back for the whole round
                        self._publish()
                c.sum_ns += t - start
                self._completed += n
                self._publish()
                if n < q.num and not q.enable_kicks():
                    return
        except RingError as e:
            self.broken = str(e)
            log.error("queue %d: the ring is corrupt, stopping it until reset: %s", idx, e)
