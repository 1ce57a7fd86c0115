"""A generic virtio driver for the model: what virtio_vdpa and the virtio core do.

It probes the device the way Linux does (reset, ACKNOWLEDGE, DRIVER, feature negotiation,
FEATURES_OK and the re-read that checks it was accepted, queue setup, DRIVER_OK), sets up
split rings with the kernel model's coherent memory, kicks only when the device asks (event
index or NO_NOTIFY), and waits for interrupts with a timeout: a test never hangs on a device.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sized
from typing import Protocol, cast

from pyvduse.abi.virtio import (
    F_ACCESS_PLATFORM,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    Status,
    bit,
    has,
)
from pyvduse.model.packed_driver import DriverPackedRing
from pyvduse.model.split_driver import Completion, DmaSpace, DriverSplitRing

#: Transport features this driver implements.
DRIVER_TRANSPORT_FEATURES = (
    bit(F_VERSION_1)
    | bit(F_ACCESS_PLATFORM)
    | bit(F_RING_EVENT_IDX)
    | bit(F_RING_INDIRECT_DESC)
    | bit(F_RING_PACKED)
)


class VdpaOps(Protocol):
    """The vdpa config ops a virtio driver calls: the kernel model's (``ModelKernel``) or a
    real device's through vhost-vdpa (``VhostVdpa``)."""

    @property
    def vqs(self) -> Sized: ...
    @property
    def iova(self) -> DmaSpace: ...
    @property
    def config_callback(self) -> Callable[[], None] | None: ...
    @config_callback.setter
    def config_callback(self, cb: Callable[[], None] | None) -> None: ...
    def get_config(self, offset: int, length: int) -> bytes: ...
    def get_device_features(self) -> int: ...
    def set_driver_features(self, features: int) -> None: ...
    def get_status(self) -> int: ...
    def set_status(self, status: int) -> None: ...
    def get_vq_num_max(self) -> int: ...
    def set_vq_num(self, index: int, num: int) -> None: ...
    def set_vq_address(self, index: int, desc: int, driver: int, device: int) -> None: ...
    def set_vq_state(self, index: int, state: tuple[int, ...]) -> None: ...
    def set_vq_ready(self, index: int, ready: bool) -> None: ...
    def set_vq_callback(self, index: int, cb: Callable[[], None] | None) -> None: ...
    def kick(self, index: int) -> None: ...


class ProbeError(RuntimeError):
    """The device refused the driver (FEATURES_OK not accepted, or broken)."""


#: How long ``DriverQueue.wait`` sleeps for an interrupt before it looks at the ring anyway.
POLL_SECONDS = 0.05


class DriverQueue:
    """One virtqueue as the driver uses it."""

    def __init__(self, kernel: VdpaOps, index: int, ring: DriverSplitRing | DriverPackedRing) -> None:
        self.kernel = kernel
        self.index = index
        self.ring = ring
        self.lock = threading.Lock()
        self.irq = threading.Event()
        self.interrupts = 0
        #: Waits that ended by timing out rather than by an interrupt (the polling fallback).
        self.polls = 0
        # Completions by ticket, not by head: a head is reused as soon as it is collected,
        # while the thread that submitted it may not have picked its completion up yet.
        self.done: dict[int, Completion] = {}
        self._tickets = itertools.count(1)

    def on_interrupt(self) -> None:
        self.interrupts += 1
        self.irq.set()

    def submit(
        self, readable: list[bytes], writable: list[int], *, indirect: bool = False, token: object = None
    ) -> int:
        """Make one request available (kick if the device asks); returns its ticket for
        ``wait``. ``token`` rides along in the completion."""
        with self.lock:
            ticket = next(self._tickets)
            self.ring.add(readable, writable, indirect=indirect, token=(ticket, token))
            kick = self.ring.kick_needed()
        if kick:
            self.kernel.kick(self.index)
        return ticket

    def wait(self, ticket: int, timeout: float = 10.0) -> Completion:
        """Wait for the completion of the request ``submit`` returned ``ticket`` for
        (interrupt-driven, with a polling fallback); any thread, any order."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                self._collect()
                c2 = self.done.pop(ticket, None)
                if c2 is None:  # ask for the interrupt we wait for, then look once more
                    self.ring.arm_interrupt()
                    self._collect()
                    c2 = self.done.pop(ticket, None)
            if c2 is not None:
                return c2
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: request {ticket} not completed")
            if not self.irq.wait(min(left, POLL_SECONDS)):
                self.polls += 1
            self.irq.clear()

    def _collect(self) -> None:
        for c in self.ring.collect():
            t, c.token = cast(tuple[int, object], c.token)
            self.done[t] = c


#: Where a driver tells the device a queue's ring areas are, given the queue index and where
#: they really are (desc, driver area, device area); a hostile driver's placement.
Placement = Callable[[int, tuple[int, int, int]], tuple[int, int, int]]


class VirtioDriver:
    """Binds to a device (the model's, or a real one through vhost-vdpa) and brings it to
    DRIVER_OK."""

    def __init__(
        self,
        kernel: VdpaOps,
        *,
        device_features: int = (1 << 28) - 1,
        transport_features: int = DRIVER_TRANSPORT_FEATURES,
        queue_size: int | None = None,
        num_queues: int | None = None,
        placement: Placement | None = None,
        late_enable: bool = False,
    ) -> None:
        self.kernel = kernel
        self.late_enable = late_enable  # enable the queues after DRIVER_OK, as vhost allows
        self.wanted = device_features | transport_features
        self.queue_size = queue_size
        self.num_queues = num_queues
        self.placement = placement
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.config_changes = 0

    def probe(self) -> None:
        k = self.kernel
        k.set_status(0)
        k.set_status(Status.ACKNOWLEDGE)
        k.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        self.features = k.get_device_features() & self.wanted
        k.set_driver_features(self.features)
        k.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        if not k.get_status() & Status.FEATURES_OK:
            k.set_status(k.get_status() | Status.FAILED)
            raise ProbeError("the device did not accept FEATURES_OK")
        k.config_callback = self._on_config
        nq = self.num_queues or len(k.vqs)
        num = min(self.queue_size or k.get_vq_num_max(), k.get_vq_num_max())
        event_idx = has(self.features, F_RING_EVENT_IDX)
        packed = has(self.features, F_RING_PACKED)
        for i in range(nq):
            ring: DriverSplitRing | DriverPackedRing
            if packed:
                ring = DriverPackedRing(k.iova, num, event_idx=event_idx)
                addresses = (ring.desc_addr, ring.driver_addr, ring.device_addr)
                k.set_vq_state(i, (1, 0, 1, 0))
            else:
                ring = DriverSplitRing(k.iova, num, event_idx=event_idx)
                addresses = (ring.desc_addr, ring.avail_addr, ring.used_addr)
                k.set_vq_state(i, (0,))
            if self.placement is not None:
                addresses = self.placement(i, addresses)
            k.set_vq_address(i, *addresses)
            q = DriverQueue(k, i, ring)
            k.set_vq_num(i, num)
            k.set_vq_callback(i, q.on_interrupt)
            if not self.late_enable:
                k.set_vq_ready(i, True)
            self.queues.append(q)
        k.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
        if not k.get_status() & Status.DRIVER_OK:
            raise ProbeError("the device did not accept DRIVER_OK")
        if self.late_enable:
            for q in self.queues:
                k.set_vq_ready(q.index, True)

    def _on_config(self) -> None:
        self.config_changes += 1

    def remove(self) -> None:
        """What the driver's remove path does: reset the device."""
        self.kernel.set_status(0)
        self.queues.clear()
