"""vhost and vhost-vdpa user-space ABI (``<linux/vhost.h>``, ``<linux/vhost_types.h>``).

What a driver of ``/dev/vhost-vdpa-N`` speaks: the vhost ioctls (owner, features, vring
setup), the vhost-vdpa ioctls (status, config space, vring enable, IOVA range) and the IOTLB
messages it ``write()``s to map its memory (``struct vhost_msg`` / ``vhost_msg_v2``).

Layouts are x86_64 little-endian with the C padding spelled out, so each ``struct.Struct``
has exactly the size ``sizeof`` reports; the unit tests pin the numbers and cross-check them
against the installed C header. The definitions marked 6.x arrived after the 6.1 headers a
Debian 12 build machine has; they are checked by their literal values only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pyvduse.abi.vduse import io, ior, iow, iowr

VHOST_VIRTIO = 0xAF
VHOST_FILE_UNBIND = -1  # a vring_file fd that removes the eventfd

VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3

VHOST_IOTLB_MSG = 0x1  # struct vhost_msg (v1)
VHOST_IOTLB_MSG_V2 = 0x2  # struct vhost_msg_v2: needs BackendFeature.IOTLB_MSG_V2


class IotlbType(IntEnum):
    """``vhost_iotlb_msg.type``: what an IOTLB message asks for."""

    MISS = 1  # device to driver, vhost-net only
    UPDATE = 2  # map [iova, iova+size) to uaddr
    INVALIDATE = 3  # unmap [iova, iova+size)
    ACCESS_FAIL = 4  # device to driver, vhost-net only
    BATCH_BEGIN = 5  # needs BackendFeature.IOTLB_BATCH: apply the map once, at BATCH_END
    BATCH_END = 6


class BackendFeature(IntEnum):
    """``VHOST_BACKEND_F_*`` bit numbers (VHOST_GET/SET_BACKEND_FEATURES)."""

    IOTLB_MSG_V2 = 0x1
    IOTLB_BATCH = 0x2
    IOTLB_ASID = 0x3
    SUSPEND = 0x4
    RESUME = 0x5  # 6.x
    ENABLE_AFTER_DRIVER_OK = 0x6  # 6.x
    DESC_ASID = 0x7  # 6.x
    IOTLB_PERSIST = 0x8  # 6.x


# --------------------------------------------------------------------------------------
# Struct layouts
# --------------------------------------------------------------------------------------

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
I32 = struct.Struct("<i")
U64 = struct.Struct("<Q")

# struct vhost_vring_state {unsigned int index; unsigned int num;}
VRING_STATE = struct.Struct("<II")
# struct vhost_vring_file {unsigned int index; int fd;}
VRING_FILE = struct.Struct("<Ii")
# struct vhost_vring_addr {unsigned index, flags; u64 desc_user_addr, used_user_addr,
#                          avail_user_addr, log_guest_addr;}  -- note: used before avail
VRING_ADDR = struct.Struct("<IIQQQQ")
# struct vhost_iotlb_msg {u64 iova, size, uaddr; u8 perm, type; 6 bytes padding}
IOTLB_MSG = struct.Struct("<QQQBB6x")
# struct vhost_msg {int type; 4 bytes padding; union {iotlb; u8 padding[64]};}
MSG_V1 = struct.Struct("<i4x64s")
# struct vhost_msg_v2 {u32 type; u32 asid; union {iotlb; u8 padding[64]};}
MSG_V2 = struct.Struct("<II64s")
MSG_SIZE = 72  # both versions
# struct vhost_vdpa_config {u32 off; u32 len; u8 buf[];}
VDPA_CONFIG_HEADER = struct.Struct("<II")
# struct vhost_vdpa_iova_range {u64 first, last;}
VDPA_IOVA_RANGE = struct.Struct("<QQ")
# struct vhost_memory (the header only; vhost-vdpa does not take a memory table)
MEMORY_HEADER = struct.Struct("<II")


# --------------------------------------------------------------------------------------
# ioctl request numbers
# --------------------------------------------------------------------------------------

VHOST_GET_FEATURES = ior(VHOST_VIRTIO, 0x00, U64.size)
VHOST_SET_FEATURES = iow(VHOST_VIRTIO, 0x00, U64.size)
VHOST_SET_OWNER = io(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = io(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = iow(VHOST_VIRTIO, 0x03, MEMORY_HEADER.size)  # refused by vhost-vdpa
VHOST_SET_LOG_BASE = iow(VHOST_VIRTIO, 0x04, U64.size)
VHOST_SET_LOG_FD = iow(VHOST_VIRTIO, 0x07, I32.size)
VHOST_SET_VRING_NUM = iow(VHOST_VIRTIO, 0x10, VRING_STATE.size)
VHOST_SET_VRING_ADDR = iow(VHOST_VIRTIO, 0x11, VRING_ADDR.size)
VHOST_SET_VRING_BASE = iow(VHOST_VIRTIO, 0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE = iowr(VHOST_VIRTIO, 0x12, VRING_STATE.size)
VHOST_SET_VRING_KICK = iow(VHOST_VIRTIO, 0x20, VRING_FILE.size)
VHOST_SET_VRING_CALL = iow(VHOST_VIRTIO, 0x21, VRING_FILE.size)
VHOST_SET_VRING_ERR = iow(VHOST_VIRTIO, 0x22, VRING_FILE.size)
VHOST_SET_BACKEND_FEATURES = iow(VHOST_VIRTIO, 0x25, U64.size)
VHOST_GET_BACKEND_FEATURES = ior(VHOST_VIRTIO, 0x26, U64.size)

VHOST_VDPA_GET_DEVICE_ID = ior(VHOST_VIRTIO, 0x70, U32.size)
VHOST_VDPA_GET_STATUS = ior(VHOST_VIRTIO, 0x71, U8.size)
VHOST_VDPA_SET_STATUS = iow(VHOST_VIRTIO, 0x72, U8.size)
VHOST_VDPA_GET_CONFIG = ior(VHOST_VIRTIO, 0x73, VDPA_CONFIG_HEADER.size)
VHOST_VDPA_SET_CONFIG = iow(VHOST_VIRTIO, 0x74, VDPA_CONFIG_HEADER.size)
VHOST_VDPA_SET_VRING_ENABLE = iow(VHOST_VIRTIO, 0x75, VRING_STATE.size)
VHOST_VDPA_GET_VRING_NUM = ior(VHOST_VIRTIO, 0x76, U16.size)
VHOST_VDPA_SET_CONFIG_CALL = iow(VHOST_VIRTIO, 0x77, I32.size)
VHOST_VDPA_GET_IOVA_RANGE = ior(VHOST_VIRTIO, 0x78, VDPA_IOVA_RANGE.size)
VHOST_VDPA_GET_CONFIG_SIZE = ior(VHOST_VIRTIO, 0x79, U32.size)
VHOST_VDPA_GET_AS_NUM = ior(VHOST_VIRTIO, 0x7A, U32.size)
VHOST_VDPA_GET_VRING_GROUP = iowr(VHOST_VIRTIO, 0x7B, VRING_STATE.size)
VHOST_VDPA_SET_GROUP_ASID = iow(VHOST_VIRTIO, 0x7C, VRING_STATE.size)
VHOST_VDPA_SUSPEND = io(VHOST_VIRTIO, 0x7D)
VHOST_VDPA_RESUME = io(VHOST_VIRTIO, 0x7E)  # 6.x
VHOST_VDPA_GET_VRING_DESC_GROUP = iowr(VHOST_VIRTIO, 0x7F, VRING_STATE.size)  # 6.x
VHOST_VDPA_GET_VQS_COUNT = ior(VHOST_VIRTIO, 0x80, U32.size)
VHOST_VDPA_GET_GROUP_NUM = ior(VHOST_VIRTIO, 0x81, U32.size)
VHOST_VDPA_GET_VRING_SIZE = iowr(VHOST_VIRTIO, 0x82, VRING_STATE.size)  # 6.x


# --------------------------------------------------------------------------------------
# Typed views
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``: where a queue's three areas are, as IOVAs (vhost-vdpa
    takes the driver's IOVAs here, not user addresses)."""

    index: int
    desc: int
    avail: int  # the driver area (packed: the driver event suppression area)
    used: int  # the device area (packed: the device event suppression area)
    flags: int = 0
    log: int = 0

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, buf: bytes) -> VringAddr:
        index, flags, desc, used, avail, log = VRING_ADDR.unpack_from(buf)
        return cls(index, desc, avail, used, flags, log)


