"""virtio-blk: the block device model (virtio 1.2 section 5.2).

Requests are parsed from the chain's byte streams, not from descriptor boundaries, so any
layout the driver chooses works: the 16-byte header at the start of the readable bytes, the
status in the last writable byte, data in between. Every sector range is checked against the
capacity before the backend is touched.
"""

from __future__ import annotations

import array
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    DeviceId,
    bit,
)
from pyvduse.backend.base import IO_METHODS, Backend, CallAbandoned, LaterBackend, NativeStorage
from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
from pyvduse.device.engine_stats import PerQueueStats
from pyvduse.device.request import Request
from pyvduse.ring.chain import Chain
from pyvduse.ring.iovec import gather, slice_segments, total

log = logging.getLogger(__name__)

_OUTHDR = vb.OUTHDR
_SEG = vb.DISCARD_SEGMENT
OK, IOERR, UNSUPP = vb.ReqStatus.OK, vb.ReqStatus.IOERR, vb.ReqStatus.UNSUPP
T_IN, T_OUT, T_FLUSH, T_GET_ID = vb.ReqType.IN, vb.ReqType.OUT, vb.ReqType.FLUSH, vb.ReqType.GET_ID
T_DISCARD, T_WRITE_ZEROES = vb.ReqType.DISCARD, vb.ReqType.WRITE_ZEROES

MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32


class BlkConfigError(ValueError):
    """The options cannot describe a valid virtio-blk device."""


@dataclass(frozen=True)
class NativeBlk:
    """What a native virtio-blk loop needs to serve a device's queues without calling
    Python for each request (``BlkDevice.native_plan``)."""

    capacity: array.array[int]  # the capacity in bytes, one cell the loop reads as it changes
    readonly: bool
    serial: bytes  # GET_ID's answer, padded
    num_queues: int
    storage: NativeStorage
    blocking: bool  # the backend's own calls may block (a file)
    stats: PerQueueStats[BlkStats]  # where the engine's per-queue counters go


@dataclass
class BlkOptions:
    """What the user can choose about a block device."""

    readonly: bool = False
    block_size: int = 512
    serial: str = ""
    num_queues: int = 1
    queue_size: int = 256
    packed: bool = False
    discard: bool = True
    write_zeroes: bool = True
    #: Offer FLUSH (a volatile write cache); False: writes are durable when completed.
    flush: bool = True
    #: The storage's own block size (reported as the physical block size) and preferred
    #: I/O size, in bytes; 0: the logical block size, none.
    physical_block_size: int = 0
    opt_io_size: int = 0
    extra_features: int = 0


@dataclass
class BlkStats:
    """Request counters of one queue (kept cheap: plain integer adds by its worker only)."""

    by_type: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # requests completed with a status other than OK
    bad_chains: int = 0  # malformed requests (no header, no status byte, bad chain)
    bytes_read: int = 0
    bytes_written: int = 0

    def as_json(self) -> dict[str, object]:
        by_type = dict(self.by_type)
        return {
            "requests": {vb.request_type_name(t): n for t, n in sorted(by_type.items())},
            "requests_total": sum(by_type.values()),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": self.errors,
            "bad_requests": self.bad_chains,
        }

    def add(self, other: BlkStats) -> None:
        for rtype, n in list(other.by_type.items()):
            self.by_type[rtype] = self.by_type.get(rtype, 0) + n
        self.errors += other.errors
        self.bad_chains += other.bad_chains
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written


