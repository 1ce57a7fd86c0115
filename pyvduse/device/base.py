"""What every virtio device gives the transports, and what it is given back.

A device describes itself once (``DeviceSpec``: id, offered features, initial config space,
queue count and size), agrees or not to the negotiated features, and turns each request
(a validated ``Chain``) into bytes written. It never sees file descriptors, threads or which
transport it runs on.

Requests come in one of three styles, whichever suits the device:

- ``def handle(queue, chain) -> int``: serve the request before returning (the simple case);
- ``async def handle(queue, chain) -> int``: a coroutine, run on the runtime's event loop, so
  one queue has as many requests in flight as the driver sends;
- ``def submit(request)``: take a ``Request`` and complete it later, from any thread, in any
  order (``request.complete(written)``).

Whatever the style, an exception that escapes fails that one request (``write_failure``: for
virtio-blk, IOERR in the status byte) and is logged, rate-limited; the queue carries on.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pyvduse.abi.virtio import F_ACCESS_PLATFORM, F_VERSION_1, bit
from pyvduse.device.request import Request
from pyvduse.ratelimit import RateLimitedLogger
from pyvduse.ring.chain import Chain

#: Transport features every pyvduse device requires (VDUSE refuses devices without
#: ACCESS_PLATFORM; VERSION_1 gives little-endian rings and config).
REQUIRED_FEATURES = bit(F_VERSION_1) | bit(F_ACCESS_PLATFORM)


@dataclass(frozen=True)
class DeviceSpec:
    """The fixed identity a transport needs to create the device."""

    device_id: int
    features: int
    config: bytes
    num_queues: int
    queue_size: int
    vendor_id: int = 0


ConfigWriter = Callable[[int, bytes], None]


class VirtioDevice(ABC):
    """Base class of device models: implement ``spec`` and ``handle`` (or ``submit``)."""

    def __init__(self) -> None:
        cls = type(self)
        if cls.handle is VirtioDevice.handle and cls.submit is VirtioDevice.submit:
            raise TypeError(f"{cls.__name__} must implement handle() or submit()")
        self.features = 0
        self._config_writer: ConfigWriter | None = None
        #: This device's failed and malformed requests are logged through this, rate-limited
        #: per device (a flood on one device does not silence another's first message).
        self.request_log = RateLimitedLogger(logging.getLogger(cls.__module__))

    @abstractmethod
    def spec(self) -> DeviceSpec:
        """The device's identity; called once before creation."""

    def identity(self) -> dict[str, object]:
        """What must not change across a daemon restart for its in-flight log to apply to
        the device left behind (JSON values); a device adds what its requests depend on."""
        spec = self.spec()
        return {
            "device_id": spec.device_id,
            "features": spec.features,
            "queues": spec.num_queues,
            "queue_size": spec.queue_size,
        }

    def accept_features(self, features: int) -> bool:
        """Whether the driver's choice is acceptable (answering FEATURES_OK)."""
        offered = self.spec().features
        return features & ~offered == 0 and features & REQUIRED_FEATURES == REQUIRED_FEATURES

    def start(self, features: int) -> None:
        """DRIVER_OK: the negotiated features are final."""
        self.features = features

    def reset(self) -> None:
        """The driver reset the device: forget negotiated state."""
        self.features = 0

    async def open_async(self) -> None:
        """Run on the runtime's event loop once, before the first request is served: where
        a device (or ``BlkDevice``'s backend) opens what lives on that loop."""

    async def close_async(self) -> None:
        """Run on the runtime's event loop when the device stops being served."""

    def has_loop_hooks(self) -> bool:
        """Whether ``open_async``/``close_async`` do anything (else the runtime starts no
        event loop for them)."""
        cls = type(self)
        return (
            cls.open_async is not VirtioDevice.open_async or cls.close_async is not VirtioDevice.close_async
        )

    def quiesce(self) -> None:
        """The queues are about to stop (a reset, shutdown): stop whatever completes requests
        from outside (a packet source filling receive buffers). Once this returns nothing may
        touch a request the device marked ``idle``: those are dropped, not waited for."""

    def handle(self, queue: int, chain: Chain) -> int | Awaitable[int]:
        """Serve one request; returns the number of bytes written to writable buffers.

        An ``async def handle`` returns a coroutine instead, which the runtime runs on its
        event loop: many requests of one queue are then in flight at once.
        """
        raise NotImplementedError

    def submit(self, request: Request) -> None:
        """Take a request; complete it now or later (``request.complete``), from any thread.

        The default serves it with ``handle``: inline, or on the runtime's event loop when
        ``handle`` returned a coroutine.
        """
        result = self.handle(request.queue, request.chain)
        if isinstance(result, int):
            request.complete(result)
        elif inspect.iscoroutine(result):
            request.run(result)
        elif inspect.isawaitable(result):  # a Future, a Task, an object with __await__
            request.run(_awaited(result))
        else:
            request.fail(f"handle() returned {type(result).__name__}, not a byte count")

    def describe_request(self, chain: Chain) -> str:
        """What the log calls a request (virtio-blk: its type and sector); the default:
        the id the driver knows it by."""
        return f"request {chain.head}"

    def write_failure(self, chain: Chain) -> int:
        """Complete a request that failed (an exception, a lost mapping): write what the
        device writes then, return the bytes written. The default writes nothing."""
        return 0

    # -- what operations show (``ctl status``, ``ctl stats``, metrics) ---------------------

    @property
    def may_wait(self) -> bool:
        """Whether requests may wait for something (a disk, a server) rather than finish
        inline, so that the queue's aio mode matters. A device of one's own: assume so."""
        return True

    def status(self) -> dict[str, object]:
        """Device-specific fields of ``ctl NAME status`` (JSON values)."""
        return {}

    def queue_counts(self, queue: int) -> dict[str, object]:
        """Device-specific counters of queue ``queue`` for ``ctl NAME stats``."""
        return {}

    def total_counts(self) -> dict[str, object]:
        """The same, all queues added up."""
        return {}

    def bind_config_writer(self, writer: ConfigWriter | None) -> None:
        """The transport's way to push config-space changes (set config + config IRQ)."""
        self._config_writer = writer

    def update_config(self, offset: int, data: bytes) -> None:
        if self._config_writer is None:
            raise RuntimeError("device is not attached to a transport")
        self._config_writer(offset, data)


async def _awaited(awaitable: Awaitable[int]) -> int:
    return await awaitable
