"""virtio-blk ABI (device id 2): feature bits, config space, request header and status."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

# Feature bit numbers.
F_BARRIER = 0
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_SCSI = 7
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11  # refused by VDUSE: config space is read-only for the driver
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14
F_LIFETIME = 15
F_SECURE_ERASE = 16
F_ZONED = 17


class ReqType(IntEnum):
    """``virtio_blk_outhdr.type`` values."""

    IN = 0
    OUT = 1
    SCSI_CMD = 2
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14
    ZONE_APPEND = 15
    ZONE_REPORT = 16
    ZONE_OPEN = 18
    ZONE_CLOSE = 20
    ZONE_FINISH = 22
    ZONE_RESET = 24
    ZONE_RESET_ALL = 26


T_BARRIER = 0x80000000


class ReqStatus(IntEnum):
    """The one-byte status the device writes last."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
    ZONE_INVALID_CMD = 3
    ZONE_UNALIGNED_WP = 4
    ZONE_OPEN_RESOURCE = 5
    ZONE_ACTIVE_RESOURCE = 6


WRITE_ZEROES_FLAG_UNMAP = 1

# struct virtio_blk_outhdr {le32 type; le32 ioprio; le64 sector;}
OUTHDR = struct.Struct("<IIQ")
# struct virtio_blk_discard_write_zeroes {le64 sector; le32 num_sectors; le32 flags;}
DISCARD_SEGMENT = struct.Struct("<QII")

# struct virtio_blk_config, as in Linux 6.12 (96 bytes, packed).
CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3xIIIIIIIIB3x")
CONFIG_SIZE = CONFIG.size  # 96
# The layout up to and including the secure-erase fields (Linux <= 6.2 headers).
CONFIG_SIZE_NO_ZONED = 72


@dataclass
class BlkConfig:
    """``struct virtio_blk_config``; fields are meaningful only when their feature is offered."""

    capacity: int = 0  # in 512-byte sectors, whatever blk_size is
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    wce: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0
    zone_sectors: int = 0
    max_open_zones: int = 0
    max_active_zones: int = 0
    max_append_sectors: int = 0
    write_granularity: int = 0
    zoned_model: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            self.cylinders,
            self.heads,
            self.sectors,
            self.blk_size,
            self.physical_block_exp,
            self.alignment_offset,
            self.min_io_size,
            self.opt_io_size,
            self.wce,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
            self.max_secure_erase_sectors,
            self.max_secure_erase_seg,
            self.secure_erase_sector_alignment,
            self.zone_sectors,
            self.max_open_zones,
            self.max_active_zones,
            self.max_append_sectors,
            self.write_granularity,
            self.zoned_model,
        )

    @classmethod
    def unpack(cls, data: bytes) -> BlkConfig:
        return cls(*CONFIG.unpack(bytes(data[: CONFIG.size]).ljust(CONFIG.size, b"\0")))


CAPACITY_OFFSET = 0  # le64 capacity is the first field


#: What ``ctl stats`` and the metrics call each request type.
_REQ_NAMES: dict[int, str] = {
    ReqType.IN: "read",
    ReqType.OUT: "write",
    ReqType.FLUSH: "flush",
    ReqType.GET_ID: "get_id",
    ReqType.DISCARD: "discard",
    ReqType.WRITE_ZEROES: "write_zeroes",
}


def request_type_name(rtype: int) -> str:
    """A request type's short name ("read", "write", ...; ``type_N`` for unknown ones)."""
    name = _REQ_NAMES.get(rtype)
    if name is not None:
        return name
    try:
        return str(ReqType(rtype).name).lower()
    except ValueError:
        return f"type_{rtype}"
