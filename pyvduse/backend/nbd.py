"""An NBD client backend: any NBD server's export as the device's storage, through libnbd.

libnbd is the NBD authors' own client library: the handshake, structured replies, TLS, the
URI forms and the protocol's corner cases are theirs. This module adds what a block device
needs on top:

- **Many commands in flight.** Reads, writes, flushes, trims and zeroes are libnbd's
  asynchronous commands (``aio_pread`` ...), issued by the queue's worker as it takes each
  request, straight into and out of the driver's buffers (a request whose data is in several
  pieces goes through one buffer of ours, so it stays one NBD command). Each connection has
  one thread that sleeps in ``poll(2)`` on the socket and hands libnbd what arrives; libnbd
  then calls each command's completion, which completes the request.
- **Connections.** One per queue when the server advertises multi-conn (its flushes then
  cover every connection's writes), one shared by all queues otherwise.
- **What the server offers** is what the device offers (``ExportInfo``): size, read-only,
  FLUSH (or FUA on every write when the server has FUA but no flush), TRIM as DISCARD,
  WRITE_ZEROES (NBD_CMD_FLAG_NO_HOLE unless the driver allows unmapping), the block sizes.
- **A server that goes away.** The commands in flight and every new one wait while the
  connection's thread reconnects with backoff, for up to ``reconnect_seconds``; then they
  fail (IOERR) and the next request opens a new window. A server that comes back with another
  size or other flags is refused (logged; the waiting requests fail): serving a different
  disk in the middle of a filesystem would corrupt it. Nothing here runs on the control
  thread or the management socket's thread; a live resize's size query uses a connection of
  its own.

Credentials in the URI (a TLS user name, a PSK file) are used to connect and never logged or
stored: ``description`` and every message use ``nbd_uri.redact``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

from pyvduse.backend import nbd_binding, nbd_uri
from pyvduse.backend.base import CallAbandoned, Done, LaterBackend, NativeStorage
from pyvduse.errors import ResizeError
from pyvduse.ratelimit import RateLimitedLogger

log = logging.getLogger(__name__)

#: Default of ``--nbd-reconnect``: how long requests wait for a server that went away.
DEFAULT_RECONNECT_SECONDS = 30.0
#: One connection attempt (TCP connect, TLS and NBD handshakes) gives up after this long.
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
#: The largest read or write sent as one command (libnbd refuses writes over 64 MiB; servers
#: commonly take 32 MiB); larger ones, and ones over the server's maximum, are split.
MAX_COMMAND = 32 << 20
#: The most a request allocates (a bounce buffer joining its pieces into one command):
#: requests in pieces larger than this together go a command per piece, straight into and
#: out of driver memory, so what the daemon allocates does not follow what the driver's
#: descriptors say (at most queue size x this per queue; the native engine's BOUNCE_CHUNK).
BOUNCE_LIMIT = 1 << 20
#: Errors that mean the connection, not the request, failed: the request waits and is resent.
CONNECTION_ERRNOS = frozenset(
    {
        errno.ENOTCONN,
        errno.ESHUTDOWN,
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
    }
)

_READ, _WRITE, _FLUSH, _TRIM, _ZERO = range(5)
_DIRECTION_WRITE = 2  # libnbd's AIO_DIRECTION_WRITE


class NbdError(Exception):
    """Connecting to the server failed (the message names the URI without credentials)."""


@dataclass(frozen=True)
class ExportInfo:
    """What the server said about its export; a reconnect must find the same."""

    size: int
    readonly: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    can_multi_conn: bool
    min_block: int  # 0: the server gave no block size constraints
    preferred_block: int
    max_block: int
    structured_replies: bool  # how replies come; not part of the disk's identity

    @classmethod
    def of(cls, handle: Any, nbd: ModuleType) -> ExportInfo:
        return cls(
            size=handle.get_size(),
            readonly=bool(handle.is_read_only()),
            can_flush=bool(handle.can_flush()),
            can_fua=bool(handle.can_fua()),
            can_trim=bool(handle.can_trim()),
            can_zero=bool(handle.can_zero()),
            can_fast_zero=bool(handle.can_fast_zero()),
            can_multi_conn=bool(handle.can_multi_conn()),
            min_block=handle.get_block_size(nbd.SIZE_MINIMUM),
            preferred_block=handle.get_block_size(nbd.SIZE_PREFERRED),
            max_block=handle.get_block_size(nbd.SIZE_MAXIMUM),
            structured_replies=bool(handle.get_structured_replies_negotiated()),
        )

    def differences(self, other: ExportInfo) -> list[str]:
        """What differs from ``other`` that matters for serving the same disk."""
        out = []
        for f in fields(self):
            if f.name == "structured_replies":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name} {a} -> {b}")
        return out

    def as_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def connect(
    nbd: ModuleType,
    uri: str,
    timeout: float,
    name: str = "pyvduse",
    should_stop: Callable[[], bool] | None = None,
) -> Any:
    """A handle connected to ``uri`` and ready for commands, within ``timeout`` seconds;
    ``NbdError`` otherwise (also as soon as ``should_stop()`` says so)."""
    safe = nbd_uri.redact(uri)
    handle = nbd.NBD()
    try:
        handle.set_handle_name(name)
        handle.set_uri_allow_local_file(True)  # tls-psk-file=, tls-certificates= in the URI
        # The size may grow under us (resize with no size): leave bounds to the server.
        handle.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_BOUNDS)
        handle.set_pread_initialize(False)  # reads land in the driver's buffers: no memset
        handle.aio_connect_uri(uri)
        deadline = time.monotonic() + timeout
        while not handle.aio_is_ready():
            if handle.aio_is_dead() or handle.aio_is_closed():
                raise NbdError(
                    f"cannot connect to {safe}: the connection closed during the "
                    "handshake (wrong export name, or TLS refused?)"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise NbdError(f"cannot connect to {safe}: no answer within {timeout:g} s")
            if should_stop is not None and should_stop():
                raise NbdError(f"connecting to {safe}: stopped")
            handle.poll(max(int(min(left, 0.1) * 1000), 1))
    except nbd.Error as e:
        raise NbdError(f"cannot connect to {safe}: {_describe(e)}") from None
    return handle


def _sleep_unless(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Sleep, checking ``should_stop`` every 50 ms (a reset must not wait for a backoff)."""
    deadline = time.monotonic() + seconds
    while not should_stop() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def _alive(handle: Any) -> bool:
    return not (handle.aio_is_dead() or handle.aio_is_closed())