@dataclass(frozen=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg``: one IOTLB change (or a batch marker)."""

    type: int
    iova: int = 0
    size: int = 0
    uaddr: int = 0
    perm: int = 0

    def pack(self) -> bytes:
        return IOTLB_MSG.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def unpack(cls, buf: bytes) -> IotlbMsg:
        iova, size, uaddr, perm, type_ = IOTLB_MSG.unpack_from(buf)
        return cls(type_, iova, size, uaddr, perm)

    def message(self, v2: bool, asid: int = 0) -> bytes:
        """The 72 bytes to ``write()`` to the vhost fd: ``vhost_msg_v2`` (with ``asid``,
        read only when IOTLB_ASID is negotiated) or the v1 ``vhost_msg``."""
        body = self.pack().ljust(64, b"\0")
        if v2:
            return MSG_V2.pack(VHOST_IOTLB_MSG_V2, asid, body)
        if asid:
            raise ValueError("a v1 IOTLB message has no address space id")
        return MSG_V1.pack(VHOST_IOTLB_MSG, body)

    @classmethod
    def parse(cls, buf: bytes) -> tuple[int, int, IotlbMsg]:
        """(message version, asid, message) of a 72-byte ``vhost_msg``/``vhost_msg_v2``."""
        (kind,) = U32.unpack_from(buf)
        if kind == VHOST_IOTLB_MSG_V2:
            _, asid, body = MSG_V2.unpack(buf[:MSG_SIZE])
            return kind, asid, cls.unpack(body)
        if kind == VHOST_IOTLB_MSG:
            _, body = MSG_V1.unpack(buf[:MSG_SIZE])
            return kind, 0, cls.unpack(body)
        raise ValueError(f"unknown vhost message type {kind}")


def packed_base(avail_wrap: int, avail_idx: int, used_wrap: int, used_idx: int) -> int:
    """The ``num`` of VHOST_SET/GET_VRING_BASE for a packed ring: the last avail index with
    its wrap counter in bit 15, and the last used index likewise in the high 16 bits."""
    for value, what in ((avail_idx, "avail index"), (used_idx, "used index")):
        if not 0 <= value < 0x8000:
            raise ValueError(f"packed {what} {value} does not fit in 15 bits")
    return (avail_idx | (avail_wrap & 1) << 15) | (used_idx | (used_wrap & 1) << 15) << 16


def unpack_packed_base(num: int) -> tuple[int, int, int, int]:
    """``(avail_wrap, avail_idx, used_wrap, used_idx)`` from a packed ring's vring base."""
    avail, used = num & 0xFFFF, num >> 16 & 0xFFFF
    return avail >> 15, avail & 0x7FFF, used >> 15, used & 0x7FFF


def config_request(offset: int, length: int) -> bytearray:
    """The argument of VHOST_VDPA_GET_CONFIG: the header and room for ``length`` bytes."""
    return bytearray(VDPA_CONFIG_HEADER.pack(offset, length) + bytes(length))
