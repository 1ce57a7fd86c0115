"""The TUN/TAP character device ABI (``linux/if_tun.h``, ``linux/if.h``): ioctls and flags.

A TAP opened with IFF_VNET_HDR carries a virtio-net header before every frame, in both
directions; with TUNSETVNETHDRSZ 12 it is exactly virtio-net's v1 header (``virtio_net``
NET_HDR_V1), so packets pass between a virtqueue and the TAP without translation.
TUNSETOFFLOAD says which offloads *we* can take in what we read (partial checksums, TSO):
the kernel then hands us unsegmented packets instead of segmenting them first.
"""

from __future__ import annotations

import struct

from pyvduse.abi.vduse import ior, iow

_T = ord("T")
_INT = 4

TUNSETIFF = iow(_T, 202, _INT)
TUNSETPERSIST = iow(_T, 203, _INT)
TUNGETFEATURES = ior(_T, 207, _INT)
TUNSETOFFLOAD = iow(_T, 208, _INT)
TUNGETIFF = ior(_T, 210, _INT)
TUNSETVNETHDRSZ = iow(_T, 216, _INT)
TUNSETCARRIER = iow(_T, 226, _INT)

# ifr_flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFF_PERSIST = 0x0800
IFF_MULTI_QUEUE = 0x0100

# TUNSETOFFLOAD flags
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# Interface ioctls on any socket (``linux/sockios.h``), for the TAP's MTU and up flag.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFF_UP = 0x1

IFNAMSIZ = 16
#: ``struct ifreq``: the name, then a 24-byte union (flags: a short; mtu: an int).
IFREQ = struct.Struct("16s24s")


def ifreq_flags(name: str, flags: int) -> bytes:
    """An ifreq carrying ``ifr_flags``."""
    return IFREQ.pack(encode_ifname(name), struct.pack("<H", flags & 0xFFFF))


def ifreq_int(name: str, value: int) -> bytes:
    """An ifreq carrying an int (``ifr_mtu``)."""
    return IFREQ.pack(encode_ifname(name), struct.pack("<i", value))


def ifreq_unpack(raw: bytes) -> tuple[str, int]:
    """(name, the union's first int) of an ifreq the kernel filled in."""
    name, union = IFREQ.unpack(raw)
    return name.split(b"\0", 1)[0].decode(), int.from_bytes(union[:4], "little", signed=True)


def encode_ifname(name: str) -> bytes:
    """An interface name as the kernel takes it: 1 to 15 bytes, no '/', whitespace or ':'."""
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ or any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise ValueError(
            f"'{name}' cannot be an interface name: use 1 to {IFNAMSIZ - 1} "
            "characters without '/', ':' or spaces"
        )
    return raw