def _kill(handle: Any) -> None:
    """Shut ``handle``'s socket down: whoever drives it next finds it dead, and libnbd then
    retires every command it had (none of them can complete, or write into its buffer,
    later). Any thread: it only shuts the socket, the handle's driver notices."""
    with contextlib.suppress(Exception):
        fd = handle.aio_get_fd()
        if fd >= 0:
            with socket.socket(fileno=os.dup(fd)) as s:
                s.shutdown(socket.SHUT_RDWR)


def _describe(e: Any) -> str:
    text = str(getattr(e, "string", None) or e)
    return text.rstrip(".")


def _errno_of(e: Any) -> int:
    """The errno of an ``nbd.Error`` (its ``errnum``; its ``errno`` is the name)."""
    num = getattr(e, "errnum", None)
    return num if isinstance(num, int) and num > 0 else errno.EIO


class _Call:
    """One backend call (a request's read, write, ...): its commands and its ``done``."""

    __slots__ = ("bounce", "bufs", "done", "error", "lock", "parts")

    def __init__(
        self, done: Done, parts: int, bufs: list[memoryview] | None = None, bounce: bytearray | None = None
    ) -> None:
        self.done = done
        self.parts = parts
        self.error = 0
        self.bufs = bufs  # a read's destination, when it went through ``bounce``
        self.bounce = bounce
        self.lock = threading.Lock() if parts > 1 else None

    def part_done(self, err: int) -> None:
        if self.lock is not None:
            with self.lock:
                self.parts -= 1
                if err and not self.error:
                    self.error = err
                if self.parts:
                    return
        else:
            self.error = err
        error = self.error
        if not error and self.bufs is not None and self.bounce is not None:
            pos = 0
            src = memoryview(self.bounce)
            for b in self.bufs:
                b[:] = src[pos : pos + len(b)]
                pos += len(b)
        try:
            self.done(None if not error else OSError(error, os.strerror(error)))
        except Exception:  # the device's completion must not take a connection down
            log.exception("completing an NBD request")


class _Command:
    """One NBD command of a call."""

    __slots__ = ("buf", "call", "flags", "kind", "length", "offset")

    def __init__(
        self, call: _Call, kind: int, offset: int, length: int = 0, buf: Any = None, flags: int = 0
    ) -> None:
        self.call = call
        self.kind = kind
        self.offset = offset
        self.length = length
        self.buf = buf  # an nbd.Buffer sharing driver memory (or our bounce buffer)
        self.flags = flags


