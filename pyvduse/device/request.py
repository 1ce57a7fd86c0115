"""One request in flight between a queue and its device: the chain and its completion.

The runtime makes a ``Request`` for every chain it takes from a ring and hands it to the
device (``VirtioDevice.submit``). The device completes it exactly once, now or later, from
any thread, in any order relative to the queue's other requests:

- ``complete(written)``: done, ``written`` bytes were stored in the writable buffers;
- ``fail()``: done, the way the device fails a request (virtio-blk: IOERR in the status byte);
- ``run(coroutine)``: the work is a coroutine; it runs on the runtime's event loop and its
  result (the bytes written) completes the request, an exception fails it;
- ``run_blocking(fn)``: the work may block (a ``preadv`` on a slow disk); the runtime runs
  it on its thread pool, or inline when the user chose synchronous I/O, and ``fn()``'s
  result completes the request (a coroutine as its result: the work goes on on the loop).

``complete_together`` completes several requests of one queue so that the driver sees all
of them or none (a packet spread over several receive buffers). A request that waits for
something from outside rather than being worked on (a receive buffer waiting for a packet)
is marked ``idle`` by its device: a drain does not wait for it, and a reset drops it at once
once the device has stopped its outside sources (``VirtioDevice.quiesce``).

Until it is completed the request owns its buffers; afterwards nothing may touch them (the
driver may already have reused them). This module knows nothing about threads: who carries
completions back to the ring is the ``RequestSink`` the runtime gives each request.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from pyvduse.ring.chain import Chain

#: The largest used length a virtio ring can carry (a u32).
MAX_WRITTEN = (1 << 32) - 1


class RequestSink(Protocol):
    """What the runtime does with a request's outcome (a queue worker implements it)."""

    def finish(self, request: Request, written: int) -> None:
        """The request is done with ``written`` bytes (called once, from any thread)."""
        ...

    def fail(self, request: Request, why: BaseException | str | None) -> None:
        """The request failed: complete it as the device fails requests; log ``why``."""
        ...

    def finish_together(self, outcomes: list[tuple[Request, int]]) -> None:
        """Several requests are done; the driver must see them in one publication."""
        ...

    def run(self, request: Request, coroutine: Coroutine[Any, Any, int]) -> None:
        """Run ``coroutine`` on the runtime's event loop; its result completes ``request``."""
        ...

    def run_blocking(self, request: Request, fn: Callable[[], int | Coroutine[Any, Any, int]]) -> None:
        """Run ``fn`` where blocking is allowed; its result completes ``request`` (a
        coroutine: run on the event loop, its result completes it)."""
        ...


class RequestError(RuntimeError):
    """A request was completed twice, or with a length that cannot be a used length."""


class Request:
    """A chain taken from queue ``queue``, waiting for the device to complete it."""

    __slots__ = ("_done", "_sink", "chain", "idle", "poisoned", "queue", "seq", "taken_at")

    def __init__(self, queue: int, chain: Chain, sink: RequestSink, seq: int = 0, taken_at: int = 0) -> None:
        self.queue = queue
        self.chain = chain
        self._sink = sink
        self._done = False
        #: Take order on its queue (1, 2, ...): what a drain waits for.
        self.seq = seq
        #: ``time.monotonic_ns()`` when the runtime took the chain.
        self.taken_at = taken_at
        #: Set by the runtime when the request's memory was unmapped while it was in flight:
        #: whatever it returns, it is failed.
        self.poisoned = False
        #: Set by the device while the request waits for outside input rather than being
        #: worked on (a receive buffer without a packet): drains do not wait for it.
        self.idle = False

    @property
    def head(self) -> int:
        """The id the driver knows the request by (descriptor head or buffer id)."""
        return self.chain.head

    @property
    def done(self) -> bool:
        return self._done

    def _claim(self) -> None:
        if self._done:
            raise RequestError(f"request {self.chain.head} of queue {self.queue} was already completed")
        self._done = True

    def complete(self, written: int) -> None:
        """Done: ``written`` bytes were stored in the chain's writable buffers."""
        self._claim()
        if not isinstance(written, int) or isinstance(written, bool) or not 0 <= written <= MAX_WRITTEN:
            self._sink.fail(self, f"completed with {written!r}, not a byte count 0..2^32-1")
            return
        self._sink.finish(self, written)

    def fail(self, why: BaseException | str | None = None) -> None:
        """Done, failed: the device writes what it writes for a failed request."""
        self._claim()
        self._sink.fail(self, why)

    def run(self, coroutine: Coroutine[Any, Any, int]) -> None:
        """Complete the request with what ``coroutine`` returns, on the runtime's loop."""
        self._sink.run(self, coroutine)

    def run_blocking(self, fn: Callable[[], int | Coroutine[Any, Any, int]]) -> None:
        """Complete the request with what ``fn()`` returns; ``fn`` may block. When it
        returns a coroutine, that runs on the runtime's event loop and its result completes
        the request."""
        self._sink.run_blocking(self, fn)

    def __repr__(self) -> str:
        state = "done" if self._done else "in flight"
        return f"<Request queue={self.queue} head={self.chain.head} seq={self.seq} {state}>"


def complete_together(outcomes: list[tuple[Request, int]]) -> None:
    """Complete requests of one queue at once: the driver sees every one of them in the same
    publication of the used ring, or (after a crash) none (``written`` as in ``complete``)."""
    if not outcomes:
        return
    sink = outcomes[0][0]._sink
    for request, written in outcomes:
        if request._sink is not sink:
            raise RequestError("requests completed together must come from one queue")
        if not isinstance(written, int) or isinstance(written, bool) or not 0 <= written <= MAX_WRITTEN:
            raise RequestError(
                f"request {request.head} completed with {written!r}, not a byte count 0..2^32-1"
            )
        if request._done:
            raise RequestError(f"request {request.head} of queue {request.queue} was already completed")
    for request, _ in outcomes:
        request._done = True
    sink.finish_together(outcomes)
