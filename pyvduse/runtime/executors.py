"""Where requests that wait run: the runtime's event loop and its thread pool.

A device hands the runtime a coroutine (``Request.run``) or a blocking call
(``Request.run_blocking``); these are the places they run, one of each per served device,
started on first use and stopped with the server. Each takes a callback that receives the
outcome on the executing thread; the queue worker carries it back to its ring.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # both are imported on first use: a daemon that never needs them is
    import asyncio  # faster to start (a restart after kill -9 pays every import)
    import concurrent.futures

log = logging.getLogger(__name__)

#: ``callback(result, error)``: exactly one of the two is meaningful.
Outcome = Callable[[Any, BaseException | None], None]

DEFAULT_IO_THREADS = 64  # as QEMU's thread pool for aio=threads


class Aio(enum.Enum):
    """How blocking backend calls run: the user's ``--aio``."""

    IO_URING = "io_uring"  # the native loop's io_uring; Python-engine queues use threads
    THREADS = "threads"  # a thread pool, many calls of one queue at once
    SYNC = "sync"  # inline on the queue's worker: one request at a time


class EventLoopThread:
    """An asyncio event loop on its own daemon thread, started on first use."""

    def __init__(self, name: str = "pyvduse-aio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        import asyncio

        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=main, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop (started if it was not)."""
        return self._ensure()

    def submit(self, coroutine: Coroutine[Any, Any, Any], done: Outcome) -> None:
        import asyncio

        future = asyncio.run_coroutine_threadsafe(coroutine, self._ensure())
        future.add_done_callback(lambda f: _deliver(f, done))

    def run_sync(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the loop and wait for its result (raises its error)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self._ensure()).result(timeout)

    def close(self) -> None:
        """Stop the loop; coroutines still pending are cancelled."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        import asyncio

        def cancel_all() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(cancel_all)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()


class BlockingPool:
    """Threads for calls that may block, started as calls need them (up to ``threads``).

    Deliberately plain (a SimpleQueue and bare threads, no futures): a request's trip
    through the pool is on every request's path, and each object and lock it would take
    costs there.
    """

    def __init__(self, threads: int = DEFAULT_IO_THREADS, name: str = "pyvduse-io") -> None:
        import queue

        self.threads = threads
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Outcome] | None] = queue.SimpleQueue()
        self._started: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a call (approximate: only bounds new threads)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[], Any], done: Outcome) -> None:
        if self._closed:
            done(None, RuntimeError("the thread pool is closed"))
            return
        self._calls.put((fn, done))
        if self._idle <= 0 and len(self._started) < self.threads:
            with self._lock:
                if len(self._started) < self.threads:
                    t = threading.Thread(
                        target=self._serve, daemon=True, name=f"{self._name}-{len(self._started)}"
                    )
                    self._started.append(t)
                    t.start()

    def _serve(self) -> None:
        _name_thread()
        calls = self._calls
        while True:
            self._idle += 1
            item = calls.get()
            self._idle -= 1
            if item is None:
                return
            fn, done = item
            try:
                result = fn()
            except BaseException as e:  # the caller's to report
                done(None, e)
            else:
                done(result, None)

    def close(self) -> None:
        """Stop taking calls; the ones running finish on their own (never waited for: a
        hung backend must not hang the daemon's exit)."""
        self._closed = True
        for _ in self._started:
            self._calls.put(None)


def _name_thread() -> None:
    """The thread's Python name as its OS name too (top -H, ps -L): a new thread inherits
    the name of the thread that started it (a queue's ``vqN``)."""
    import contextlib
    from pathlib import Path

    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(
            threading.current_thread().name[:15]
        )


def _deliver(future: concurrent.futures.Future[Any], done: Outcome) -> None:
    import concurrent.futures

    if future.cancelled():
        done(None, concurrent.futures.CancelledError())
        return
    error = future.exception()
    done(None if error is not None else future.result(), error)


class Executors:
    """The event loop and thread pool of one served device, and the ``--aio`` choice."""

    def __init__(self, aio: Aio = Aio.THREADS, threads: int = DEFAULT_IO_THREADS) -> None:
        self.aio = aio
        self.loop = EventLoopThread()
        self.pool = BlockingPool(threads)

    @property
    def inline_blocking(self) -> bool:
        """Blocking calls run on the queue's own thread (``--aio sync``)."""
        return self.aio is Aio.SYNC

    def close(self) -> None:
        self.loop.close()
        self.pool.close()
