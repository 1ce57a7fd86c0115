"""A userspace driver's handle on ``/dev/vhost-vdpa-N``: what a VMM does with it.

``VhostVdpa`` opens the device, becomes its owner, negotiates the backend features it
implements (v2 IOTLB messages, batching), maps its own memory (``IotlbMemory``) and offers
the vdpa config ops the model's ``VirtioDriver`` calls on the in-process kernel model --
status, features, config space, queue size, address, base, enable, kick, interrupt callback
-- as vhost ioctls, so the model's split and packed ring drivers and its ``BlkDriver`` run
unchanged on a real device through vhost-vdpa. Interrupts arrive on one call eventfd per
queue, read by a thread of ours that runs the queue's callback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from pyvduse.abi import vhost as h
from pyvduse.abi.virtio import F_RING_PACKED, has
from pyvduse.model.iotlb_memory import IotlbMemory

#: Backend features this driver implements.
DRIVER_BACKEND_FEATURES = (1 << h.BackendFeature.IOTLB_MSG_V2) | (1 << h.BackendFeature.IOTLB_BATCH)


@dataclass
class DriverVq:
    """The eventfds of one queue (ours to close)."""

    kick_fd: int = -1
    call_fd: int = -1
    callback: Callable[[], None] | None = None


class VhostVdpa:
    """One open ``/dev/vhost-vdpa-N``, owned by this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._ioctl(h.VHOST_SET_OWNER, 0)
            offered = self._get_u64(h.VHOST_GET_BACKEND_FEATURES)
            self.backend_features = offered & DRIVER_BACKEND_FEATURES
            self._set_u64(h.VHOST_SET_BACKEND_FEATURES, self.backend_features)
            self.device_id = self._get(h.VHOST_VDPA_GET_DEVICE_ID, h.U32)
            self.config_size = self._get(h.VHOST_VDPA_GET_CONFIG_SIZE, h.U32)
            nvqs = self._get(h.VHOST_VDPA_GET_VQS_COUNT, h.U32)
            raw = fcntl.ioctl(self.fd, h.VHOST_VDPA_GET_IOVA_RANGE, bytes(h.VDPA_IOVA_RANGE.size))
            first, last = h.VDPA_IOVA_RANGE.unpack(raw)
        except BaseException:
            os.close(self.fd)
            raise
        self.iova_range = (first, last)
        self.vqs = [DriverVq() for _ in range(nvqs)]
        self.iova = IotlbMemory(
            self._send_iotlb,
            iova_range=self.iova_range,
            batching=self.has_backend(h.BackendFeature.IOTLB_BATCH),
        )
        self._config_fd = -1
        self._config_callback: Callable[[], None] | None = None
        self._features = 0
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closing = False
        self._irq_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def has_backend(self, feature: h.BackendFeature) -> bool:
        return bool(self.backend_features >> feature & 1)

    # -- plumbing -------------------------------------------------------------------------

    def _ioctl(self, request: int, arg: int | bytes | bytearray) -> int | bytes:
        return fcntl.ioctl(self.fd, request, arg)

    def _get(self, request: int, fmt: struct.Struct) -> int:
        raw = fcntl.ioctl(self.fd, request, bytes(fmt.size))
        return int(fmt.unpack(raw)[0])

    def _get_u64(self, request: int) -> int:
        return self._get(request, h.U64)

    def _set_u64(self, request: int, value: int) -> None:
        fcntl.ioctl(self.fd, request, h.U64.pack(value))

    def _vring(self, request: int, index: int, num: int) -> None:
        fcntl.ioctl(self.fd, request, h.VRING_STATE.pack(index, num))

    def _send_iotlb(self, msg: h.IotlbMsg) -> None:
        data = msg.message(v2=self.has_backend(h.BackendFeature.IOTLB_MSG_V2))
        n = os.write(self.fd, data)
        if n != len(data):
            raise OSError(errno.EIO, f"short IOTLB message write ({n} of {len(data)} bytes)")

    # -- the vdpa config ops a virtio driver calls ----------------------------------------

    def get_config(self, offset: int, length: int) -> bytes:
        """Config space bytes; past the device's config size reads as zero (as vdpa does)."""
        n = max(min(length, self.config_size - offset), 0)
        if n == 0:
            return bytes(length)
        arg = h.config_request(offset, n)
        fcntl.ioctl(self.fd, h.VHOST_VDPA_GET_CONFIG, arg)  # fills arg in place
        return bytes(arg[h.VDPA_CONFIG_HEADER.size :]).ljust(length, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        arg = bytearray(h.VDPA_CONFIG_HEADER.pack(offset, len(data)) + data)
        fcntl.ioctl(self.fd, h.VHOST_VDPA_SET_CONFIG, arg)

    def get_device_features(self) -> int:
        return self._get_u64(h.VHOST_GET_FEATURES)

    def set_driver_features(self, features: int) -> None:
        self._set_u64(h.VHOST_SET_FEATURES, features)
        self._features = features

    def get_status(self) -> int:
        return self._get(h.VHOST_VDPA_GET_STATUS, h.U8)

    def set_status(self, status: int) -> None:
        """Status 0 resets the device (VDUSE asks the daemon first); the kernel refuses
        clearing bits any other way (EINVAL)."""
        fcntl.ioctl(self.fd, h.VHOST_VDPA_SET_STATUS, h.U8.pack(status))
        if status == 0:
            self._features = 0

    def get_vq_num_max(self) -> int:
        return self._get(h.VHOST_VDPA_GET_VRING_NUM, h.U16)

    def set_vq_num(self, index: int, num: int) -> None:
        self._vring(h.VHOST_SET_VRING_NUM, index, num)

    def set_vq_address(self, index: int, desc: int, driver: int, device: int) -> None:
        fcntl.ioctl(
            self.fd, h.VHOST_SET_VRING_ADDR, h.VringAddr(index, desc=desc, avail=driver, used=device).pack()
        )

    def set_vq_state(self, index: int, state: tuple[int, ...]) -> None:
        """Where the device starts: ``(avail_index,)`` split, the packed 4-tuple packed
        (the kernel reads it by the negotiated features, so set them first)."""
        num = h.packed_base(*state) if has(self._features, F_RING_PACKED) else state[0]
        self._vring(h.VHOST_SET_VRING_BASE, index, num)

    def get_vq_state(self, index: int) -> tuple[int, ...]:
        """VHOST_GET_VRING_BASE: the device's position (VDUSE asks the daemon)."""
        raw = fcntl.ioctl(self.fd, h.VHOST_GET_VRING_BASE, h.VRING_STATE.pack(index, 0))
        num = h.VRING_STATE.unpack(raw)[1]
        return h.unpack_packed_base(num) if has(self._features, F_RING_PACKED) else (num,)

    def set_vq_ready(self, index: int, ready: bool) -> None:
        vq = self.vqs[index]
        if ready and vq.kick_fd < 0:
            vq.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fcntl.ioctl(self.fd, h.VHOST_SET_VRING_KICK, h.VRING_FILE.pack(index, vq.kick_fd))
        self._vring(h.VHOST_VDPA_SET_VRING_ENABLE, index, int(ready))

    def set_vq_callback(self, index: int, cb: Callable[[], None] | None) -> None:
        """``cb`` runs on our interrupt thread each time the device signals queue
        ``index``'s call eventfd. Set again after every reset: VDUSE forgets it there."""
        vq = self.vqs[index]
        with self._lock:
            vq.callback = cb
            if cb is not None:
                if vq.call_fd < 0:
                    vq.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                fcntl.ioctl(self.fd, h.VHOST_SET_VRING_CALL, h.VRING_FILE.pack(index, vq.call_fd))
            self._start_irq_thread()
        os.eventfd_write(self._wake, 1)  # poll the new set

    def kick(self, index: int) -> None:
        fd = self.vqs[index].kick_fd
        if fd >= 0:
            os.eventfd_write(fd, 1)

    @property
    def config_callback(self) -> Callable[[], None] | None:
        return self._config_callback

    @config_callback.setter
    def config_callback(self, cb: Callable[[], None] | None) -> None:
        with self._lock:
            self._config_callback = cb
            if cb is not None:
                if self._config_fd < 0:
                    self._config_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                fcntl.ioctl(self.fd, h.VHOST_VDPA_SET_CONFIG_CALL, h.I32.pack(self._config_fd))
            self._start_irq_thread()
        os.eventfd_write(self._wake, 1)

    # -- interrupts -----------------------------------------------------------------------

    def _start_irq_thread(self) -> None:
        if self._irq_thread is None:
            self._irq_thread = threading.Thread(target=self._irq_loop, name="vhost-irq", daemon=True)
            self._irq_thread.start()

    def _irq_loop(self) -> None:
        while not self._closing:
            with self._lock:
                handlers: dict[int, Callable[[], None] | None] = {
                    vq.call_fd: vq.callback for vq in self.vqs if vq.call_fd >= 0
                }
                if self._config_fd >= 0:
                    handlers[self._config_fd] = self._config_callback
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            for fd in handlers:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                cb = handlers.get(fd)
                if cb is not None:
                    cb()

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the device (the kernel resets it), then free our memory and eventfds."""
        if self.fd < 0:
            return
        self._closing = True
        os.eventfd_write(self._wake, 1)
        if self._irq_thread is not None:
            self._irq_thread.join()
        os.close(self.fd)
        self.fd = -1
        for vq in self.vqs:
            for fd in (vq.kick_fd, vq.call_fd):
                if fd >= 0:
                    os.close(fd)
        for fd in (self._config_fd, self._wake):
            if fd >= 0:
                os.close(fd)
        self.iova.close()

    def __enter__(self) -> VhostVdpa:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
