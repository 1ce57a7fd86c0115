"""vdpa generic-netlink ABI (``<linux/vdpa.h>``): family, commands and attributes.

A VDUSE device only becomes visible to drivers once it is added to the vdpa bus with
VDPA_CMD_DEV_NEW on this family; the client lives in
``pyvduse.transport.kernel.vdpa_netlink``.
"""

from __future__ import annotations

from enum import IntEnum

GENL_NAME = "vdpa"
GENL_VERSION = 1

# The management device VDUSE registers; it has no bus, so never send MGMTDEV_BUS_NAME.
VDUSE_MGMTDEV = "vduse"


class VdpaCmd(IntEnum):
    """``enum vdpa_command``."""

    UNSPEC = 0
    MGMTDEV_NEW = 1  # the cmd of MGMTDEV_GET replies
    MGMTDEV_GET = 2  # doit or dump
    DEV_NEW = 3  # admin: attach a device
    DEV_DEL = 4  # admin
    DEV_GET = 5  # doit or dump; replies carry cmd DEV_NEW
    DEV_CONFIG_GET = 6  # doit or dump
    DEV_VSTATS_GET = 7  # admin; VDUSE has no vendor stats
    DEV_ATTR_SET = 8  # admin; newer kernels, not for VDUSE


class VdpaAttr(IntEnum):
    """``enum vdpa_attr``.

    Values 0..20 are the same in every kernel since the family gained them. From 21 on the
    numbering depends on the kernel: 6.1 has VDPA_DEV_SUPPORTED_FEATURES at 21 (see
    ``ATTR_VDPA_DEV_SUPPORTED_FEATURES_6_1``), 6.2 removed it, and later kernels (including
    6.12) reuse 21..36 for the virtio-blk config attributes defined below. VDUSE needs
    none of those.
    """

    UNSPEC = 0  # also VDPA_ATTR_PAD
    MGMTDEV_BUS_NAME = 1  # string
    MGMTDEV_DEV_NAME = 2  # string
    MGMTDEV_SUPPORTED_CLASSES = 3  # u64: bitmask of virtio device ids
    DEV_NAME = 4  # string
    DEV_ID = 5  # u32: virtio device id
    DEV_VENDOR_ID = 6  # u32
    DEV_MAX_VQS = 7  # u32
    DEV_MAX_VQ_SIZE = 8  # u16
    DEV_MIN_VQ_SIZE = 9  # u16
    DEV_NET_CFG_MACADDR = 10  # binary, 6 bytes
    DEV_NET_STATUS = 11  # u8 in the header comment; the kernel puts a u16
    DEV_NET_CFG_MAX_VQP = 12  # u16
    DEV_NET_CFG_MTU = 13  # u16
    DEV_NEGOTIATED_FEATURES = 14  # u64
    DEV_MGMTDEV_MAX_VQS = 15  # u32
    DEV_SUPPORTED_FEATURES = 16  # u64
    DEV_QUEUE_INDEX = 17  # u32
    DEV_VENDOR_ATTR_NAME = 18  # string
    DEV_VENDOR_ATTR_VALUE = 19  # u64
    DEV_FEATURES = 20  # u64
    # --- version-dependent: the 6.12 (and newer) numbering, virtio-blk config attributes ---
    DEV_BLK_CFG_CAPACITY = 21  # u64
    DEV_BLK_CFG_SIZE_MAX = 22  # u32
    DEV_BLK_CFG_BLK_SIZE = 23  # u32
    DEV_BLK_CFG_SEG_MAX = 24  # u32
    DEV_BLK_CFG_NUM_QUEUES = 25  # u16
    DEV_BLK_CFG_PHY_BLK_EXP = 26  # u8
    DEV_BLK_CFG_ALIGN_OFFSET = 27  # u8
    DEV_BLK_CFG_MIN_IO_SIZE = 28  # u16
    DEV_BLK_CFG_OPT_IO_SIZE = 29  # u32
    DEV_BLK_CFG_MAX_DISCARD_SEC = 30  # u32
    DEV_BLK_CFG_MAX_DISCARD_SEG = 31  # u32
    DEV_BLK_CFG_DISCARD_SEC_ALIGN = 32  # u32
    DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC = 33  # u32
    DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG = 34  # u32
    DEV_BLK_READ_ONLY = 35  # u8
    DEV_BLK_FLUSH = 36  # u8


VDPA_ATTR_PAD = VdpaAttr.UNSPEC
# The last attribute whose number is the same on every kernel.
STABLE_ATTR_MAX = VdpaAttr.DEV_FEATURES
# Linux 6.1 only (Debian 12's linux-libc-dev): attribute 21, removed in 6.2.
ATTR_VDPA_DEV_SUPPORTED_FEATURES_6_1 = 21
