"""A queue worker whose hot loop is the native engine (``pyvduse.fastpath``): a virtio-blk
queue, or one of virtio-net's two over a TAP.

The thread calls ``Engine.run``, which serves the queue with the GIL released until a stop
or until the next chain is one it leaves to Python (a malformed or unusual request, memory
not yet mapped, ring corruption). The worker then takes exactly that chain with the Python
engine -- the same ring object, the same in-flight log, the same device -- hands the ring's
position and the (maybe grown) memory map back, and re-enters the loop. So every request is
served once by one of two engines that agree on the ring's state.

With ``--aio io_uring`` a file backend's requests are in flight in the engine's io_uring
while it runs, while Python takes a chain, and across a pause (a remap): the engine keeps
them and completes them in any order. Stopping waits for them up to the grace period; what
is left then is abandoned (dropped; the server fences the memory) and the engine is kept
until the kernel has finished with it.

A virtio-net receive queue is the exception to "the worker takes exactly that chain": the
engine takes a receive buffer only when a frame fills it, so when it leaves one to Python
the worker first only walks it (``LeftReceiveBuffers``) and lets the engine try again; a
buffer the engine leaves twice, or a malformed one, is taken and given back empty
(``NetDevice.handle``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi import virtio_net as vn
from pyvduse.backend.base import CallAbandoned
from pyvduse.device.base import VirtioDevice
from pyvduse.device.blk import BlkStats
from pyvduse.device.net import NativeNet, NetStats
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.config import EngineTuning
from pyvduse.fastpath.engine import Engine
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.inflight import InflightLog, LoggedQueue
from pyvduse.ring.memory import RegionMap
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.executors import Aio, Executors
from pyvduse.runtime.tuning import DEFAULT_TUNING, QueueTuning
from pyvduse.runtime.worker import QueueCounters, QueueWorker, Totals

log = logging.getLogger(__name__)


def stats_of(counters: dict[str, Any]) -> BlkStats:
    """A native engine's request counters as ``BlkStats``."""
    return BlkStats(
        by_type={int(t): n for t, n in counters["by_type"].items() if n},
        errors=counters["errors"],
        bytes_read=counters["bytes_read"],
        bytes_written=counters["bytes_written"],
    )


def net_stats_of(counters: dict[str, Any]) -> NetStats:
    """A native engine's frame counters as ``NetStats`` (bad chains are Python's)."""
    net = counters["net"]
    return NetStats(packets=net["packets"], bytes=net["bytes"], drops=net["drops"])


def totals_of(counters: dict[str, Any]) -> Totals:
    """A native engine's latency and depth counters."""
    return Totals(
        list(counters["latency"]),
        int(counters["latency_ns"]),
        list(counters["depth_hist"]),
        int(counters["depth_sum"]),
    )


def run_native(
    engine: Engine,
    ring: SplitQueue,
    inflight: InflightLog | None,
    memory: RegionMap,
    kick_fd: int,
    stop_fd: int,
    serve_one: Callable[[], bool],
    stopping: Callable[[], bool],
    nbd_lost: Callable[[], None] | None = None,
) -> None:
    """Alternate the native loop and ``serve_one`` (the Python engine taking the one chain
    the loop left) until the loop returns stopped; raises what ``serve_one`` raises. When
    the loop lost its NBD connection, ``nbd_lost`` reconnects (or fails the requests that
    wait) and the loop goes on."""

    def take_position() -> None:
        last_avail, used, signalled, seq, seen = engine.position()
        ring.set_position(last_avail, used, signalled, seen)
        if inflight is not None:
            inflight.seq = seq

    while not stopping():
        engine.set_position(*ring.position())
        code = engine.run(kick_fd, stop_fd)
        take_position()
        if code == native.RUN_STOPPED:
            return
        if code == native.RUN_NBD_LOST:
            if nbd_lost is not None:
                nbd_lost()
                take_position()  # requests failed or completed meanwhile were published
            continue
        if not serve_one():  # the loop saw a chain there a moment ago
            raise RingError("the avail index went backwards")
        engine.set_regions(native.region_tuples(memory))


_no_uring_said = threading.Event()


def _say_no_uring_once() -> None:
    """Once per process: io_uring was asked for (the default) and this build lacks it."""
    if _no_uring_said.is_set():
        return
    _no_uring_said.set()
    log.warning(
        "this build of the native engine has no io_uring (liburing-dev was missing when it "
        "was built): it serves the file with synchronous I/O, as with --aio sync; "
        "install liburing-dev and reinstall pyvduse for io_uring, or choose --aio threads (the "
        "Python engine with a thread pool)"
    )