class BlkDevice(VirtioDevice):
    """A virtio-blk device serving a ``Backend``."""

    def __init__(self, backend: Backend, options: BlkOptions | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.options = opts = options or BlkOptions()
        if opts.block_size not in (512, 1024, 2048, 4096):
            raise BlkConfigError(f"block size {opts.block_size} must be 512, 1024, 2048 or 4096")
        if backend.size <= 0 or backend.size % opts.block_size:
            raise BlkConfigError(
                f"size {backend.size} is not a positive multiple of the block size {opts.block_size}"
            )
        if not 1 <= opts.num_queues <= 64:
            raise BlkConfigError(f"queue count {opts.num_queues} must be 1 to 64")
        qs = opts.queue_size
        if not (2 <= qs <= 32768 and qs & (qs - 1) == 0):
            raise BlkConfigError(f"queue size {qs} must be a power of two from 2 to 32768")
        phys = opts.physical_block_size
        if phys and (phys < opts.block_size or phys & (phys - 1) or phys > 1 << 16):
            raise BlkConfigError(
                f"physical block size {phys} must be a power of two from the "
                f"block size {opts.block_size} to 64 KiB"
            )
        if len(opts.serial.encode()) > vb.ID_BYTES:
            raise BlkConfigError(f"serial is longer than {vb.ID_BYTES} bytes")
        self.serial = opts.serial.encode().ljust(vb.ID_BYTES, b"\0")
        #: The capacity in one 8-byte cell, so a native data path reads it as it changes.
        self.capacity_cell = array.array("Q", [backend.size])
        #: One ``BlkStats`` per queue, written only by that queue's worker (no lock).
        self.queue_stats = [BlkStats() for _ in range(opts.num_queues)]
        #: ... and with those of an engine serving a queue outside Python (see fastpath).
        self.per_queue = PerQueueStats(self.queue_stats, BlkStats)
        self._stats_lock = threading.Lock()  # for outcomes counted off a queue's thread
        self._own_handle = type(self).handle is not BlkDevice.handle
        #: Some of the backend's calls are coroutine functions: requests run on the runtime's
        #: event loop. (A call that returns an awaitable anyway, through a decorator that hides
        #: what it wraps, is awaited there too: see ``_perform``.)
        self._async_backend = any(_is_async(getattr(backend, name, None)) for name in IO_METHODS)
        #: The backend's calls return at once and complete later (a network client).
        self._later_backend = isinstance(backend, LaterBackend)

    async def open_async(self) -> None:
        await self.backend.open_async()

    async def close_async(self) -> None:
        await self.backend.close_async()

    def has_loop_hooks(self) -> bool:
        b = type(self.backend)
        mine = type(self)
        return (
            mine.open_async is not BlkDevice.open_async
            or mine.close_async is not BlkDevice.close_async
            or b.open_async is not Backend.open_async
            or b.close_async is not Backend.close_async
        )

    def native_plan(self) -> NativeBlk | str:
        """How a native data path can serve this device, or why it cannot: a subclass that
        handles requests itself, or a backend whose storage only its methods reach."""
        if self._own_handle or type(self).submit is not BlkDevice.submit:
            return f"{type(self).__name__} handles its requests itself"
        storage = self.backend.native_storage()
        if storage is None:
            return f"the native data path has no {self.backend.kind} backend"
        return NativeBlk(
            self.capacity_cell,
            self.options.readonly,
            self.serial,
            self.options.num_queues,
            storage,
            self.backend.blocking,
            self.per_queue,
        )

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_cell[0]

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self.capacity_cell[0] = value

    @property
    def block_size(self) -> int:
        return self.options.block_size

    @property
    def may_wait(self) -> bool:
        return self.backend.blocking or self._later_backend or self._async_backend

    def status(self) -> dict[str, object]:
        b, o = self.backend, self.options
        out: dict[str, object] = {
            "backend": b.description,
            "backend_kind": b.kind,
            "capacity": self.capacity_bytes,
            "block_size": o.block_size,
            "readonly": o.readonly,
            "serial": o.serial,
            "cache": "none" if getattr(b, "direct", False) else "writeback",
        }
        choice = getattr(b, "cache_choice", None)
        if choice is not None:  # a file: what was asked for ("auto" chose the above)
            out["cache_choice"] = choice
        backend_status = getattr(b, "status", None)
        if callable(backend_status):  # a network client: its server and connections
            out[b.kind] = backend_status()
        return out

    def queue_counts(self, queue: int) -> dict[str, object]:
        return self.queue_snapshot(queue).as_json()

    def total_counts(self) -> dict[str, object]:
        return self.stats.as_json()

    def queue_snapshot(self, queue: int) -> BlkStats:
        """The counters of one queue, including those of a native engine serving it."""
        return self.per_queue.snapshot(queue)

    @property
    def stats(self) -> BlkStats:
        """All queues' counters added up (a snapshot)."""
        return self.per_queue.total()

    # -- identity -----------------------------------------------------------------------

    def offered_features(self) -> int:
        o = self.options
        f = REQUIRED_FEATURES | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)
        f |= bit(vb.F_SEG_MAX) | bit(vb.F_BLK_SIZE) | bit(vb.F_TOPOLOGY)
        b = self.backend
        if o.flush and b.can_flush:
            f |= bit(vb.F_FLUSH)
        if o.packed:
            f |= bit(F_RING_PACKED)
        if o.num_queues > 1:
            f |= bit(vb.F_MQ)
        if o.readonly:
            f |= bit(vb.F_RO)
        else:
            if o.discard and b.can_discard:
                f |= bit(vb.F_DISCARD)
            if o.write_zeroes:  # written as zero buffers when the backend has none
                f |= bit(vb.F_WRITE_ZEROES)
        return f | o.extra_features

    def config(self) -> vb.BlkConfig:
        o = self.options
        lbs = o.block_size // vb.SECTOR_SIZE
        return vb.BlkConfig(
            capacity=self.capacity_bytes // vb.SECTOR_SIZE,
            seg_max=max(o.queue_size - 2, 1),
            blk_size=o.block_size,
            physical_block_exp=((o.physical_block_size or o.block_size) // o.block_size).bit_length() - 1,
            min_io_size=1,
            opt_io_size=o.opt_io_size // o.block_size,
            num_queues=o.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=lbs,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_DISCARD_SEG,
            write_zeroes_may_unmap=1,
        )

    def spec(self) -> DeviceSpec:
        return DeviceSpec(
            device_id=DeviceId.BLOCK,
            features=self.offered_features(),
            config=self.config().pack(),
            num_queues=self.options.num_queues,
            queue_size=self.options.queue_size,
        )

    def identity(self) -> dict[str, object]:
        spec = self.spec()
        return {
            "backend": self.backend.description,
            "size": self.backend.size,
            "features": spec.features,
            "queues": spec.num_queues,
            "queue_size": spec.queue_size,
            "block_size": self.options.block_size,
        }

    def set_capacity(self, size_bytes: int) -> None:
        """Change the capacity seen by the driver (config update + config interrupt).

        Safe while queues run: requests are range-checked against ``capacity_bytes``, which
        changes in one store; when shrinking, the caller frees the storage only after this.
        """
        if size_bytes <= 0 or size_bytes % self.options.block_size:
            raise BlkConfigError(
                f"size {size_bytes} is not a multiple of the block size {self.options.block_size}"
            )
        self.capacity_bytes = size_bytes
        self.update_config(vb.CAPACITY_OFFSET, (size_bytes // vb.SECTOR_SIZE).to_bytes(8, "little"))

    # -- requests -----------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain) -> int:
        """Serve one request inline (the backend's calls block this thread).

        An async backend cannot be waited for here: the request then fails (IOERR, logged)
        rather than complete without its work; a subclass over such a backend overrides
        ``submit`` with ``request.run(self.handle_async(request.queue, request.chain))``."""
        planned = self._plan(queue, chain)
        if isinstance(planned, int):
            return planned
        if self._async_backend:
            return self._cannot_wait(planned)
        done = self._perform(planned, defer=False)
        assert isinstance(done, int)  # defer=False: never a coroutine
        return done

    async def handle_async(self, queue: int, chain: Chain) -> int:
        """Serve one request, awaiting whatever the backend's calls return (any backend:
        the calls of a synchronous one are made inline)."""
        planned = self._plan(queue, chain)
        if isinstance(planned, int):
            return planned
        return await self._perform_async(planned)

    def _cannot_wait(self, planned: _Planned) -> int:
        self.request_log.warning(
            "queue %d: %s at sector %d failed: %s.handle() cannot wait for the async "
            "calls of its backend: serve it with `request.run(self.handle_async(queue, chain))`",
            planned.queue,
            vb.request_type_name(planned.rtype),
            planned.sector,
            type(self).__name__,
        )
        return self._finish(planned, IOERR, locked=True)

    def submit(self, request: Request) -> None:
        """Take a request: parsed and checked now; the backend's work inline when it cannot
        wait (memory, null), on the runtime's thread pool when it may block (a file: then
        one queue has many requests in flight), or on its event loop for an async backend.

        A subclass that overrides ``handle`` is served through its ``handle``."""
        if self._own_handle:
            super().submit(request)
            return
        planned = self._plan(request.queue, request.chain)
        if isinstance(planned, int):
            request.complete(planned)
        elif not planned.calls:
            request.complete(self._finish(planned, OK))
        elif self._later_backend:
            self._start_later(planned, request)
        elif self._async_backend:
            request.run(self._perform_async(planned))
        elif self.backend.blocking:
            request.run_blocking(lambda: self._perform(planned))
        else:
            done = self._perform(planned)
            if isinstance(done, int):
                request.complete(done)
            else:  # a call returned an awaitable: the rest runs on the event loop
                request.run(done)

    def describe_request(self, chain: Chain) -> str:
        """``read at sector 8``, from the request's header (its descriptor id if it has none)."""
        if chain.error is None and chain.readable and total(chain.readable) >= _OUTHDR.size:
            rtype, _prio, sector = _OUTHDR.unpack(gather(chain.readable, 0, _OUTHDR.size))
            return f"{vb.request_type_name(rtype & ~vb.T_BARRIER)} at sector {sector}"
        return f"request {chain.head} (no header)"

    def write_failure(self, chain: Chain) -> int:
        """IOERR in the status byte, when the chain has one."""
        if chain.error is None and chain.writable:
            last = chain.writable[-1]
            if len(last):
                last[len(last) - 1] = IOERR
                return 1
        return 0

    def _plan(self, queue: int, chain: Chain) -> int | _Planned:
        """Parse and check a request: the used length of one that is already finished (a
        malformed chain, a range error, GET_ID), or the backend calls it needs."""
        st = self.queue_stats[queue]
        writable = chain.writable
        readable = chain.readable
        if chain.error is not None:
            st.bad_chains += 1
            self.request_log.warning(
                "queue %d: bad request (descriptor %d): %s", queue, chain.head, chain.error
            )
            return 0
        if (
            not writable
            or not readable
            or (len(readable[0]) < _OUTHDR.size and total(readable) < _OUTHDR.size)
        ):
            st.bad_chains += 1
            self.request_log.warning(
                "queue %d: a request (descriptor %d) has no header or no status byte", queue, chain.head
            )
            return 0
        last = writable[-1]
        if not len(last):
            st.bad_chains += 1
            self.request_log.warning(
                "queue %d: a request (descriptor %d) has no status byte", queue, chain.head
            )
            return 0
        in_len = (len(last) - 1) if len(writable) == 1 else total(writable) - 1
        rtype, _prio, sector = _OUTHDR.unpack(gather(readable, 0, _OUTHDR.size))
        rtype &= ~vb.T_BARRIER
        counts = st.by_type
        counts[rtype] = counts.get(rtype, 0) + 1
        planned = _Planned(queue, rtype, sector, last, st)
        status, written = self._dispatch(planned, readable, writable, in_len)
        if status != OK or not planned.calls:
            return self._finish(planned, status, written)
        planned.written = written
        return planned

    def _perform(self, planned: _Planned, defer: bool = True) -> int | Coroutine[Any, Any, int]:
        """Make the backend calls (this thread may block); returns the used length, or,
        when a call returned an awaitable (an async method the backend's class did not show
        as one), a coroutine that awaits it and makes the remaining calls: the request is
        complete only once that has run. ``defer=False``: such a request fails instead."""
        backend = self.backend
        try:
            for i, (fn, args) in enumerate(planned.calls):
                if isinstance(backend, LaterBackend):  # started, then waited for
                    backend.call_and_wait(planned.queue, fn.__name__, args)
                    continue
                result = fn(*args)
                if inspect.isawaitable(result):
                    if defer:
                        return self._perform_async(planned, i + 1, result)
                    if inspect.iscoroutine(result):
                        result.close()  # never run: nothing of it was done
                    return self._cannot_wait(planned)
        except CallAbandoned:
            raise  # the queue is stopping: the runtime drops the request
        except Exception as e:
            return self._finish(planned, self._failure(planned, e), locked=True)
        return self._finish(planned, OK, planned.written, locked=True)

    async def _perform_async(
        self, planned: _Planned, start: int = 0, pending: Awaitable[object] | None = None
    ) -> int:
        """The same with an asyncio backend, on the runtime's event loop: whatever a call
        returns that is awaitable is awaited (``pending``: that of the call before
        ``start``)."""
        try:
            if pending is not None:
                await pending
            for fn, args in planned.calls[start:]:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
        except Exception as e:
            return self._finish(planned, self._failure(planned, e), locked=True)
        return self._finish(planned, OK, planned.written, locked=True)

    def _start_later(self, planned: _Planned, request: Request) -> None:
        """Start the calls of a ``LaterBackend``; the last one to finish completes the
        request (from whichever thread finishes it)."""
        backend = self.backend
        assert isinstance(backend, LaterBackend)
        calls = planned.calls
        left = [len(calls)]
        failures: list[BaseException] = []
        lock = threading.Lock() if len(calls) > 1 else None

        def done(error: BaseException | None) -> None:
            if lock is not None:
                with lock:
                    if error is not None:
                        failures.append(error)
                    left[0] -= 1
                    if left[0]:
                        return
            elif error is not None:
                failures.append(error)
            if failures:
                e = failures[0]
                status = self._failure(planned, e if isinstance(e, Exception) else RuntimeError(str(e)))
                request.complete(self._finish(planned, status, locked=True))
            else:
                request.complete(self._finish(planned, OK, planned.written, locked=True))

        for fn, args in calls:
            try:
                backend.start(planned.queue, fn.__name__, args, done)
            except Exception as e:  # a bug in the backend: this call fails, not the queue
                done(e)

    def _failure(self, planned: _Planned, e: Exception) -> int:
        what = vb.request_type_name(planned.rtype)
        if isinstance(e, OSError):
            self.request_log.warning(
                "queue %d: %s at sector %d failed: %s", planned.queue, what, planned.sector, e
            )
        else:  # a bug must fail one request, not the queue
            self.request_log.failure(
                "queue %d: %s at sector %d failed in the backend",
                planned.queue,
                what,
                planned.sector,
                error=e,
            )
        return IOERR

    def _finish(self, planned: _Planned, status: int, written: int = 0, locked: bool = False) -> int:
        """Write the status byte, count the outcome; returns the used length."""
        st = planned.stats
        if locked:  # off the queue's own thread: other requests of the queue count too
            with self._stats_lock:
                self._count(st, planned, status, written)
        else:
            self._count(st, planned, status, written)
        planned.status_byte[len(planned.status_byte) - 1] = status
        return (written if status == OK else 0) + 1

    @staticmethod
    def _count(st: BlkStats, planned: _Planned, status: int, written: int) -> None:
        if status != OK:
            st.errors += 1
        elif planned.rtype == T_IN:
            st.bytes_read += written
        elif planned.rtype == T_OUT:
            st.bytes_written += planned.out_len

    def _dispatch(
        self, planned: _Planned, readable: list[memoryview], writable: list[memoryview], in_len: int
    ) -> tuple[int, int]:
        """(status, bytes written) of a request, its backend calls left in ``planned``."""
        rtype, sector = planned.rtype, planned.sector
        if rtype == T_IN:
            offset = sector << vb.SECTOR_SHIFT
            if not self._in_range(offset, in_len):
                return IOERR, 0
            if in_len:
                planned.calls.append((self.backend.readv, (offset, slice_segments(writable, 0, in_len))))
            return OK, in_len
        if rtype == T_OUT:
            if self.options.readonly:
                return IOERR, 0
            offset = sector << vb.SECTOR_SHIFT
            out_len = total(readable) - _OUTHDR.size
            if not self._in_range(offset, out_len):
                return IOERR, 0
            if out_len:
                planned.calls.append(
                    (
                        self.backend.writev,
                        (offset, slice_segments(readable, _OUTHDR.size, _OUTHDR.size + out_len)),
                    )
                )
            planned.out_len = out_len
            return OK, 0
        if rtype == T_FLUSH:
            if not self.options.readonly:
                planned.calls.append((self.backend.flush, ()))
            return OK, 0
        if rtype == T_GET_ID:
            n = min(in_len, vb.ID_BYTES)
            if n:
                pos = 0
                for seg in slice_segments(writable, 0, n):
                    seg[:] = self.serial[pos : pos + len(seg)]
                    pos += len(seg)
            return OK, n
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._discard_or_zero(planned, readable), 0
        return UNSUPP, 0

    def _in_range(self, offset: int, length: int) -> bool:
        return length >= 0 and offset + length <= self.capacity_bytes

    def _discard_or_zero(self, planned: _Planned, readable: list[memoryview]) -> int:
        rtype = planned.rtype
        if self.options.readonly:
            return IOERR
        feature = vb.F_DISCARD if rtype == T_DISCARD else vb.F_WRITE_ZEROES
        negotiated = self.features or self.spec().features  # unit tests may skip negotiation
        if not negotiated >> feature & 1:
            return UNSUPP
        payload = gather(readable, _OUTHDR.size, total(readable) - _OUTHDR.size)
        nseg, rest = divmod(len(payload), _SEG.size)
        if nseg == 0 or rest or nseg > MAX_DISCARD_SEG:
            return IOERR
        segments = [_SEG.unpack_from(payload, i * _SEG.size) for i in range(nseg)]
        for sector, num, flags in segments:
            offset, length = sector << vb.SECTOR_SHIFT, num << vb.SECTOR_SHIFT
            if num > MAX_DISCARD_SECTORS or not self._in_range(offset, length):
                return IOERR
            if rtype == T_DISCARD and flags:
                return UNSUPP  # no flags are defined for discard
            if rtype == T_WRITE_ZEROES and flags & ~vb.WRITE_ZEROES_FLAG_UNMAP:
                return UNSUPP
        for sector, num, flags in segments:
            offset, length = sector << vb.SECTOR_SHIFT, num << vb.SECTOR_SHIFT
            if rtype == T_DISCARD:
                planned.calls.append((self.backend.discard, (offset, length)))
            elif self.backend.can_write_zeroes:
                planned.calls.append(
                    (self.backend.write_zeroes, (offset, length, bool(flags & vb.WRITE_ZEROES_FLAG_UNMAP)))
                )
            else:  # a backend without write_zeroes: zero buffers through its writev
                planned.calls.extend((self.backend.writev, call) for call in _zero_writes(offset, length))
        return OK


_ZEROES = memoryview(bytes(1 << 20))
_ZERO_WRITE = 64 << 20  # the most one emulated write_zeroes call writes


def _zero_writes(offset: int, length: int) -> list[tuple[int, list[memoryview]]]:
    """``writev`` arguments that store ``length`` zero bytes at ``offset``."""
    out = []
    end = offset + length
    while offset < end:
        n = min(_ZERO_WRITE, end - offset)
        whole, rest = divmod(n, len(_ZEROES))
        out.append((offset, [_ZEROES] * whole + ([_ZEROES[:rest]] if rest else [])))
        offset += n
    return out


def _is_async(method: object) -> bool:
    """Whether ``method`` is a coroutine function, seen through ``functools.wraps``
    decorators and partials."""
    while isinstance(method, functools.partial):
        method = method.func
    if inspect.iscoroutinefunction(method):
        return True
    try:
        return inspect.iscoroutinefunction(inspect.unwrap(method))  # type: ignore[arg-type]
    except ValueError:  # a cycle of __wrapped__
        return False


class _Planned:
    """A checked request and the backend calls that will serve it."""

    __slots__ = ("calls", "out_len", "queue", "rtype", "sector", "stats", "status_byte", "written")

    def __init__(self, queue: int, rtype: int, sector: int, status_byte: memoryview, stats: BlkStats) -> None:
        self.queue = queue
        self.rtype = rtype
        self.sector = sector
        self.status_byte = status_byte  # the last writable buffer: its last byte
        self.stats = stats
        self.calls: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self.written = 0  # the data length the request returns when the calls succeed
        self.out_len = 0