class _Connection:
    """One NBD connection and the thread that drives it (and reconnects it)."""

    def __init__(self, backend: NbdBackend, index: int, handle: Any) -> None:
        self.backend = backend
        self.nbd = backend.nbd
        self.index = index
        self._lock = threading.Lock()
        self._handle: Any = handle  # None while the connection is down
        self._generation = 0  # a new one per handle: completions of an older one are stale
        #: Commands sent on the current handle and not yet completed (in the order sent).
        self._flight: dict[_Command, None] = {}
        #: Commands waiting for a connection (in the order they came).
        self._waiting: collections.deque[_Command] = collections.deque()
        self._down_since: float | None = None  # the reconnect window began; None: not in one
        #: The window of a server that keeps ending connections: it began here, and it ends
        #: only when a command succeeds (or the window is over), however often we reconnect.
        self._episode_since: float | None = None
        self._backoff = BACKOFF_FIRST  # before the next reconnect of the same window
        self._given: Any = None  # the handle the engine has (lend, reconnect_now)
        self._kill_wanted = False  # a reply said the connection ended: _serve shuts it down
        #: A server that keeps ending connections must not fill the log: the first loss of a
        #: window is logged, and at most a few messages a minute.
        self._log = RateLimitedLogger(log, burst=5, period=60.0)
        self._closed = False
        self._paused = False  # renew(): new commands wait while the old handle drains
        #: Lent to a native engine (``lend``): its thread alone polls the socket; ours sleeps.
        self._native = False
        self._thread_idle = threading.Event()  # our thread has seen ``_native`` and sleeps
        #: While lent: moves the engine to a new handle (see NbdBackend.lend).
        self.switch: Callable[[Any], bool] | None = None
        #: While lent: whether the engine's queue is stopping (a wait of ours gives up).
        self.stopping: Callable[[], bool] | None = None
        self.reconnects = 0
        self.refused = 0  # reconnects refused because the export changed
        self.failed_waiting = 0  # requests failed because no server came back in time
        self.reconnects_in_window = 0  # reconnects since the window began (backoff, logging)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=f"nbd{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def state(self) -> str:
        with self._lock:
            if self._closed:
                return "closed"
            if self._handle is not None:
                return "connected"
            return "reconnecting" if self._down_since is not None else "down"

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flight) + len(self._waiting)

    # -- sending (any thread) ----------------------------------------------------------

    def send(self, cmd: _Command) -> None:
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                handle = self._handle
                if self._native and handle is None:
                    closed = True  # lent and down: the caller reconnects (call_and_wait)
                elif self._paused:
                    self._waiting.append(cmd)
                    return
                if handle is None:
                    self._waiting.append(cmd)
                    if self._down_since is None:  # down and idle: a new reconnect window
                        self._down_since = time.monotonic()
                else:
                    generation = self._generation
                    self._flight[cmd] = None
        if closed:
            cmd.call.part_done(errno.ENOTCONN if self._native else errno.ESHUTDOWN)
        elif handle is None:
            self._wake()
        else:
            self._issue(handle, generation, cmd)

    def _issue(self, handle: Any, generation: int, cmd: _Command) -> None:
        """Hand ``cmd`` (already in ``_flight``) to libnbd; never with ``_lock`` held (libnbd
        may call completions, which take it)."""

        def completion(err: Any) -> int:
            self._completed(generation, cmd, err.value)
            return 1

        try:
            kind = cmd.kind
            if kind == _READ:
                handle.aio_pread(cmd.buf, cmd.offset, completion=completion)
            elif kind == _WRITE:
                handle.aio_pwrite(cmd.buf, cmd.offset, completion=completion, flags=cmd.flags)
            elif kind == _FLUSH:
                handle.aio_flush(completion=completion)
            elif kind == _TRIM:
                handle.aio_trim(cmd.length, cmd.offset, completion=completion)
            else:
                handle.aio_zero(cmd.length, cmd.offset, completion=completion, flags=cmd.flags)
        except self.nbd.Error as e:
            err = _errno_of(e)
            if err in CONNECTION_ERRNOS or handle.aio_is_dead() or handle.aio_is_closed():
                self._lost(generation, _describe(e))
            else:
                self._completed(generation, cmd, err)
            return
        if handle.aio_get_direction() & _DIRECTION_WRITE:
            self._wake()  # the socket took only part of it: the thread must watch POLLOUT

    def _completed(self, generation: int, cmd: _Command, err: int) -> None:
        with self._lock:
            if generation != self._generation or cmd not in self._flight:
                return  # the connection was lost meanwhile and the command moved on
            del self._flight[cmd]
            # resent once the connection is back (lent: the engine reconnects, this fails)
            lost = err in CONNECTION_ERRNOS and not self._native
            if lost:
                self._waiting.appendleft(cmd)
                self._kill_wanted = True  # by the thread, outside libnbd's callback
            elif not err and self._episode_since is not None and self._handle is not None:
                self._end_window()  # the server serves: a later loss is a new window
        if lost:
            # The server says the connection ended, maybe while it stays open with other
            # commands unanswered: the thread shuts it down (libnbd retires them) before any
            # is resent (in _serve: libnbd's calls are not for its callbacks).
            self._wake()
            return
        cmd.call.part_done(err)  # an error is the device's to report, with the request

    def _lost(self, generation: int, why: str) -> None:
        """The handle of ``generation`` is gone: its commands wait for the next one."""
        with self._lock:
            if generation != self._generation or self._handle is None:
                return
            if self._native:  # lent: call_and_wait reconnects and sends them again
                failed = list(self._flight)
                self._flight.clear()
            else:
                failed = []
        if failed:
            for cmd in failed:
                cmd.call.part_done(errno.ENOTCONN)
            return
        with self._lock:
            if generation != self._generation or self._handle is None:
                return
            self._generation += 1
            self._handle = None
            self._kill_wanted = False  # that handle is gone already
            self._waiting.extendleft(reversed(list(self._flight)))
            self._flight.clear()
            new_window = self._episode_since is None
            if new_window:
                self._episode_since = time.monotonic()
            if self._down_since is None:
                self._down_since = self._episode_since
            waiting = len(self._waiting)
            closed = self._closed
        if not closed and new_window:
            self._log.warning(
                "%s: connection %d lost (%s); %d request(s) wait while it reconnects (up to %g s)",
                self.backend.safe_uri,
                self.index,
                why,
                waiting,
                self.backend.reconnect_seconds,
            )
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed, or full: a wake-up is pending anyway
            os.eventfd_write(self._wake_fd, 1)

    # -- the connection's thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    handle, generation = self._handle, self._generation
                    native = self._native
                if native:
                    self._thread_idle.set()
                    self._sleep(3600.0)
                    continue
                self._thread_idle.clear()
                if handle is None:
                    self._reconnect()
                else:
                    self._serve(handle, generation)
        except Exception:
            log.exception("%s: connection %d's thread failed", self.backend.safe_uri, self.index)

    def _serve(self, handle: Any, generation: int) -> None:
        """Drive ``handle`` until it dies or the connection closes."""
        try:
            fd = handle.aio_get_fd()
        except self.nbd.Error as e:  # it died already (the server hung up on a resend)
            self._lost(generation, _describe(e))
            return
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        watched = 0
        while True:
            want = select.POLLIN
            if handle.aio_get_direction() & _DIRECTION_WRITE:
                want |= select.POLLOUT
            if want != watched:
                poller.register(fd, want)
                watched = want
            for ready_fd, events in poller.poll():
                if ready_fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake_fd)
                    continue
                try:
                    if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        handle.aio_notify_read()
                    if events & select.POLLOUT:
                        handle.aio_notify_write()
                except self.nbd.Error as e:
                    self._lost(generation, _describe(e))
                    return
            with self._lock:
                if self._closed or self._native or generation != self._generation:
                    return
                kill, self._kill_wanted = self._kill_wanted, False
            if kill:
                _kill(handle)
                with contextlib.suppress(self.nbd.Error):
                    handle.aio_notify_read()  # it sees the end: dead, its commands retired
            if handle.aio_is_dead() or handle.aio_is_closed():
                self._lost(generation, "the server closed the connection")
                return

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if woken (a new request, close)."""
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        if poller.poll(max(int(seconds * 1000), 0)):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake_fd)

    def _reconnect(self) -> None:
        """Try to reconnect until it works, the window ends, or the connection closes."""
        backend = self.backend
        while True:
            with self._lock:
                if self._closed or self._native:
                    return
                since = self._down_since
            if since is None:  # down, nothing waits: sleep until a request comes
                self._sleep(3600.0)
                continue
            if self.reconnects_in_window:  # the server ended the last one again: back off
                if time.monotonic() + self._backoff >= since + backend.reconnect_seconds:
                    self._fail_waiting(
                        f"the server kept ending the connection for {backend.reconnect_seconds:g} s "
                        f"({self.reconnects_in_window} reconnect(s))"
                    )
                    return
                self._sleep_backoff(lambda: self._native or self._closed, self._sleep)
                with self._lock:
                    if self._closed or self._native:
                        return
            handle = self._connect_within(
                since + backend.reconnect_seconds, lambda: self._native or self._closed, self._sleep
            )
            if handle is None:
                return
            if isinstance(handle, str):
                self._fail_waiting(handle)
                return
            with self._lock:
                if self._closed or self._native:
                    return
                self._handle = handle
                self._generation += 1
                generation = self._generation
                resend = list(self._waiting)
                self._waiting.clear()
                down = time.monotonic() - since
                self._down_since = None
                for cmd in resend:
                    self._flight[cmd] = None
                first = not self.reconnects_in_window
                self.reconnects_in_window += 1
            self.reconnects += 1
            if first:
                self._log.warning(
                    "%s: connection %d back after %.1f s; %d request(s) resent",
                    backend.safe_uri,
                    self.index,
                    down,
                    len(resend),
                )
            for cmd in resend:
                self._issue(handle, generation, cmd)
            return

    # -- lent to a native engine ----------------------------------------------------------

    def lend(self, timeout: float = CONNECT_TIMEOUT + 1) -> Any:
        """Hand the connection's socket to a native engine: our thread stops polling it.
        Returns the handle (None while the connection is down); ``NbdError`` when commands
        of ours are still in flight or our thread did not let go in time."""
        with self._lock:
            if self._native:
                raise NbdError(f"connection {self.index} is already lent")
            if self._flight or self._waiting or self._paused:
                raise NbdError(f"connection {self.index} has requests in flight")
            self._native = True
            self._generation += 1  # our thread's _serve returns
            self._down_since = None
        self._wake()
        if not self._thread_idle.wait(timeout):
            self.give_back(reusable=True)
            raise NbdError(f"connection {self.index} did not become free in time")
        with self._lock:
            self._given = self._handle
            return self._handle

    def give_back(self, reusable: bool) -> None:
        """The engine is done with the socket; ``reusable`` False: it may still have commands
        on it (abandoned), so the handle is left to it and we reconnect."""
        with self._lock:
            self._native = False
            self.switch = None
            self.stopping = None
            self._generation += 1
            self._given = None
            self._end_window()
            if not reusable:
                self._handle = None  # down and idle: the next request reconnects
        self._wake()

    def reconnect_now(
        self, should_stop: Callable[[], bool], progressed: bool = True, for_engine: bool = True
    ) -> Any:
        """For the engine, on its thread: its handle is lost (dead, or alive but a reply
        said the connection ended); reconnect within the window, as ``_reconnect`` does for
        ours. The new handle -- never the one the engine lost, which is shut down first, so
        nothing sent on it can complete after its requests are sent again -- or None
        (window over, export changed, stopped). ``progressed`` False: no command succeeded
        on the lost handle, so this is the same window as the last loss (it backs off, and
        the window keeps its start). ``for_engine`` False: for call_and_wait, whose commands
        go on the new handle while the engine keeps its own until its next loss."""
        backend = self.backend
        now = time.monotonic()
        with self._lock:
            current = self._handle
            if current is not None and _alive(current) and current is not self._given:
                self._given = current
                return current  # reconnected already (by call_and_wait)
            if current is not None and _alive(current):
                _kill(current)  # the engine's, and it said the connection ended
            self._handle = None
            if progressed or self._episode_since is None:
                self._end_window()
                self._episode_since = now
            since = self._episode_since
            self._down_since = since
            again = self.reconnects_in_window
        deadline = since + backend.reconnect_seconds
        handle: Any
        if again and time.monotonic() + self._backoff >= deadline:
            handle = (
                f"the server kept ending the connection for {backend.reconnect_seconds:g} s "
                f"({again} reconnect(s))"
            )
        else:
            if again:  # the server ended the last one again: back off
                self._sleep_backoff(should_stop, lambda seconds: _sleep_unless(seconds, should_stop))
            else:
                self._log.warning(
                    "%s: connection %d lost; requests wait while it reconnects (up to %g s)",
                    backend.safe_uri,
                    self.index,
                    backend.reconnect_seconds,
                )
            handle = self._connect_within(
                deadline, should_stop, lambda seconds: _sleep_unless(seconds, should_stop)
            )
        if not isinstance(handle, str) and handle is not None:
            with self._lock:
                self._handle = handle
                if for_engine:
                    self._given = handle
                self._generation += 1
                self._down_since = None
                self.reconnects_in_window += 1
            self.reconnects += 1
            if not again:
                self._log.warning(
                    "%s: connection %d back after %.1f s",
                    backend.safe_uri,
                    self.index,
                    time.monotonic() - since,
                )
            return handle
        with self._lock:
            self._end_window()
        if isinstance(handle, str):
            self.failed_waiting += 1
            log.error(
                "%s: %s: the waiting requests fail; the next request tries again", backend.safe_uri, handle
            )
        return None

    def _connect_within(
        self, deadline: float, should_stop: Callable[[], bool], sleep: Callable[[float], None]
    ) -> Any:
        """Connect with backoff until ``deadline``: a handle to the same export; a string
        saying why not (no server in time, the export changed); None when told to stop."""
        backend = self.backend
        backoff = BACKOFF_FIRST
        while not should_stop():
            try:
                handle = connect(
                    self.nbd,
                    backend.uri,
                    max(min(CONNECT_TIMEOUT, deadline - time.monotonic()), 0.2),
                    name=f"pyvduse-{self.index}",
                    should_stop=should_stop,
                )
            except NbdError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"no server within {backend.reconnect_seconds:g} s ({e})"
                sleep(min(backoff, left))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            changed = backend.expected().differences(ExportInfo.of(handle, self.nbd))
            if changed:
                self.refused += 1
                log.error(
                    "%s: the server came back with a different export (%s): refused, "
                    "requests fail until it serves the same disk",
                    backend.safe_uri,
                    ", ".join(changed),
                )
                return "the export changed"
            return handle
        return None

    def poll_until(self, finished: threading.Event) -> None:
        """While lent, on the engine's thread (it is not running): drive the socket until
        ``finished`` (a command of ours completed or failed), or the queue is stopping."""
        while not finished.is_set():
            if self.stopping is not None and self.stopping():
                return
            with self._lock:
                handle = self._handle
            if handle is None:
                return
            with contextlib.suppress(self.nbd.Error):
                handle.poll(100)
            if handle.aio_is_dead() or handle.aio_is_closed():
                self._lost(self._generation, "the server closed the connection")

    def renew(self, handle: Any, timeout: float) -> bool:
        """Move to ``handle`` (a new connection to the same export): new commands wait
        while the ones in flight finish on the old handle, then go to the new one. False,
        and the old handle kept, when they did not finish within ``timeout``."""
        if self._native:  # the engine drains its commands, then takes the new handle
            switch = self.switch
            if switch is None or not switch(handle):
                return False
            with self._lock:
                old_handle, self._handle = self._handle, handle
                self._given = handle
                self._generation += 1
            if old_handle is not None:
                with contextlib.suppress(self.nbd.Error):
                    old_handle.aio_disconnect(0)
            return True
        with self._lock:
            if self._handle is None or self._closed:
                return False
            self._paused = True
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                drained = not self._flight
                if drained or time.monotonic() >= deadline or self._handle is None:
                    old = self._handle
                    swap = drained and old is not None
                    if swap:
                        self._handle = handle
                        self._generation += 1
                    generation = self._generation
                    resend = list(self._waiting) if self._handle is not None else []
                    if resend:
                        self._waiting.clear()
                        for cmd in resend:
                            self._flight[cmd] = None
                    self._paused = False
                    current = self._handle
                    break
            time.sleep(0.001)
        self._wake()  # the thread moves to the new handle (or reconnects)
        for cmd in resend:
            self._issue(current, generation, cmd)
        if swap:
            with contextlib.suppress(self.nbd.Error):
                old.aio_disconnect(0)
        return swap

    def _sleep_backoff(self, should_stop: Callable[[], bool], sleep: Callable[[float], None]) -> None:
        """Wait before reconnecting again in the same window (doubling, up to BACKOFF_MAX)."""
        with self._lock:
            backoff = self._backoff
            self._backoff = min(backoff * 2, BACKOFF_MAX)
        if not should_stop():
            sleep(backoff)

    def _end_window(self) -> None:
        """With ``_lock`` held: the window is over (the next loss starts a new one)."""
        self._down_since = None
        self._episode_since = None
        self._backoff = BACKOFF_FIRST
        self.reconnects_in_window = 0

    def _fail_waiting(self, why: str) -> None:
        with self._lock:
            failed = list(self._waiting)
            self._waiting.clear()
            self._end_window()
        self.failed_waiting += len(failed)
        if failed:
            log.error(
                "%s: %d request(s) failed: %s; the next request tries again",
                self.backend.safe_uri,
                len(failed),
                why,
            )
        for cmd in failed:
            cmd.call.part_done(errno.EIO)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, fail what waits, disconnect politely (never waits on the
        server)."""
        with self._lock:
            self._closed = True
            handle = self._handle
            self._handle = None
            self._generation += 1
            pending = list(self._flight) + list(self._waiting)
            self._flight.clear()
            self._waiting.clear()
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for cmd in pending:
            cmd.call.part_done(errno.ESHUTDOWN)
        if handle is not None:
            with contextlib.suppress(self.nbd.Error):
                handle.aio_disconnect(0)
        if not self._thread.is_alive():
            os.close(self._wake_fd)


