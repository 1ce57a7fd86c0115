"""Typed calls on a VDUSE device fd (``/dev/vduse/NAME``): one method per ioctl or message.

Arguments are always passed as mutable buffers: ``fcntl.ioctl`` then hands the kernel a
pointer to our memory (no 1024-byte copy limit) and returns the ioctl's integer result.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from pyvduse.abi import vduse as v

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def device_in_use(path: str) -> bool:
    """Whether a process holds a VDUSE device open (the kernel allows only one open)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return e.errno == errno.EBUSY
    os.close(fd)
    return False


class DeviceFd:
    """An open ``/dev/vduse/NAME`` of a device created with VDUSE API ``api_version``
    (the kernel keeps it per device: API 1 takes the ASID-tagged IOTLB calls)."""

    def __init__(self, fd: int, api_version: int = v.VDUSE_API_VERSION) -> None:
        self.fd = fd
        self.api_version = api_version
        self._irq_args: dict[int, bytearray] = {}

    @classmethod
    def open(cls, path: str, api_version: int = v.VDUSE_API_VERSION) -> DeviceFd:
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC), api_version)

    def probe_api_version(self) -> int:
        """The API version the device was created with, asked of the kernel (for a daemon
        taking over a device it did not create): VDUSE_IOTLB_GET_FD2 with an empty range is
        EINVAL on an API-1 device, ENOTTY on an API-0 one (and on kernels before 7.x)."""
        try:
            fcntl.ioctl(self.fd, v.VDUSE_IOTLB_GET_FD2, bytearray(v.IotlbEntryV2(0, 1, 0, 0, 0).pack()))
        except OSError as e:
            if e.errno == errno.EINVAL:
                return v.VDUSE_API_VERSION_1
            if e.errno == errno.ENOTTY:
                return v.VDUSE_API_VERSION
            raise
        raise OSError(errno.EPROTO, "VDUSE_IOTLB_GET_FD2 accepted an empty range")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- ioctls -------------------------------------------------------------------------

    def vq_setup(self, index: int, max_size: int, group: int = 0) -> None:
        fcntl.ioctl(self.fd, v.VDUSE_VQ_SETUP, bytearray(v.VqConfig(index, max_size, group).pack()))

    def vq_get_info(self, index: int) -> v.VqInfo:
        buf = bytearray(v.VqInfo.query(index))
        fcntl.ioctl(self.fd, v.VDUSE_VQ_GET_INFO, buf)
        return v.VqInfo.unpack(bytes(buf))

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        fcntl.ioctl(self.fd, v.VDUSE_VQ_SETUP_KICKFD, bytearray(v.VqEventfd(index, fd).pack()))

    def vq_inject_irq(self, index: int) -> None:
        arg = self._irq_args.get(index)
        if arg is None:
            arg = self._irq_args[index] = bytearray(_U32.pack(index))
        fcntl.ioctl(self.fd, v.VDUSE_VQ_INJECT_IRQ, arg)

    def get_features(self) -> int:
        buf = bytearray(8)
        fcntl.ioctl(self.fd, v.VDUSE_DEV_GET_FEATURES, buf)
        return int(_U64.unpack(buf)[0])

    def set_config(self, offset: int, data: bytes) -> None:
        fcntl.ioctl(self.fd, v.VDUSE_DEV_SET_CONFIG, bytearray(v.config_data(offset, data)))

    def inject_config_irq(self) -> None:
        fcntl.ioctl(self.fd, v.VDUSE_DEV_INJECT_CONFIG_IRQ, 0)

    def iotlb_get_fd(self, start: int, last: int, asid: int = 0) -> tuple[v.IotlbEntry, int]:
        """The IOTLB region overlapping ``[start, last]`` in address space ``asid`` and a new
        fd for its memory (API 1: VDUSE_IOTLB_GET_FD2; API 0: GET_FD, one space only)."""
        if self.api_version >= v.VDUSE_API_VERSION_1:
            buf = bytearray(v.IotlbEntryV2(0, start, last, 0, asid).pack())
            fd = fcntl.ioctl(self.fd, v.VDUSE_IOTLB_GET_FD2, buf)
            return v.IotlbEntryV2.unpack(bytes(buf)).entry, fd
        if asid:
            raise ValueError(f"address space {asid} on an API-0 device (it has only 0)")
        buf = bytearray(v.IotlbEntry(0, start, last, 0).pack())
        fd = fcntl.ioctl(self.fd, v.VDUSE_IOTLB_GET_FD, buf)
        return v.IotlbEntry.unpack(bytes(buf)), fd

    def iotlb_get_info(self, start: int, last: int) -> v.IovaInfo:
        """The IOTLB region overlapping ``[start, last]`` and what it can do (6.0+)."""
        buf = bytearray(v.IovaInfo(start, last, 0).pack())
        fcntl.ioctl(self.fd, v.VDUSE_IOTLB_GET_INFO, buf)
        return v.IovaInfo.unpack(bytes(buf))

    def reg_umem(self, uaddr: int, iova: int, size: int) -> None:
        """Back the IOVA range (the bounce buffer) with our memory at ``uaddr`` (6.0+)."""
        fcntl.ioctl(self.fd, v.VDUSE_IOTLB_REG_UMEM, bytearray(v.IovaUmem(uaddr, iova, size).pack()))

    def dereg_umem(self, iova: int, size: int) -> None:
        fcntl.ioctl(self.fd, v.VDUSE_IOTLB_DEREG_UMEM, bytearray(v.IovaUmem(0, iova, size).pack()))

    # -- messages -----------------------------------------------------------------------

    def read_request(self) -> v.Request:
        return v.Request.unpack(os.read(self.fd, v.MESSAGE_SIZE))

    def write_response(self, response: bytes) -> None:
        os.write(self.fd, response)
