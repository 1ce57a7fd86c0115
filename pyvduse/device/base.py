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
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pyvduse.abi.virtio import F_ACCESS_PLATFORM, F_VERSION_1, bit
from pyvduse.device.request import Request
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


class InputSource(Protocol):
    """Something outside that completes a queue's requests (frames arriving for receive
    buffers), watched by the queue's own worker: no thread of its own, no hand-over."""

    def fileno(self) -> int:
        """Readable when there is input."""
        ...

    def wants(self) -> bool:
        """Whether to watch the fd now (there are requests the input would complete)."""
        ...

    def wake_after(self) -> float | None:
        """Seconds after which ``pump`` runs even if the fd is not readable (None: never)."""
        ...

    def pump(self) -> None:
        """The fd is readable (or ``wake_after`` passed): take the input, completing requests
        (on the worker's thread, so they are pushed at once and published with its round)."""
        ...


class VirtioDevice(ABC):
    """Base class of device models: implement ``spec`` and ``handle`` (or ``submit``)."""

    def __init__(self) -> None:
        cls = type(self)
        if cls.handle is VirtioDevice.handle and cls.submit is VirtioDevice.submit:
            raise TypeError(f"{cls.__name__} must implement handle() or submit()")
        self.features = 0
        self._config_writer: ConfigWriter | None = None

    @abstractmethod
    def spec(self) -> DeviceSpec:
        """The device's identity; called once before creation."""

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

    def input_source(self, queue: int) -> InputSource | None:
        """What the worker of ``queue`` watches besides the ring (None: nothing)."""
        return None

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
        else:
            request.fail(f"handle() returned {type(result).__name__}, not a byte count")

    def write_failure(self, chain: Chain) -> int:
        """Complete a request that failed (an exception, a lost mapping): write what the
        device writes then, return the bytes written. The default writes nothing."""
        return 0

    def bind_config_writer(self, writer: ConfigWriter | None) -> None:
        """The transport's way to push config-space changes (set config + config IRQ)."""
        self._config_writer = writer

    def update_config(self, offset: int, data: bytes) -> None:
        if self._config_writer is None:
            raise RuntimeError("device is not attached to a transport")
        self._config_writer(offset, data)
