"""Virtio core ABI: device status, transport feature bits and ring layouts (virtio 1.2).

Everything here is little-endian, as VERSION_1 requires; formats are precompiled so the
ring engine never parses a format string on the hot path.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag


class DeviceId(IntEnum):
    """Virtio device ids (``virtio_ids.h``) that VDUSE allows."""

    NET = 1
    BLOCK = 2
    FS = 26


class Status(IntFlag):
    """Device status byte written by the driver."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


# Transport and ring feature bit numbers.
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_NOTIF_CONFIG_DATA = 39
F_RING_RESET = 40
F_ADMIN_VQ = 41

TRANSPORT_F_START = 28
TRANSPORT_F_END = 42


def bit(n: int) -> int:
    """The feature mask for feature bit number ``n``."""
    return 1 << n


def has(features: int, n: int) -> bool:
    """Whether feature bit number ``n`` is set in ``features``."""
    return bool(features >> n & 1)


# Split ring descriptor flags.
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

# Packed ring descriptor flag bits (the header defines AVAIL/USED as shift counts).
VRING_PACKED_DESC_F_AVAIL = 7
VRING_PACKED_DESC_F_USED = 15
VRING_PACKED_EVENT_F_WRAP_CTR = 15
VRING_PACKED_EVENT_FLAG_ENABLE = 0
VRING_PACKED_EVENT_FLAG_DISABLE = 1
VRING_PACKED_EVENT_FLAG_DESC = 2

VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

# struct vring_desc {le64 addr; le32 len; le16 flags; le16 next;}
VRING_DESC = struct.Struct("<QIHH")
# struct vring_packed_desc {le64 addr; le32 len; le16 id; le16 flags;}
VRING_PACKED_DESC = struct.Struct("<QIHH")
# struct vring_used_elem {le32 id; le32 len;}
VRING_USED_ELEM = struct.Struct("<II")
# struct vring_packed_desc_event {le16 off_wrap; le16 flags;}
VRING_PACKED_DESC_EVENT = struct.Struct("<HH")
LE16 = struct.Struct("<H")

DESC_SIZE = 16
AVAIL_HEADER = 4  # flags, idx
USED_HEADER = 4  # flags, idx
USED_ELEM_SIZE = 8


def desc_table_size(num: int) -> int:
    """Bytes of a split ring's descriptor table."""
    return DESC_SIZE * num


def avail_ring_size(num: int, event_idx: bool = True) -> int:
    """Bytes of a split ring's avail ring, including ``used_event`` when negotiated."""
    return AVAIL_HEADER + 2 * num + (2 if event_idx else 0)


def used_ring_size(num: int, event_idx: bool = True) -> int:
    """Bytes of a split ring's used ring, including ``avail_event`` when negotiated."""
    return USED_HEADER + USED_ELEM_SIZE * num + (2 if event_idx else 0)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's vring_need_event(): has the index crossed ``event_idx`` going old -> new."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF
