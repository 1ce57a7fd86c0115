"""The kernel half of a VDUSE device, modelled in process.

It keeps what VDUSE keeps, the way VDUSE keeps it: the config space (driver reads are served
from this copy and never wait on the device; driver writes are dropped; the device changes it
only with ``dev_set_config`` and a config interrupt), the offered features (fixed at
creation) and the driver's choice (made here, read by the device), the status (stored only
when the device answers OK), the queue setup, and the IOVA space. It talks to the device only
through messages (SET_STATUS, GET_VQ_STATE) answered within ``msg_timeout``; a device that does
not answer in time is marked broken for good, and the driver side never waits longer.

Driver-facing methods mirror the vdpa config ops virtio_vdpa calls; device-facing methods
mirror the VDUSE ioctls (and raise the same errnos).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import (
    F_ACCESS_PLATFORM,
    F_RING_PACKED,
    F_VERSION_1,
    DeviceId,
    Status,
    has,
)
from pyvduse.device.base import DeviceSpec
from pyvduse.ring.memory import Region
from pyvduse.transport.base import QueueSetup
from pyvduse.transport.model.iova import IovaSpace

MiB = 1 << 20
SET_STATUS = "SET_STATUS"
GET_VQ_STATE = "GET_VQ_STATE"
UPDATE_IOTLB = "UPDATE_IOTLB"


class ModelError(OSError):
    """An errno-carrying failure, as the real ioctl or vdpa op would report it."""


@dataclass
class Message:
    """A control message waiting for the device's answer."""

    kind: str
    arg: int
    last: int = 0  # UPDATE_IOTLB: the range is [arg, last]
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    state: tuple[int, ...] = ()


@dataclass
class VqState:
    num: int = 0
    desc_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0
    ready: bool = False
    state: tuple[int, ...] = (0,)
    kick_fd: int | None = None
    kick_pending: bool = False
    callback: Callable[[], None] | None = None


class ModelKernel:
    """One VDUSE device's kernel state."""

    def __init__(
        self,
        spec: DeviceSpec,
        *,
        bounce_size: int = 16 * MiB,
        coherent_size: int = 8 * MiB,
        msg_timeout: float = 5.0,
    ) -> None:
        self._validate(spec)
        self.spec = spec
        self.config = bytearray(spec.config)
        self.device_features = spec.features
        self.driver_features = 0
        self.status = 0
        self.generation = 0
        self.broken = False
        self.msg_timeout = msg_timeout
        self.vqs = [VqState() for _ in range(spec.num_queues)]
        self.iova = IovaSpace(bounce_size, coherent_size)
        self.config_callback: Callable[[], None] | None = None
        self.messages: queue.Queue[Message] = queue.Queue()
        self._lock = threading.RLock()  # the vdpa core's config lock: one status change at a time
        self.message_log: list[tuple[str, int]] = []

    @staticmethod
    def _validate(spec: DeviceSpec) -> None:
        """The checks VDUSE_CREATE_DEV makes."""
        if not has(spec.features, F_ACCESS_PLATFORM):
            raise ModelError(errno.EINVAL, "VIRTIO_F_ACCESS_PLATFORM must be offered")
        if spec.device_id == DeviceId.BLOCK and has(spec.features, vb.F_CONFIG_WCE):
            raise ModelError(errno.EINVAL, "VIRTIO_BLK_F_CONFIG_WCE is refused")
        if spec.device_id == DeviceId.NET and has(spec.features, vn.F_CTRL_VQ):
            raise ModelError(errno.EINVAL, "VIRTIO_NET_F_CTRL_VQ is refused")
        if spec.device_id == DeviceId.NET and not has(spec.features, F_VERSION_1):
            raise ModelError(errno.EINVAL, "a net device needs VIRTIO_F_VERSION_1")
        if spec.device_id not in (DeviceId.BLOCK, DeviceId.NET, DeviceId.FS):  # FS: Linux 6.15+
            raise ModelError(errno.EINVAL, f"device id {spec.device_id} is not allowed")
        if len(spec.config) > 4096 or not 0 < spec.num_queues <= 0xFFFF:
            raise ModelError(errno.EINVAL, "config or queue count out of range")
        if spec.queue_size <= 0:
            raise ModelError(errno.EINVAL, "every queue needs a max size")

    # -- messages ---------------------------------------------------------------------------

    def _send(self, kind: str, arg: int, last: int = 0) -> Message:
        msg = Message(kind, arg, last)
        self.message_log.append((kind, arg))
        if self.broken:
            return msg  # fails at once, not queued
        self.messages.put(msg)
        if not msg.done.wait(self.msg_timeout):
            self.broken = True  # for good: later messages fail immediately
            while True:
                try:
                    self.messages.get_nowait().done.set()
                except queue.Empty:
                    break
        return msg

    def answer(self, msg: Message, ok: bool, state: tuple[int, ...] = ()) -> None:
        """The device's reply. For SET_STATUS the status is recorded before the waiter wakes,
        so an interrupt sent right after answering DRIVER_OK is never refused."""
        if msg.done.is_set():
            return  # too late: the kernel gave up on it
        msg.ok, msg.state = ok, state
        if msg.kind == SET_STATUS and ok and msg.arg:
            self.status = msg.arg
        msg.done.set()

    # -- driver side: the vdpa config ops ------------------------------------------------------

    def get_config(self, offset: int, length: int) -> bytes:
        data = bytes(self.config[offset : offset + length])
        return data.ljust(length, b"\0")  # past config_size reads as zero

    def set_config(self, offset: int, data: bytes) -> None:
        """Driver writes to config space are dropped: it is read-only under VDUSE."""

    def get_device_features(self) -> int:
        return self.device_features

    def set_driver_features(self, features: int) -> None:
        self.driver_features = features  # not a message

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        with self._lock:
            if status == 0:
                self.reset()
                return
            self._send(SET_STATUS, status)  # on failure the status is simply not stored

    def reset(self) -> bool:
        """Reset: tell the device, then clear everything whatever it answered."""
        with self._lock:
            msg = self._send(SET_STATUS, 0)
            self.status = 0
            self.driver_features = 0
            self.generation += 1
            for vq in self.vqs:
                vq.__init__()  # type: ignore[misc]
            self.iova.reset()
            return msg.ok

    def free_coherent(self, iova: int) -> bool:
        """The driver frees a coherent allocation: VDUSE removes its IOTLB region and tells
        the device (UPDATE_IOTLB) before the memory can be reused; True if it answered."""
        with self._lock:
            rng = self.iova.coherent_range(iova)
            if rng is None:
                raise ModelError(errno.EINVAL, f"0x{iova:x} is not a coherent allocation")
            self.iova.free(iova)
            return self._send(UPDATE_IOTLB, rng[0], rng[1]).ok

    def get_vq_num_max(self) -> int:
        return self.spec.queue_size

    def set_vq_num(self, index: int, num: int) -> None:
        self.vqs[index].num = num

    def set_vq_address(self, index: int, desc: int, driver: int, device: int) -> None:
        vq = self.vqs[index]
        vq.desc_addr, vq.driver_addr, vq.device_addr = desc, driver, device

    def set_vq_state(self, index: int, state: tuple[int, ...]) -> None:
        self.vqs[index].state = state

    def set_vq_ready(self, index: int, ready: bool) -> None:
        self.vqs[index].ready = ready

    def set_vq_callback(self, index: int, cb: Callable[[], None] | None) -> None:
        self.vqs[index].callback = cb

    def get_vq_state(self, index: int) -> tuple[int, ...]:
        msg = self._send(GET_VQ_STATE, index)
        if not msg.ok:
            raise ModelError(errno.EIO, "GET_VQ_STATE failed")
        return msg.state

    def kick(self, index: int) -> None:
        vq = self.vqs[index]
        if not vq.ready:
            return  # dropped, as VDUSE does
        if vq.kick_fd is None:
            vq.kick_pending = True
        else:
            os.eventfd_write(vq.kick_fd, 1)

    # -- device side: the VDUSE ioctls ---------------------------------------------------------

    def _check(self) -> None:
        if self.broken:
            raise ModelError(errno.EPERM, "device is broken")

    def dev_get_features(self) -> int:
        self._check()
        return self.driver_features

    def vq_get_info(self, index: int) -> QueueSetup:
        self._check()
        vq = self.vqs[index]
        packed = has(self.driver_features, F_RING_PACKED)
        st = vq.state
        return QueueSetup(
            index=index,
            num=vq.num,
            desc_addr=vq.desc_addr,
            driver_addr=vq.driver_addr,
            device_addr=vq.device_addr,
            ready=vq.ready,
            avail_index=st[0] if not packed else 0,
            packed_state=(st[0], st[1], st[2], st[3]) if packed and len(st) == 4 else (1, 0, 1, 0),
        )

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        self._check()
        vq = self.vqs[index]
        vq.kick_fd = None if fd < 0 else fd
        if vq.kick_fd is not None and vq.kick_pending and vq.ready:
            vq.kick_pending = False
            os.eventfd_write(vq.kick_fd, 1)

    def vq_inject_irq(self, index: int) -> None:
        self._check()
        if not self.status & Status.DRIVER_OK:
            raise ModelError(errno.EINVAL, "interrupt before DRIVER_OK")
        vq = self.vqs[index]
        if vq.ready and vq.callback is not None:
            vq.callback()

    def dev_set_config(self, offset: int, data: bytes) -> None:
        self._check()
        if offset > len(self.config) or not data or len(data) > len(self.config) - offset:
            raise ModelError(errno.EINVAL, "config range")
        self.config[offset : offset + len(data)] = data

    def inject_config_irq(self) -> None:
        self._check()
        if not self.status & Status.DRIVER_OK:
            raise ModelError(errno.EINVAL, "config interrupt before DRIVER_OK")
        if self.config_callback is not None:
            self.config_callback()

    def iotlb_lookup(self, iova: int) -> Region | None:
        self._check()
        return self.iova.lookup(iova)