class NbdBackend(LaterBackend):
    """An NBD export served through libnbd, with up to ``connections`` connections (one per
    queue when the server allows multi-conn)."""

    kind = "nbd"

    def __init__(
        self,
        uri: str,
        *,
        connections: int = 1,
        reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
        connect_timeout: float = CONNECT_TIMEOUT,
        nbd: ModuleType | None = None,
    ) -> None:
        self.uri = nbd_uri.check(uri)
        self.safe_uri = nbd_uri.redact(uri)
        self.nbd = nbd if nbd is not None else nbd_binding.load()
        self.reconnect_seconds = reconnect_seconds
        self._info_lock = threading.Lock()
        first = connect(self.nbd, uri, connect_timeout, name="pyvduse-0")
        self.info = ExportInfo.of(first, self.nbd)
        self._size = self.info.size
        count = connections if self.info.can_multi_conn else 1
        handles = [first]
        try:
            for i in range(1, count):
                h = connect(self.nbd, uri, connect_timeout, name=f"pyvduse-{i}")
                changed = self.info.differences(ExportInfo.of(h, self.nbd))
                if changed:
                    raise NbdError(
                        f"{self.safe_uri}: the server gave connection {i} a "
                        f"different export ({', '.join(changed)})"
                    )
                handles.append(h)
        except BaseException:
            for h in handles:
                h.aio_disconnect(0)
            raise
        self.connections = [_Connection(self, i, h) for i, h in enumerate(handles)]
        for c in self.connections:
            c.start()
        limit = self.info.max_block or MAX_COMMAND
        self.max_command = min(limit, MAX_COMMAND)
        #: Writes carry FUA when the server can FUA but not flush (durable on their reply).
        self.fua_writes = self.info.can_fua and not self.info.can_flush

    @property
    def size(self) -> int:
        return self._size

    @property
    def description(self) -> str:
        return f"nbd {self.safe_uri}"

    @property
    def readonly(self) -> bool:
        return self.info.readonly

    def expected(self) -> ExportInfo:
        """What a reconnect must find (the size as last re-read)."""
        with self._info_lock:
            return self.info

    def refresh_size(self, timeout: float = CONNECT_TIMEOUT) -> int:
        """The export's size now, asked on a new connection (an open NBD connection never
        learns of a resize, and the server holds it to the size it had when it opened).
        When it changed, every connection moves to a new one (its requests in flight finish
        first) and reconnects expect the new size; NbdError if that cannot be done."""
        handle = connect(self.nbd, self.uri, timeout, name="pyvduse-resize")
        found = ExportInfo.of(handle, self.nbd)
        with contextlib.suppress(self.nbd.Error):
            handle.aio_disconnect(0)
        del handle
        current = self.expected()
        if found.size == current.size:
            return found.size
        wanted = dataclasses.replace(current, size=found.size)
        changed = wanted.differences(found)
        if changed:
            raise NbdError(f"{self.safe_uri}: the export changed more than its size ({', '.join(changed)})")
        for i, conn in enumerate(self.connections):
            fresh = connect(self.nbd, self.uri, timeout, name=f"pyvduse-{i}")
            if not conn.renew(fresh, timeout):
                raise NbdError(
                    f"{self.safe_uri}: connection {i} could not move to the new "
                    f"size (requests in flight for over {timeout:g} s, or the "
                    "server went away)"
                )
        with self._info_lock:
            self.info = wanted
            self._size = found.size
        return found.size

    def storage_size(self) -> int:
        try:
            return self.refresh_size()
        except NbdError as e:
            raise ResizeError("failed", f"cannot read the export's size: {e}") from None

    def size_settable(self) -> str | None:
        return (
            "pyvduse cannot change the size of an NBD export: resize it on the server, "
            "then resize with no size"
        )

    # -- native engines -----------------------------------------------------------------

    def native_storage(self) -> NativeStorage | None:
        if not self.io_as_in(NbdBackend) or type(self).start is not NbdBackend.start:
            return None
        return NativeStorage(
            "nbd", connections=self, fua_writes=self.fua_writes, max_command=self.max_command
        )

    @property
    def queue_count(self) -> int:
        return len(self.connections)

    def lend(
        self, queue: int, switch: Callable[[Any], bool], stopping: Callable[[], bool] | None = None
    ) -> Any:
        """Queue ``queue``'s connection for a native engine: the binding's handle (None while
        down), which the engine keeps alive while it uses it; NbdError if it cannot be lent
        now (see ``_Connection.lend``). ``switch`` moves the engine to a new handle once its
        commands are done (False: it could not), for a resize; ``stopping`` says the queue is
        stopping: a call Python waits for on its thread is then abandoned (CallAbandoned)."""
        conn = self.connections[queue]
        handle = conn.lend()
        conn.switch = switch
        conn.stopping = stopping
        return handle

    def give_back(self, queue: int, reusable: bool) -> None:
        self.connections[queue].give_back(reusable)

    def reconnect_native(self, queue: int, should_stop: Callable[[], bool], progressed: bool = True) -> Any:
        """The engine of ``queue`` lost its connection: a new handle, or None;
        ``progressed``: a command succeeded on the lost one (see reconnect_now)."""
        return self.connections[queue].reconnect_now(should_stop, progressed)

    def call_and_wait(self, queue: int, call: str, args: tuple[object, ...]) -> None:
        """As LaterBackend's; on a lent connection this thread drives the socket itself (the
        engine that owns it is not running while Python serves a chain for it)."""
        conn = self.connections[queue % len(self.connections)]
        if not conn._native:
            super().call_and_wait(queue, call, args)
            return
        for attempt in range(2):
            error = self.run_call(queue, call, args, conn.poll_until)
            if conn.stopping is not None and conn.stopping():
                raise CallAbandoned(f"{call} left running: the queue is stopping")
            if attempt == 0 and isinstance(error, OSError) and error.errno in CONNECTION_ERRNOS:
                # the engine is not running: reconnect here (it takes the new handle)
                if conn.reconnect_now(lambda: False, for_engine=False) is None:
                    raise OSError(errno.EIO, "no NBD server within the reconnect window")
                continue
            if error is not None:
                raise error
            return

    def status(self) -> dict[str, object]:
        """For ``ctl status``: the export and each connection's state (never blocks)."""
        return {
            "uri": self.safe_uri,
            "export": self.expected().as_json(),
            "reconnect_seconds": self.reconnect_seconds,
            "connections": [
                {
                    "state": c.state,
                    "in_flight": c.in_flight(),
                    "reconnects": c.reconnects,
                    "refused": c.refused,
                    "failed_waiting": c.failed_waiting,
                }
                for c in self.connections
            ],
        }

    # -- requests -----------------------------------------------------------------------

    def start(self, queue: int, call: str, args: tuple[object, ...], done: Done) -> None:
        conn = self.connections[queue % len(self.connections)]
        for cmd in self._commands(call, args, done):
            conn.send(cmd)

    def _commands(self, call: str, args: tuple[Any, ...], done: Done) -> list[_Command]:
        nbd = self.nbd
        if call in ("readv", "writev"):
            offset, bufs = args
            write = call == "writev"
            bounce: bytearray | None = None
            total = sum(map(len, bufs))
            if len(bufs) > 1 and total > BOUNCE_LIMIT:
                return self._piecewise(done, offset, bufs, write)
            if len(bufs) == 1:
                data = bufs[0]
            else:  # one command, not one per piece
                bounce = bytearray(b"".join(bufs)) if write else bytearray(total)
                data = memoryview(bounce)
            length = len(data)
            step = self.max_command
            parts = max(-(-length // step), 1)
            c = _Call(done, parts, None if write else bufs, None if write else bounce)
            kind = _WRITE if write else _READ
            flags = nbd.CMD_FLAG_FUA if write and self.fua_writes else 0
            if parts == 1:
                return [_Command(c, kind, offset, length, nbd.Buffer.from_buffer(data), flags)]
            return [
                _Command(
                    c,
                    kind,
                    offset + pos,
                    min(step, length - pos),
                    nbd.Buffer.from_buffer(data[pos : pos + step]),
                    flags,
                )
                for pos in range(0, length, step)
            ]
        if call == "flush":
            return [_Command(_Call(done, 1), _FLUSH, 0)]
        if call == "discard":
            offset, length = args
            return [_Command(_Call(done, 1), _TRIM, offset, length)]
        if call == "write_zeroes":
            offset, length, unmap = args
            flags = 0 if unmap else nbd.CMD_FLAG_NO_HOLE
            return [_Command(_Call(done, 1), _ZERO, offset, length, flags=flags)]
        raise ValueError(f"NBD backend has no call {call!r}")

    def _piecewise(self, done: Done, offset: int, bufs: list[memoryview], write: bool) -> list[_Command]:
        """A read or write in pieces larger than BOUNCE_LIMIT together: a command per piece
        (split at max_command), straight from or into driver memory, nothing allocated."""
        nbd = self.nbd
        kind = _WRITE if write else _READ
        flags = nbd.CMD_FLAG_FUA if write and self.fua_writes else 0
        step = self.max_command
        spans = []
        pos = offset
        for b in bufs:
            for k in range(0, len(b), step):
                spans.append((pos + k, b[k : k + step]))
            pos += len(b)
        c = _Call(done, len(spans))
        return [_Command(c, kind, at, len(v), nbd.Buffer.from_buffer(v), flags) for at, v in spans]

    def close(self) -> None:
        for c in self.connections:
            c.close()
