"""virtio-net ABI (device id 1): feature bits, config space and the per-packet header.

VDUSE allows net devices from Linux 6.10 on, but refuses VIRTIO_NET_F_CTRL_VQ, so a VDUSE
net device is one RX/TX queue pair and must not offer any feature that needs the control
queue (``CVQ_DEPENDENT_FEATURES``): the Linux driver fails probe when it sees one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Feature bit numbers.
F_CSUM = 0
F_GUEST_CSUM = 1
F_CTRL_GUEST_OFFLOADS = 2  # needs CTRL_VQ
F_MTU = 3
F_MAC = 5
F_GSO = 6  # legacy
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17  # refused by VDUSE
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_CTRL_RX_EXTRA = 20
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23
F_DEVICE_STATS = 50
F_VQ_NOTF_COAL = 52
F_NOTF_COAL = 53
F_GUEST_USO4 = 54
F_GUEST_USO6 = 55
F_HOST_USO = 56
F_HASH_REPORT = 57
F_GUEST_HDRLEN = 59
F_RSS = 60
F_RSC_EXT = 61
F_STANDBY = 62
F_SPEED_DUPLEX = 63
# Newest kernels only. They lie above bit 63 and so cannot be expressed in VDUSE's u64
# ``features``; listed for completeness.
F_RSS_CONTEXT = 64
F_GUEST_UDP_TUNNEL_GSO = 65
F_GUEST_UDP_TUNNEL_GSO_CSUM = 66
F_HOST_UDP_TUNNEL_GSO = 67
F_HOST_UDP_TUNNEL_GSO_CSUM = 68

# Features that only work with a control virtqueue. VDUSE refuses CTRL_VQ, so none of these
# can be offered: the Linux driver fails probe on the first nine, and the spec makes the rest
# depend on CTRL_VQ too.
CVQ_DEPENDENT_FEATURES: frozenset[int] = frozenset(
    {
        F_CTRL_RX,
        F_CTRL_VLAN,
        F_GUEST_ANNOUNCE,
        F_MQ,
        F_CTRL_MAC_ADDR,
        F_RSS,
        F_HASH_REPORT,
        F_NOTF_COAL,
        F_VQ_NOTF_COAL,
        F_CTRL_RX_EXTRA,
        F_CTRL_GUEST_OFFLOADS,
        F_DEVICE_STATS,
    }
)
# Everything a VDUSE net device must not offer: CTRL_VQ itself and what depends on it.
VDUSE_REFUSED_FEATURES: frozenset[int] = CVQ_DEPENDENT_FEATURES | {F_CTRL_VQ}
VDUSE_REFUSED_MASK = sum(1 << b for b in VDUSE_REFUSED_FEATURES)

# Queue layout without MQ/CVQ.
RX_QUEUE = 0
TX_QUEUE = 1
NUM_QUEUES = 2

# config.status bits.
S_LINK_UP = 1
S_ANNOUNCE = 2

# config.duplex / config.speed special values (from ethtool.h).
DUPLEX_HALF = 0
DUPLEX_FULL = 1
DUPLEX_UNKNOWN = 0xFF
SPEED_UNKNOWN = 0xFFFFFFFF  # (u32)-1

MIN_MTU = 68

# struct virtio_net_config (packed, 24 bytes): mac, status, max_virtqueue_pairs, mtu,
# speed, duplex, rss_max_key_size, rss_max_indirection_table_length, supported_hash_types.
CONFIG = struct.Struct("<6sHHHIBBHI")
CONFIG_SIZE = CONFIG.size  # 24
# Field offsets, for partial VDUSE_DEV_SET_CONFIG updates.
MAC_OFFSET = 0
STATUS_OFFSET = 6
MAX_VIRTQUEUE_PAIRS_OFFSET = 8
MTU_OFFSET = 10
SPEED_OFFSET = 12
DUPLEX_OFFSET = 16

MAC_LEN = 6


@dataclass
class NetConfig:
    """``struct virtio_net_config``; fields are meaningful only when their feature is offered."""

    mac: bytes = bytes(MAC_LEN)
    status: int = 0
    max_virtqueue_pairs: int = 0
    mtu: int = 0
    speed: int = 0
    duplex: int = 0
    rss_max_key_size: int = 0
    rss_max_indirection_table_length: int = 0
    supported_hash_types: int = 0

    def pack(self) -> bytes:
        """Encode the 24 config bytes; a MAC of the wrong length is an error, not padding."""
        if len(self.mac) != MAC_LEN:
            raise ValueError(f"MAC address must be {MAC_LEN} bytes, got {len(self.mac)}")
        return CONFIG.pack(
            bytes(self.mac),
            self.status,
            self.max_virtqueue_pairs,
            self.mtu,
            self.speed,
            self.duplex,
            self.rss_max_key_size,
            self.rss_max_indirection_table_length,
            self.supported_hash_types,
        )

    @classmethod
    def unpack(cls, data: bytes) -> NetConfig:
        """Decode; a short buffer reads as zero-filled, like config bytes past config_size."""
        return cls(*CONFIG.unpack(bytes(data[: CONFIG.size]).ljust(CONFIG.size, b"\0")))


# Per-packet header. With VERSION_1 (mandatory for VDUSE net) it is always
# struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
# num_buffers.
NET_HDR_V1 = struct.Struct("<BBHHHHH")
NET_HDR_V1_SIZE = NET_HDR_V1.size  # 12
# Legacy header without num_buffers (not usable with VDUSE, listed for completeness).
NET_HDR_LEGACY = struct.Struct("<BBHHHH")
# virtio_net_hdr_v1_hash: v1 header + le32 hash_value + le16 hash_report + le16 padding.
# HASH_REPORT needs the control queue, so this is for completeness only.
NET_HDR_V1_HASH = struct.Struct("<BBHHHHHIHH")

# virtio_net_hdr.flags
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4
HDR_F_UDP_TUNNEL_CSUM = 8  # newest kernels

# virtio_net_hdr.gso_type
HDR_GSO_NONE = 0
HDR_GSO_TCPV4 = 1
HDR_GSO_UDP = 3
HDR_GSO_TCPV6 = 4
HDR_GSO_UDP_L4 = 5
HDR_GSO_UDP_TUNNEL_IPV4 = 0x20  # newest kernels
HDR_GSO_UDP_TUNNEL_IPV6 = 0x40  # newest kernels
HDR_GSO_ECN = 0x80

# Control-queue acknowledgement values (unusable with VDUSE; for completeness).
CTRL_OK = 0
CTRL_ERR = 1
