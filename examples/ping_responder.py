"""A network device written in Python: it answers ARP and ping for every IPv4 address.

There is no TAP and no network behind it: whatever the driver sends is parsed here, and an
ARP request or an ICMP echo request gets its reply, built in Python and received by the
driver. Serve it on the real kernel (vduse, virtio_vdpa and virtio_net loaded):

    python3 examples/ping_responder.py --name pong0     # prints READY name=pong0 ifname=eth0
    ip addr add 10.9.0.1/24 dev eth0 && ip link set eth0 up && ping 10.9.0.2

or drive it in-process through the model, as tests/unit/test_example_responder.py does.
"""

from __future__ import annotations

import argparse
import struct
import sys

from pyvduse import NetDevice, NetOptions, PacketQueueBackend
from pyvduse.abi import virtio_net as vn

ETH = struct.Struct("!6s6sH")
ARP = struct.Struct("!HHBBH6s4s6s4s")
ETH_ARP, ETH_IP = 0x0806, 0x0800
#: The MAC address the replies come from (locally administered).
RESPONDER_MAC = bytes.fromhex("020000c0ffee")
HEADER = bytes(vn.NET_HDR_V1_SIZE)  # no offloads: a zero header


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)


def reply_to(frame: bytes) -> bytes | None:
    """The reply to an ARP request or a ping, or None."""
    if len(frame) < ETH.size:
        return None
    _dst, src, ethertype = ETH.unpack_from(frame)
    body = frame[ETH.size :]
    if ethertype == ETH_ARP and len(body) >= ARP.size:
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = ARP.unpack_from(body)
        if op != 1 or spa == tpa:  # a request, and not a probe for the sender's own address
            return None
        arp = ARP.pack(htype, ptype, hlen, plen, 2, RESPONDER_MAC, tpa, sha, spa)
        return ETH.pack(src, RESPONDER_MAC, ETH_ARP) + arp
    if ethertype == ETH_IP and len(body) >= 28 and body[9] == 1:  # ICMP
        ihl = (body[0] & 0xF) * 4
        icmp = bytearray(body[ihl : struct.unpack_from("!H", body, 2)[0]])
        if len(icmp) < 8 or icmp[0] != 8:  # echo request
            return None
        icmp[0] = 0  # echo reply
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
        ip = bytearray(body[:ihl])
        ip[12:16], ip[16:20] = body[16:20], body[12:16]  # swap addresses
        ip[10:12] = b"\0\0"
        ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
        return ETH.pack(src, RESPONDER_MAC, ETH_IP) + bytes(ip) + bytes(icmp)
    return None


class Responder(PacketQueueBackend):
    """Frames the driver sends are answered here instead of going anywhere."""

    description = "ARP and ping responder"

    def __init__(self) -> None:
        super().__init__(offloads=0)  # checksums arrive complete: no offloads to honour
        self.answered = 0

    def send(self, packet: list[memoryview]) -> None:
        reply = reply_to(b"".join(packet)[vn.NET_HDR_V1_SIZE :])
        if reply is not None:
            self.answered += 1
            self.inject(HEADER + reply)


def main() -> int:
    from pyvduse import PyvduseError, serve_device

    ap = argparse.ArgumentParser(description="a network device that answers ARP and ping")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    try:
        return serve_device(args.name, NetDevice(Responder(), NetOptions()))
    except PyvduseError as e:  # no vduse module, no CAP_NET_ADMIN: one line, what to do
        print(f"ping_responder: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