class NativeQueueWorker(QueueWorker):
    """Serves one split virtio-blk or virtio-net queue with the native engine, Python for
    the rest."""

    def __init__(
        self,
        device: VirtioDevice,
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
        executors: Executors | None = None,
        counters: QueueCounters | None = None,
    ) -> None:
        self.index = index
        self.ring = queue.queue if isinstance(queue, LoggedQueue) else queue
        self.log: InflightLog | None = queue.log if isinstance(queue, LoggedQueue) else None
        # The engine writes its CPU there (--irq-cpus follow); ours to close.
        path, follow_cpus = irq_follow or (None, [])
        self._affinity_fd = _open_for_writing(path, index)
        plan = native.plan_of(device, packed=False)
        if isinstance(plan, str):
            self._close_affinity()
            raise ValueError(plan)
        is_net = isinstance(plan, NativeNet)
        storage = None if isinstance(plan, NativeNet) else plan.storage
        uring = storage is not None and tuning.aio is Aio.IO_URING and storage.kind == "fd"
        if uring and not native.uring_built():  # still the native engine, synchronous I/O
            _say_no_uring_once()
            uring = False
        #: The backend whose connection for this queue the engine drives (NBD).
        self.nbd = None if storage is None else storage.connections
        nbd_handle = None
        aio = native.AIO_URING if uring else native.AIO_SYNC
        if self.nbd is not None:
            aio = native.AIO_NBD
            try:
                nbd_handle = self.nbd.lend(index, self._switch_nbd, self._inline_gives_up)
            except Exception as e:  # the connection cannot be lent now (NbdError)
                self._close_affinity()
                raise ValueError(str(e)) from None
        # first, as it may refuse (ValueError; OSError: no io_uring) before the worker holds
        # anything else
        try:
            engine_tuning = EngineTuning(
                aio,
                poll_ns=tuning.poll_us * 1000,
                publish_ns=tuning.publish_us * 1000,
                hold_ns=tuning.hold_us * 1000,
            )
            self.engine = native.build(
                plan,
                index,
                self.ring,
                memory,
                self.log,
                irq,
                notify,
                self._backend_error,
                tuning=engine_tuning,
                affinity_fd=self._affinity_fd,
                follow_cpus=follow_cpus,
                inflight=self.ring.in_flight,
                nbd=nbd_handle,
            )
        except BaseException:
            self._close_affinity()
            if self.nbd is not None:
                self.nbd.give_back(index, reusable=True)
            raise
        super().__init__(
            device,
            index,
            queue,
            kick_fd,
            notify,
            resubmit,
            resumed=resumed,
            tuning=tuning,
            cpus=cpus,
            executors=executors,
            counters=counters,
        )
        self.device_stats = plan.stats
        #: The engine's counters as the device keeps them.
        self._stats_of: Callable[[dict[str, Any]], Any] = net_stats_of if is_net else stats_of
        #: A receive queue of virtio-net: buffers left to Python are walked first.
        self._receive = LeftReceiveBuffers(self.ring) if is_net and index == vn.RX_QUEUE else None
        self.memory = memory
        self.deferred = 0  # chains the native loop left to Python
        self.abandoned_native = 0  # the engine's requests dropped at a stop
        self._give_up_at: float | None = None  # stopping: when an inline request is dropped
        self._engine_live = True  # its counters are not yet folded into ours
        plan.stats.attach_engine(index, self._engine_stats)

    @property
    def completed(self) -> int:
        live = self._engine_live
        return self._completed + (int(self.engine.counters()["completed"]) if live else 0)

    def indices(self) -> tuple[int, int]:
        last_avail, used, *_ = self.engine.position()
        return last_avail, used

    @property
    def aio(self) -> str:
        if self.engine.aio == native.AIO_NBD:
            return "nbd"
        return "io_uring" if self.engine.aio == native.AIO_URING else "sync"

    # -- LiveQueue: the engine's requests as well as Python's ----------------------------------

    def in_flight_count(self) -> int:
        native_count = self.engine.in_flight() if self._engine_live else 0
        return super().in_flight_count() + native_count

    def oldest_started(self) -> int:
        starts = [t for t in (super().oldest_started(), self.engine.started if self._engine_live else 0) if t]
        return min(starts, default=0)

    def extra_latency(self) -> Totals:
        if not self._engine_live:
            return super().extra_latency()
        return totals_of(self.engine.counters())

    def drain_mark(self) -> int:
        """The engine's take count (Python's share of the requests completes inline)."""
        return int(self.engine.counters()["taken"]) if self._engine_live else 0

    def drained(self, mark: int) -> bool:
        if not self._engine_live:
            return True
        oldest = int(self.engine.counters()["oldest_taken"])
        return oldest == 0 or oldest > mark

    def _engine_stats(self) -> Any:
        return self._stats_of(self.engine.counters())

    def _backend_error(self, rtype: int, sector: int, err: int) -> None:
        self.device.request_log.warning(
            "queue %d: %s at sector %d failed: %s",
            self.index,
            vb.request_type_name(rtype),
            sector,
            OSError(err, "").strerror or err,
        )

    def request_stop(self, grace: float | None = None) -> None:
        self.engine.request_stop()
        super().request_stop(grace)

    def pause(self, timeout: float = 5.0) -> bool:
        self.engine.request_pause()
        return super().pause(timeout)

    def settle(self, timeout: float) -> int:
        """While paused: wait up to ``timeout`` s for the engine's requests (they are
        published as they end); the ones still running are poisoned, they will complete as
        failed. Returns how many those are."""
        left = self.engine.wait_idle(int(max(timeout, 0.0) * 1e9))
        if left:
            self.engine.poison_in_flight()
        return left

    def join(self) -> None:
        super().join()
        in_flight = self.engine.in_flight() if self._engine_live else 0
        self._retire_engine()
        self._close_affinity()
        if self.nbd is not None:  # an abandoned engine keeps its handle: ours reconnects
            self.nbd.give_back(self.index, reusable=in_flight == 0)
            self.nbd = None

    def abandoned_owners(self) -> list[object]:
        """The mappings an abandoned engine may still write into: every region it knew."""
        if not self.abandoned_native:
            return []
        return [r.owner if r.owner is not None else r.mem.obj for r in self.memory.regions]

    def _close_affinity(self) -> None:
        if self._affinity_fd >= 0:
            os.close(self._affinity_fd)
            self._affinity_fd = -1

    def _retire_engine(self) -> None:
        """Fold the engine's counters into the Python ones, which outlive this worker."""
        if not self._engine_live:
            return
        c = self.engine.counters()
        self.counters.absorb(totals_of(c))
        self._completed += c["completed"]
        self._engine_live = False
        self.device_stats.retire_engine(self.index, self._stats_of(c))
        if self.engine.in_flight():  # abandoned, the kernel still has some of its requests
            _graveyard.keep(self.engine, self.index)
        else:
            self.engine.close()  # its views of the disk and the log would keep them open

    def _run(self) -> None:
        try:
            if self._resumed:
                self._replay()
            while not self._stopping:
                run_native(
                    self.engine,
                    self.ring,
                    self.log,
                    self.memory,
                    self.kick_fd,
                    self._stop_fd,
                    self._serve_one,
                    lambda: self._stopping or self._pause_wanted,
                    self._nbd_lost,
                )
                if self._pause_wanted and not self._stopping:
                    self._park_native()
        except RingError as e:
            self._broke(str(e))
            log.error("queue %d: the ring is corrupt, stopping it until reset: %s", self.index, e)
            self._wait_for_stop()
        except Exception as e:  # never let a ring take the process down
            self._broke(f"{type(e).__name__}: {e}")
            log.exception("queue %d stopped", self.index)
            self._wait_for_stop()

    def _nbd_lost(self) -> None:
        """The engine's NBD connection is gone, with requests parked: reconnect on this
        thread (the ring waits meanwhile; a stop or pause cuts it short), then resend them
        or fail them."""
        assert self.nbd is not None
        progressed = bool(self.engine.counters().get("nbd_ok", 1))
        handle = self.nbd.reconnect_native(
            self.index, lambda: self._stopping or self._pause_wanted, progressed
        )
        if handle is not None:
            self.engine.set_nbd(handle)
        elif not (self._stopping or self._pause_wanted):
            self.engine.fail_parked()

    def _inline_gives_up(self) -> bool:
        """Stopping, and the request Python serves inline has had the grace period."""
        if not self._stopping:
            return False
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + self._grace
        return time.monotonic() >= self._give_up_at

    def _switch_nbd(self, handle: object, timeout: float = 5.0) -> bool:
        """From another thread (a resize): pause, let the engine's NBD commands finish on
        the old handle, give it the new one, resume. False (nothing changed) when they did
        not finish within ``timeout`` or the worker did not pause."""
        try:
            if not self.pause(timeout) or not self._engine_live:
                return False
            if self.engine.wait_idle(int(timeout * 1e9)) > self.engine.parked:
                return False
            self.engine.set_nbd(handle)
            return True
        finally:
            self.resume()

    def _park_native(self) -> None:
        """Paused for a remap: the engine keeps its requests (the control thread may wait
        for them, see ``settle``); then the ring and the engine take the new map."""
        self._parked.set()
        self._resume.wait()
        self._parked.clear()
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._stop_fd)  # pause() woke the loop with it
        self.engine.resume()
        # settle() may have completed requests meanwhile: the engine's position is the truth
        last_avail, used, signalled, seq, seen = self.engine.position()
        self.ring.set_position(last_avail, used, signalled, seen)
        if self.log is not None:
            self.log.seq = seq
        if self._stopping:
            return
        self.queue.remap()  # RingError: the ring is gone with the old map
        try:
            self.engine.set_regions(native.region_tuples(self.memory))
        except ValueError as e:
            raise RingError(f"the ring is not mapped after the remap: {e}") from None

    def _wind_down(self) -> None:
        """Stopping: the engine's requests get the grace period to finish (published as
        they end, on this thread: io_uring requests belong to the thread that submitted
        them), then the rest are abandoned."""
        try:
            if self._engine_live and self.engine.in_flight():
                left = self.engine.wait_idle(int(self._grace * 1e9))
                if left:
                    self.engine.abandon()
                    self.abandoned_native += left
                    log.warning(
                        "queue %d: %d request(s) still in flight after %.1f s; their results will be dropped",
                        self.index,
                        left,
                        self._grace,
                    )
        except Exception:
            log.exception("queue %d: stopping the native engine failed", self.index)
        super()._wind_down()

    def _replay(self) -> None:
        """As the Python worker's, but inline: the native loop takes over right after."""
        for chain in self._resubmit:
            self._serve_inline(chain)
        if self._resubmit:
            log.info("queue %d: repeated %d request(s) left in flight", self.index, len(self._resubmit))
            self._resubmit = []
            self._publish(interrupt=False)
        self._notify(self.index)

    def _serve_one(self) -> bool:
        """The chain the native loop left: take it with the Python engine, inline (the
        native loop's requests wait meanwhile: such chains are rare)."""
        if self._receive is not None and self._receive.walk_only():
            return True
        chain = self.queue.pop()
        if chain is None:
            return False
        self.deferred += 1
        self._serve_inline(chain)
        self._publish()
        return True

    def _serve_inline(self, chain: Chain) -> None:
        q, c = self.queue, self.counters
        t = time.monotonic_ns()
        c.depth[1] += 1
        c.depth_sum += 1
        try:
            result = self.device.handle(self.index, chain)
            if not isinstance(result, int):  # a device with a native plan serves inline
                raise TypeError(f"handle() returned {type(result).__name__}, not a length")
            written = result
        except CallAbandoned:  # stopping with it at the server: dropped, its memory fenced
            self.abandoned_native += 1
            log.warning(
                "queue %d: request %d still at the backend while stopping; its result will be dropped",
                self.index,
                chain.head,
            )
            return
        except Exception as e:  # the device's bug fails this request, not the queue
            self.device.request_log.failure(
                "queue %d: %s failed", self.index, self.device.describe_request(chain), error=e
            )
            written = self.device.write_failure(chain)
        q.push(chain.head, written, chain.ndesc)
        done = time.monotonic_ns()
        c.hist[((done - t) // 1000).bit_length()] += 1
        c.sum_ns += done - t
        self._completed += 1


class LeftReceiveBuffers:
    """The receive buffers a virtio-net receive queue's engine leaves to Python. The engine
    takes a buffer only once a frame fills it, so Python must not take one it could still
    use: ``walk_only`` walks the next one without taking it (the walk maps memory the engine
    had not been given) so that the engine tries it again, and says False when it is
    malformed or was walked already (the engine still cannot use it): then it is taken and
    given back empty."""

    def __init__(self, ring: SplitQueue) -> None:
        self.ring = ring
        self._walked: tuple[int, int] | None = None  # (avail index, head) last walked

    def walk_only(self) -> bool:
        chain = self.ring.peek()
        if chain is None:
            return False
        key = (self.ring.last_avail_idx, chain.head)
        if chain.error is not None or key == self._walked:
            self._walked = None
            return False
        self._walked = key
        return True


class _Graveyard:
    """Abandoned engines whose requests the kernel has not finished: kept (with the memory
    those requests point into) until it has, then closed."""

    def __init__(self) -> None:
        self._engines: list[tuple[Engine, int]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def keep(self, engine: Engine, index: int) -> None:
        with self._lock:
            self._engines.append((engine, index))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._reap, name="pyvduse-graveyard", daemon=True)
                self._thread.start()

    def _reap(self) -> None:
        while True:
            with self._lock:
                engines = list(self._engines)
                if not engines:
                    self._thread = None
                    return
            for engine, index in engines:
                if engine.wait_idle(100_000_000) == 0:
                    engine.close()
                    log.info("queue %d: the last abandoned request ended", index)
                    with self._lock:
                        self._engines.remove((engine, index))


_graveyard = _Graveyard()


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
