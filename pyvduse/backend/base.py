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

What a backend can do it declares, as nbdkit's plugins do: ``can_flush``, ``can_discard``
and ``can_write_zeroes`` (by default: whether it implements the method). Without
``write_zeroes`` the device writes zeroes through ``writev``; without ``discard`` (or
``write_zeroes``) DISCARD is not offered; with ``can_flush = False`` neither is FLUSH (the
writes are then durable once completed). An async backend that opens a connection on the
runtime's event loop does it in ``open_async`` and closes it in ``close_async``.
"""

from __future__ import annotations

import errno
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pyvduse.errors import ResizeError

#: The methods through which a backend's data moves.
IO_METHODS = ("readv", "writev", "flush", "discard", "write_zeroes")


@dataclass(frozen=True)
class NativeStorage:
    """How a native data path reaches a backend's storage without calling Python: the
    answer of ``Backend.native_storage()``. ``kind`` is one of ``fd`` (``fd``, opened with
    O_DIRECT when ``direct``), ``memory`` (``memory``: the disk's bytes), ``null`` (reads
    zeroes, drops writes) or ``nbd`` (``connections`` lends the engine one NBD connection
    per queue; ``fua_writes``: every write carries FUA; ``max_command``: the largest
    request the server takes). ``unpinnable``: a byte shared by everything serving an
    ``fd`` (the native engines and the backend's own methods), 1 once the kernel could not
    pin the driver's buffers for a transfer with the file (EFAULT): all then copy through
    buffers of their own; ``on_unpinnable()`` is called by whoever set it."""

    kind: Literal["fd", "memory", "null", "nbd"]
    fd: int = -1
    direct: bool = False
    memory: memoryview | None = None
    connections: LendsConnections | None = None
    fua_writes: bool = False
    max_command: int = 0
    unpinnable: bytearray | None = None
    on_unpinnable: Callable[[], None] | None = None


class LendsConnections(Protocol):
    """A backend whose native path borrows one connection per queue (NBD): the engine
    drives it from C, and gives it back when it stops."""

    @property
    def queue_count(self) -> int:
        """How many queues have a connection of their own."""
        ...

    def lend(
        self, queue: int, switch: Callable[[Any], bool], stopping: Callable[[], bool] | None = None
    ) -> Any:
        """The handle of ``queue``'s connection for the engine (an exception: it cannot be
        lent now). ``switch`` moves the engine to a new handle (a resize); ``stopping`` says
        the queue is stopping."""
        ...

    def give_back(self, queue: int, reusable: bool) -> None: ...

    def reconnect_native(self, queue: int, should_stop: Callable[[], bool], progressed: bool = True) -> Any:
        """A new handle for ``queue`` after the engine lost its own (None: not in time);
        ``progressed`` False: nothing succeeded on the lost one (the same window goes on)."""
        ...


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

    # The data methods may be written ``def`` (returning None) or ``async def`` (their
    # coroutine is awaited on the runtime's event loop): ``Awaitable[None] | None`` lets
    # either override them without a type: ignore.

    @abstractmethod
    def readv(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        """Fill ``bufs`` in order with the bytes at ``offset``."""

    @abstractmethod
    def writev(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        """Store the concatenation of ``bufs`` at ``offset``."""

    def flush(self) -> Awaitable[None] | None:
        """Make completed writes durable."""
        return None

    def discard(self, offset: int, length: int) -> Awaitable[None] | None:
        """Forget a range; later reads may return anything (we return zeroes)."""
        return self.write_zeroes(offset, length, True)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> Awaitable[None] | None:
        """Make a range read as zeroes; ``unmap`` allows freeing the space. Not
        implemented: the device writes zero buffers through ``writev`` instead."""
        raise NotImplementedError(f"{type(self).__name__} has no write_zeroes")

    # -- what it can do (nbdkit's can_*): the device offers only these ------------------------

    @property
    def can_flush(self) -> bool:
        """FLUSH is offered (False: writes are durable when completed, none is needed)."""
        return True

    @property
    def can_write_zeroes(self) -> bool:
        """It zeroes ranges itself (False: the device writes zero buffers instead)."""
        return _overrides(self, "write_zeroes")

    @property
    def can_discard(self) -> bool:
        """DISCARD is offered: it discards (or zeroes) ranges itself."""
        return _overrides(self, "discard") or self.can_write_zeroes

    # -- its life -------------------------------------------------------------------------

    async def open_async(self) -> None:
        """Run on the runtime's event loop before the first request: where an async
        backend opens what it needs on that loop (a connection)."""

    async def close_async(self) -> None:
        """Run on the runtime's event loop when the device stops being served."""

    def close(self) -> None:
        """Release what the backend holds."""

    def native_storage(self) -> NativeStorage | None:
        """How the native data path can reach the storage itself (None: it cannot, and
        the backend's methods serve every request: a user's backend, for one)."""
        return None

    # -- resizing (``ctl NAME resize``) ----------------------------------------------------

    def storage_size(self) -> int:
        """The storage's size now, looked at again (someone may have resized it): a resize
        with no size takes it. ResizeError when this backend cannot tell."""
        raise ResizeError("unsupported", f"a {self.kind} device cannot be resized")

    def size_settable(self) -> str | None:
        """Why pyvduse cannot change the storage's size itself (None: it can, with
        ``set_storage_size``)."""
        return (
            f"pyvduse cannot change the size of {self.description}: resize it yourself, "
            "then resize with no size"
        )

    def set_storage_size(self, size: int, *, grow_only: bool) -> None:
        """Make the storage ``size`` bytes (``grow_only``: leave it if it is larger);
        called before a larger capacity is announced, and after a smaller one took effect.
        ResizeError when that fails."""
        raise ResizeError("unsupported", self.size_settable() or "cannot resize")

    def watch_storage_size(self, changed: Callable[[], None]) -> bool:
        """Call ``changed()`` (from any thread, without waiting in it) whenever the
        storage's size may have changed under us; False: this backend cannot tell (the
        default). The daemon then resizes the device as ``ctl resize`` with no size does."""
        return False

    def io_as_in(self, cls: type[Backend]) -> bool:
        """Whether this backend moves data exactly as ``cls`` does: a subclass that
        overrides a data method (an async ``readv``, a fault injector) must be served
        through its methods, not around them."""
        mine = type(self)
        return all(getattr(mine, m) is getattr(cls, m) for m in IO_METHODS)


def _overrides(backend: Backend, method: str) -> bool:
    return getattr(type(backend), method) is not getattr(Backend, method)


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

    def run_call(
        self, queue: int, call: str, args: tuple[object, ...], wait: Callable[[threading.Event], None]
    ) -> BaseException | None:
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
