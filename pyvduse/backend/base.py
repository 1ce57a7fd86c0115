"""The storage interface a block device serves from, kept small on purpose.

Offsets and lengths are in bytes. Buffers are memoryviews straight into driver memory, so a
backend that can (``preadv``/``pwritev``) moves data with no extra copy. Errors are raised as
``OSError``; the device turns them into VIRTIO_BLK_S_IOERR for that request only.

A backend whose calls may wait (a disk, a network server) says so with ``blocking = True``:
the runtime then makes them on its thread pool (``--aio threads``), many at once, and never
on the queue's own thread. A backend may also write its methods as ``async def``: they then
run on the runtime's event loop, as many at once as the driver sends. A backend whose calls
return at once and complete later, from a thread of its own (a network client: ``nbd.py``),
is a ``LaterBackend``: as many requests in flight as the driver sends, and no thread or
coroutine each.
"""

from __future__ import annotations

import errno
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

#: How a call of a ``LaterBackend`` reports its outcome: ``done(None)`` on success,
#: ``done(error)`` otherwise; exactly once, from any thread (maybe before ``start`` returns).
Done = Callable[[BaseException | None], None]


class Backend(ABC):
    """Byte-addressed storage of a fixed ``size``."""

    #: A short name for status output ("file", "memory", "null").
    kind: str = "?"
    #: Its calls may block (I/O on a device or the network): make them off the queue thread.
    blocking: bool = False

    @property
    @abstractmethod
    def size(self) -> int:
        """Capacity in bytes."""

    @property
    def description(self) -> str:
        return self.kind

    @abstractmethod
    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` in order with the bytes at ``offset``."""

    @abstractmethod
    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        """Store the concatenation of ``bufs`` at ``offset``."""

    def flush(self) -> None:
        """Make completed writes durable."""

    def discard(self, offset: int, length: int) -> None:
        """Forget a range; later reads may return anything (we return zeroes)."""
        self.write_zeroes(offset, length, True)

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeroes; ``unmap`` allows freeing the space."""

    def close(self) -> None:
        """Release what the backend holds."""


class CallAbandoned(Exception):
    """A call was left running because its queue is stopping: the request must not be
    completed (its memory is fenced, as for any request abandoned at a stop)."""


def _until_set(finished: threading.Event) -> None:
    finished.wait()


class LaterBackend(Backend):
    """A backend whose calls complete later: ``start`` begins one and returns at once.

    ``call`` is the name of one of the ``Backend`` methods ("readv", "writev", "flush",
    "discard", "write_zeroes") and ``args`` its arguments; ``queue`` says which queue asks
    (a backend may keep one connection per queue). The buffers of a read or write belong to
    the call until ``done`` runs. The plain methods start a call and wait for it, for devices
    that serve requests inline.
    """

    @abstractmethod
    def start(self, queue: int, call: str, args: tuple[object, ...], done: Done) -> None:
        """Begin ``call(*args)`` for queue ``queue``; ``done`` receives its outcome."""

    def call_and_wait(self, queue: int, call: str, args: tuple[object, ...]) -> None:
        """Start ``call`` for ``queue`` and wait for it; raises its error."""
        error = self.run_call(queue, call, args, _until_set)
        if error is not None:
            raise error

    def run_call(self, queue: int, call: str, args: tuple[object, ...],
                 wait: Callable[[threading.Event], None]) -> BaseException | None:
        """Start ``call``, then ``wait(finished)``; its error (an OSError if ``wait``
        returned before it finished), or None."""
        finished = threading.Event()
        outcome: list[BaseException | None] = []

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            finished.set()

        self.start(queue, call, args, done)
        wait(finished)
        return outcome[0] if outcome else OSError(errno.ETIMEDOUT, f"{call} did not finish")

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        self.call_and_wait(0, "readv", (offset, bufs))

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        self.call_and_wait(0, "writev", (offset, bufs))

    def flush(self) -> None:
        self.call_and_wait(0, "flush", ())

    def discard(self, offset: int, length: int) -> None:
        self.call_and_wait(0, "discard", (offset, length))

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.call_and_wait(0, "write_zeroes", (offset, length, unmap))
