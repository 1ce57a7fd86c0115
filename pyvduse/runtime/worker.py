"""A queue worker: the thread that owns one virtqueue, with many requests in flight.

It sleeps on the queue's kick eventfd (and on a completion eventfd), takes every chain the
driver made available in bounded rounds (at most one queue's worth per round, so a flood
cannot starve the stop check, and at most a budget between two kicks, so a ring that feeds
itself cannot keep it awake: ``ring.budget``), hands each to the device as a ``Request``, and pushes
completions as they come: inline when the device finished at once, or from the completion
queue other threads (the runtime's event loop, its thread pool, a user's own threads) fill.
Completions are published once per round or batch, the driver interrupted only when it
asked, and kicks re-enabled with the re-check the spec requires before sleeping again. The
ring is touched by this thread only. Nothing a ring contains, and nothing a device raises,
can make it stop: a corrupt ring stops this queue and is reported; a device's exception
fails that request.

Stopping with requests in flight (a driver reset, shutdown) waits for them up to a grace
period; those still running then are *abandoned*: their results are dropped, and the server
fences the memory they hold so that nothing they write reaches driver memory afterwards.
A memory remap instead *pauses* the worker: it stops touching the ring while the map
changes, requests keep running, and it resumes where it was.

Accounting: each queue has a ``QueueCounters`` (latency and queue-depth histograms) that
outlives its workers, since a reset starts new ones. Only the queue's worker writes it, with
plain integer adds and no lock; readers on other threads (the management socket, metrics)
see values that are at most one request old.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from pyvduse.device.base import VirtioDevice
from pyvduse.device.request import MAX_WRITTEN, Request, RequestError
from pyvduse.ring.budget import Budget
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.queue import VirtQueue
from pyvduse.runtime import fence
from pyvduse.runtime.executors import Executors
from pyvduse.runtime.tuning import DEFAULT_TUNING, QueueTuning

log = logging.getLogger(__name__)

#: Latency buckets: bucket b counts requests that took less than 2**b µs and at least
#: 2**(b-1) µs (bucket 0: under 1 µs). 64 covers any duration a clock can measure.
#: Depth buckets: bucket b counts requests taken when b.bit_length() were in flight with them
#: (bucket 1: alone, 2: 2-3, 3: 4-7, ...).
LATENCY_BUCKETS = 64
DRAIN_POLL_SECONDS = 0.01
#: How long a stopping worker waits for its requests when nobody said (the server passes
#: half the kernel's message timeout).
DEFAULT_GRACE_SECONDS = 5.0


class LiveQueue(Protocol):
    """What ``QueueCounters`` reads of the worker serving a queue now."""

    def in_flight_count(self) -> int: ...
    def oldest_started(self) -> int: ...
    def extra_latency(self) -> Totals: ...


class Totals(NamedTuple):
    """A queue's accounting at one instant: latency histogram, sum of latencies (ns), depth
    histogram and sum of the depths it was fed."""

    hist: list[int]
    sum_ns: int
    depth: list[int]
    depth_sum: int


class QueueCounters:
    """Latency and depth accounting of one queue, written by its worker only.

    A request's latency runs from when the worker takes it from the ring to when its
    completion is pushed (the device's own time, queueing in the driver excluded). ``live``
    is the worker serving the queue now: what is in flight is asked of it, and a native
    engine's own counters are added in through it.
    """

    __slots__ = ("depth", "depth_sum", "hist", "live", "sum_ns")

    def __init__(self) -> None:
        self.hist = [0] * LATENCY_BUCKETS
        self.depth = [0] * LATENCY_BUCKETS
        self.depth_sum = 0
        self.sum_ns = 0  # sum of the latencies of the completed requests
        self.live: LiveQueue | None = None

    @property
    def started(self) -> int:
        """``time.monotonic_ns()`` when the oldest request in flight was taken; 0: none."""
        live = self.live
        return live.oldest_started() if live is not None else 0

    @property
    def in_flight(self) -> int:
        """Requests taken and not yet completed."""
        live = self.live
        return live.in_flight_count() if live is not None else 0

    def totals(self) -> Totals:
        """Our counters plus a native engine's, read once so that they agree."""
        live = self.live
        if live is None:
            return Totals(list(self.hist), self.sum_ns, list(self.depth), self.depth_sum)
        t = live.extra_latency()
        return Totals(
            [a + b for a, b in zip(self.hist, t.hist, strict=True)],
            self.sum_ns + t.sum_ns,
            [a + b for a, b in zip(self.depth, t.depth, strict=True)],
            self.depth_sum + t.depth_sum,
        )

    def latency_totals(self) -> tuple[list[int], int]:
        t = self.totals()
        return t.hist, t.sum_ns

    @property
    def latency(self) -> list[int]:
        return self.totals()[0]

    @property
    def latency_ns(self) -> int:
        return self.totals()[1]

    @property
    def depth_hist(self) -> list[int]:
        return self.totals()[2]

    @property
    def completed(self) -> int:
        return sum(self.latency)

    def absorb(self, t: Totals) -> None:
        """Add a finished native engine's counters to our own."""
        for b, n in enumerate(t.hist):
            self.hist[b] += n
        for b, n in enumerate(t.depth):
            self.depth[b] += n
        self.sum_ns += t.sum_ns
        self.depth_sum += t.depth_sum


_NO_LATENCY = Totals([0] * LATENCY_BUCKETS, 0, [0] * LATENCY_BUCKETS, 0)


class QueueWorker:
    """Serves one queue on its own thread until ``stop``; the ``RequestSink`` of its
    requests."""

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
        executors: Executors | None = None,
        counters: QueueCounters | None = None,
    ) -> None:
        self.device = device
        self.index = index
        self.queue = queue
        self.tuning = tuning
        self.cpus = cpus  # the CPUs the thread runs on; None: any
        self.kick_fd = kick_fd
        self._notify = notify
        self.executors = executors or Executors()
        self._resubmit = resubmit or []  # requests in flight when the last daemon died
        self._resumed = resumed  # this queue was served by a daemon that died
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._grace = DEFAULT_GRACE_SECONDS
        self.broken: str | None = None
        self._completed = 0
        self._taken = 0  # requests taken so far: each Request's seq
        self._in_flight: dict[int, Request] = {}  # by head; written by this thread only
        self._done: collections.deque[tuple[Request, int]] = collections.deque()
        self._wake_pending = False
        self._dropping = False  # abandoned: completions are dropped, the ring left alone
        #: Requests still running when the worker stopped (their results are dropped).
        self.abandoned: list[Request] = []
        self._pause_wanted = False
        self._parked = threading.Event()
        self._resume = threading.Event()
        self._ident = 0
        self.budget = Budget(queue.num)  # requests between two kicks
        #: The queue's accounting, owned by the server (it outlives this worker).
        self.counters = counters if counters is not None else QueueCounters()
        self.counters.live = self
        self._thread = threading.Thread(target=self._main, name=f"vq{index}", daemon=True)

    @property
    def completed(self) -> int:
        """Requests this worker has completed."""
        return self._completed

    def indices(self) -> tuple[int, int]:
        """(last avail index taken, used index pushed), as the serving engine has them."""
        return self.queue.last_avail_idx, self.queue.used_idx

    @property
    def aio(self) -> str:
        """How this queue's blocking calls run (``threads``, ``sync``, ``io_uring``)."""
        return self.executors.aio.value

    # -- LiveQueue ----------------------------------------------------------------------

    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def oldest_started(self) -> int:
        return min((r.taken_at for r in self.in_flight_requests()), default=0)

    def extra_latency(self) -> Totals:
        return _NO_LATENCY

    def in_flight_requests(self) -> list[Request]:
        """A snapshot of the requests in flight (from any thread)."""
        for _ in range(10):  # the worker may change the dict while we copy
            try:
                return list(self._in_flight.values())
            except RuntimeError:
                continue
        return []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop and wait. Requests in flight get ``grace`` seconds to finish (0: none); those
        still running then are in ``abandoned`` and their results will be dropped. After
        this returns the worker touches no driver memory."""
        self.request_stop(grace)
        self.join()

    def request_stop(self, grace: float | None = None) -> None:
        """Ask the worker to stop (``join`` waits for it): lets several queues wind down at
        once."""
        if grace is not None:
            self._grace = max(grace, 0.0)
        self._stopping = True
        self._resume.set()
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)

    def join(self) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        for name in ("_stop_fd", "_done_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self.counters.live is self:
            self.counters.live = None

    def pause(self, timeout: float = 5.0) -> bool:
        """Stop touching the ring (a remap is coming) until ``resume``; requests in flight
        keep running and their completions wait. False if the worker did not park in time
        (or has ended: then it touches nothing anyway)."""
        self._resume.clear()
        self._parked.clear()
        self._pause_wanted = True
        os.eventfd_write(self._stop_fd, 1)
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():
            if self._parked.wait(0.01):
                return True
            if time.monotonic() >= deadline:
                return False
        return True

    def resume(self) -> None:
        self._pause_wanted = False
        self._resume.set()

    def drain_mark(self) -> int:
        """A mark for ``wait_done``: the requests taken until now."""
        return self._taken

    def drained(self, mark: int) -> bool:
        """No request taken at or before ``mark`` is still being worked on (idle requests,
        waiting for outside input, are not waited for)."""
        return all(r.seq > mark or r.idle for r in self.in_flight_requests())

    def drain(self, timeout: float, abort: threading.Event | None = None) -> bool:
        """Drain hook: wait until the requests in flight now have completed (True), or until
        ``timeout`` seconds pass or ``abort`` is set (False). Requests taken meanwhile are not
        waited for, so a busy queue cannot keep this waiting forever."""
        return self.wait_done(self.drain_mark(), timeout, abort)

    def wait_done(self, mark: int, timeout: float, abort: threading.Event | None = None) -> bool:
        """Wait until every request taken at or before ``mark`` has completed, or the worker
        has ended."""
        deadline = time.monotonic() + timeout
        while not self.drained(mark) and self._thread.is_alive():
            if time.monotonic() >= deadline or (abort is not None and abort.is_set()):
                return False
            time.sleep(DRAIN_POLL_SECONDS)
        return True

    # -- RequestSink: any thread ----------------------------------------------------------

    def finish(self, request: Request, written: int) -> None:
        if self._dropping and self._stop_fd < 0:
            return  # the worker has ended: nobody will push it
        if threading.get_ident() == self._ident:
            self._push_done(request, written)
            return
        self._done.append((request, written))
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError, ValueError):  # closed: the worker has ended
                os.eventfd_write(self._done_fd, 1)

    def finish_together(self, outcomes: list[tuple[Request, int]]) -> None:
        if self._dropping and self._stop_fd < 0:
            return
        if threading.get_ident() == self._ident:
            for request, written in outcomes:
                self._push_done(request, written)
            return
        # one extend: the worker's reap, which publishes only once the deque is empty, sees
        # all of them or none
        self._done.extend(outcomes)
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError, ValueError):
                os.eventfd_write(self._done_fd, 1)

    def fail(self, request: Request, why: BaseException | str | None) -> None:
        if why is not None:
            rl, what = self.device.request_log, self._describe(request)
            if isinstance(why, BaseException):  # the device's bug: its traceback, once
                rl.failure("queue %d: %s failed", self.index, what, error=why)
            else:
                rl.warning("queue %d: %s failed: %s", self.index, what, why)
        self.finish(request, self._failed_length(request))

    def _failed_length(self, request: Request) -> int:
        try:
            written = self.device.write_failure(request.chain)
        except Exception as e:
            self.device.request_log.failure(
                "queue %d: failing %s raised", self.index, self._describe(request), error=e
            )
            return 0
        return written if isinstance(written, int) and 0 <= written <= MAX_WRITTEN else 0

    def run(self, request: Request, coroutine: Coroutine[Any, Any, int]) -> None:
        self.executors.loop.submit(coroutine, lambda r, e: self._outcome(request, r, e))

    def run_blocking(self, request: Request, fn: Callable[[], int | Coroutine[Any, Any, int]]) -> None:
        if self.executors.inline_blocking:
            try:
                result = fn()
            except Exception as e:
                self._outcome(request, None, e)
                return
            self._outcome(request, result, None)
            return
        self.executors.pool.submit(fn, lambda r, e: self._outcome(request, r, e))

    def _describe(self, request: Request) -> str:
        try:
            return self.device.describe_request(request.chain)
        except Exception:  # the device's bug must not lose the message
            return f"request {request.head}"

    def _outcome(self, request: Request, result: object, error: BaseException | None) -> None:
        if error is None and inspect.iscoroutine(result):  # blocking work that goes on async
            self.run(request, result)
            return
        try:
            if error is not None:
                request.fail(error)
            else:
                request.complete(result)  # type: ignore[arg-type]  # checked there
        except RequestError as e:  # the device completed it itself, then returned too
            self.device.request_log.warning("queue %d: %s", self.index, e)

    # -- the worker thread ------------------------------------------------------------------

    def _main(self) -> None:
        self._ident = threading.get_ident()
        with contextlib.suppress(OSError):  # the thread's name in top -H, ps -L and /proc
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(self._thread.name)
        if self.cpus:
            try:
                os.sched_setaffinity(0, self.cpus)  # 0: this thread
            except OSError as e:  # e.g. a cgroup that does not allow those CPUs
                log.warning("queue %d: worker left unpinned: %s", self.index, e)
        try:
            self._run()
        finally:
            self._wind_down()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self._done_fd, select.POLLIN)
        try:
            if self._resumed:
                self._replay()
            self._serve()  # requests may be waiting from before we started
            budget = self.budget
            while not self._stopping:
                events = poller.poll(budget.timeout_ms(time.monotonic_ns()))
                if self._stopping:
                    break
                for fd, _ in events:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                    if fd == self.kick_fd:
                        budget.kicked()
                budget.woke(time.monotonic_ns())
                if self._pause_wanted:
                    self._park()
                    continue
                if self.broken is None:
                    self._reap()
                    self._serve()
        except Exception as e:  # never let a ring take the process down
            self._broke(f"{type(e).__name__}: {e}")
            log.exception("queue %d stopped", self.index)
            self._wait_for_stop()

    def _broke(self, why: str) -> None:
        self.broken = why
        self._dropping = True  # nothing more is published on a ring we cannot trust

    def _wait_for_stop(self) -> None:
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        while not self._stopping:
            poller.poll()
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._stop_fd)
            if self._pause_wanted:
                self._parked.set()

    def _park(self) -> None:
        """Paused for a remap: publish what is done, touch nothing until resumed, then take
        fresh views of the ring (its memory may have moved)."""
        if self.broken is None:
            self._reap()
            self._publish()
        self._parked.set()
        self._resume.wait()
        self._parked.clear()
        if self._stopping or self.broken is not None:
            return
        try:
            self.queue.remap()
        except RingError as e:
            self._broke(str(e))
            log.error("queue %d cannot be served after the remap: %s", self.index, e)
            return
        self._reap()
        self._serve()

    def _wind_down(self) -> None:
        """The worker is stopping: give requests in flight the grace period to finish, then
        abandon the rest (their results are dropped)."""
        try:
            deadline = time.monotonic() + self._grace
            poller = select.poll()
            poller.register(self._done_fd, select.POLLIN)
            while self._working():
                self._reap()
                left = deadline - time.monotonic()
                if not self._working() or left <= 0:
                    break
                poller.poll(max(int(left * 1000), 1))
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._done_fd)
            if self.broken is None:
                with contextlib.suppress(RingError):
                    self._publish(interrupt=False)
        except Exception:
            log.exception("queue %d: stopping failed", self.index)
        finally:
            self._dropping = True
            # idle requests (receive buffers with no packet) are dropped: their device
            # stopped whatever fills them before the queues stopped (quiesce)
            self.abandoned = [r for r in self._in_flight.values() if not r.idle]
            if self.abandoned:
                log.warning(
                    "queue %d: %d request(s) still in flight after %.1f s; their results will be dropped",
                    self.index,
                    len(self.abandoned),
                    self._grace,
                )

    def _working(self) -> bool:
        """Requests in flight that are being worked on (not idle)."""
        return any(not r.idle for r in self._in_flight.values())

    def _replay(self) -> None:
        """Take over from a dead daemon: serve again, in their original order, the requests
        it left in flight, then interrupt the driver once whatever it asked for. The dead
        daemon may have published completions and died before its interrupt: with nothing
        else in flight the driver would wait for that interrupt forever (a spurious one is
        harmless: the driver finds nothing new)."""
        if self._resubmit:
            for chain in self._resubmit:
                self._take(chain)
            log.info("queue %d: repeated %d request(s) left in flight", self.index, len(self._resubmit))
            self._resubmit = []
            self._reap()
            self._publish(interrupt=False)
        self._notify(self.index)

    def _take(self, chain: Chain) -> Request:
        """Hand one chain to the device as a request."""
        self._taken += 1
        req = Request(self.index, chain, self, self._taken, time.monotonic_ns())
        in_flight = self._in_flight
        in_flight[chain.head] = req
        depth = len(in_flight)
        c = self.counters
        c.depth[depth.bit_length()] += 1
        c.depth_sum += depth
        try:
            self.device.submit(req)
        except Exception as e:  # the device's bug fails this request, not the queue
            if req.done:
                self.device.request_log.failure(
                    "queue %d: submit raised after completing %s", self.index, self._describe(req), error=e
                )
            else:
                req.fail(e)
        return req

    def _push_done(self, req: Request, written: int) -> None:
        """On the worker thread: put one completion in the used ring (not yet published)."""
        head = req.chain.head
        if self._in_flight.get(head) is not req:
            if not self._dropping:
                log.warning(
                    "queue %d: ignored a completion of request %d, which is not in flight", self.index, head
                )
            return
        del self._in_flight[head]
        if self._dropping:  # a broken ring or an abandoned request: the result goes nowhere
            return
        if req.poisoned:  # its memory was unmapped while it ran: whatever it did is lost
            written = self._failed_length(req)
            status = req.chain.writable[-1:] if written else []
            if any(fence.fenced(v) for v in status):  # the failure went nowhere either:
                written = 0  # say that nothing was written (else the driver reads stale bytes)
        self.queue.push(head, written, req.chain.ndesc)
        took = time.monotonic_ns() - req.taken_at
        c = self.counters
        c.hist[(took // 1000).bit_length()] += 1
        c.sum_ns += took
        self._completed += 1

    def _reap(self) -> int:
        """Push the completions other threads have queued; returns how many."""
        self._wake_pending = False
        done = self._done
        n = 0
        while done:
            req, written = done.popleft()
            self._push_done(req, written)
            n += 1
        return n

    def _publish(self, interrupt: bool = True) -> None:
        """Make the pushed completions visible; interrupt if the driver asked for it."""
        if self._dropping:
            return
        if self.queue.publish() and interrupt:
            self._notify(self.index)

    def _serve(self) -> None:
        q = self.queue
        pop = q.pop
        clock = time.monotonic_ns
        publish_ns, hold_ns = self.tuning.publish_us * 1000, self.tuning.hold_us * 1000
        budget = self.budget
        try:
            while not self._stopping and not self._pause_wanted:
                if not budget.credit:  # spent: completions only, the kick stays asked for
                    self._reap()
                    self._publish()
                    if budget.sleep(clock()):
                        q.ask_for_kick()
                    return
                q.disable_kicks()
                n = 0
                published = clock()
                while n < q.num and budget.credit and not self._stopping:
                    chain = pop()
                    if chain is None:
                        break
                    budget.credit -= 1
                    t = clock()
                    self._take(chain)
                    n += 1
                    done = clock()
                    # a long request is not held back for the whole round
                    if done - t >= publish_ns or done - published >= hold_ns:
                        published = done
                        self._reap()
                        self._publish()
                self._reap()
                self._publish()
                if n < q.num and budget.credit and not q.enable_kicks():
                    return
        except RingError as e:
            self._broke(str(e))
            log.error("queue %d: the ring is corrupt, stopping it until reset: %s", self.index, e)
