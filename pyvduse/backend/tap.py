"""A TAP interface as a network backend: frames pass between the virtqueues and the TAP.

The TAP is opened with IFF_VNET_HDR and a 12-byte header (TUNSETVNETHDRSZ), so each frame
keeps the virtio-net header the driver wrote, offload requests and all: what the driver sends
is one ``writev`` of its own buffers, and a received frame is one ``readv`` straight into the
driver's receive buffers. TUNSETOFFLOAD tells the kernel which offloads the driver took, so
it hands over unsegmented TCP and partial checksums only when the driver can take them.

A TAP this backend creates is made persistent while it runs, so that a daemon killed with
``kill -9`` leaves it (and the addresses and routes on it) for the next daemon to reopen, and
is removed when the daemon stops (``close``). One we did not create is left as it was.
Receiving runs on a thread of its own (``net-rx``); sending runs on the transmit queue's
worker.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import threading
import time
from pathlib import Path

from pyvduse.abi import tun
from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import bit, has
from pyvduse.backend.net_base import NetBackend, PacketPort, Received

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
SYS_NET = Path("/sys/class/net")
#: Frames received per wake-up before looking at the stop request again.
RX_BATCH = 64
IOV_MAX = 1024

#: Offloads a TAP always takes in what we write: the kernel checks the header and segments
#: or checksums for us (``virtio_net_hdr_to_skb``).
HOST_OFFLOADS = bit(vn.F_CSUM) | bit(vn.F_HOST_TSO4) | bit(vn.F_HOST_TSO6) | bit(vn.F_HOST_ECN)
#: The TUNSETOFFLOAD flag each receive-side feature needs.
GUEST_OFFLOADS = {
    vn.F_GUEST_CSUM: tun.TUN_F_CSUM,
    vn.F_GUEST_TSO4: tun.TUN_F_TSO4,
    vn.F_GUEST_TSO6: tun.TUN_F_TSO6,
    vn.F_GUEST_ECN: tun.TUN_F_TSO_ECN,
}


class TapError(OSError):
    """The TAP cannot be opened or set up; the message says what to do."""


def interface_exists(ifname: str) -> bool:
    return (SYS_NET / ifname).exists()


def tun_flags(ifname: str) -> int | None:
    """The flags of TUN/TAP interface ``ifname`` (sysfs), None if it is not one."""
    try:
        return int((SYS_NET / ifname / "tun_flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def offload_flags(features: int) -> int:
    """TUNSETOFFLOAD flags for the receive offloads the driver negotiated."""
    flags = 0
    if has(features, vn.F_GUEST_CSUM):  # segmentation needs checksum offload
        for feature, flag in GUEST_OFFLOADS.items():
            if has(features, feature):
                flags |= flag
    return flags


class TapBackend(NetBackend):
    """TAP interface ``ifname``, created if absent."""

    kind = "tap"

    def __init__(self, ifname: str, *, mtu: int | None = None, owned: bool = False) -> None:
        tun.encode_ifname(ifname)
        self.ifname = ifname
        self.description = f"TAP {ifname}"
        flags = tun_flags(ifname)
        if interface_exists(ifname) and (flags is None or not flags & tun.IFF_TAP):
            raise TapError(
                errno.EINVAL, f"{ifname} exists and is not a TAP interface: choose another --tap name"
            )
        #: We made it (or a daemon of ours did, before a crash): removed on close.
        self.created = owned or not interface_exists(ifname)
        try:
            self.fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(
                errno.ENOENT, f"{TUN_DEVICE} does not exist: load the tun module (modprobe tun)"
            ) from None
        try:
            self._setup(mtu)
        except BaseException:
            os.close(self.fd)
            raise
        self._port: PacketPort | None = None
        self._thread: threading.Thread | None = None
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._buffers_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self.read_errors = 0

    def _setup(self, mtu: int | None) -> None:
        name = self.ifname
        try:
            fcntl.ioctl(
                self.fd, tun.TUNSETIFF, tun.ifreq_flags(name, tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR)
            )
        except OSError as e:
            if e.errno == errno.EPERM:
                raise TapError(
                    e.errno,
                    f"opening TAP {name} needs CAP_NET_ADMIN (or a TAP owned by this user): run as root",
                ) from None
            if e.errno == errno.EBUSY:
                raise TapError(
                    e.errno, f"TAP {name} is in use by another program: choose another --tap name"
                ) from None
            if e.errno == errno.EINVAL:
                raise TapError(
                    e.errno,
                    f"{name} cannot be opened as a TAP (a multiqueue TAP, "
                    "or a TUN?): choose another --tap name",
                ) from None
            raise TapError(e.errno, f"cannot open TAP {name}: {e.strerror}") from None
        fcntl.ioctl(self.fd, tun.TUNSETVNETHDRSZ, vn.NET_HDR_V1_SIZE.to_bytes(4, "little"))
        self._guest_offloads = 0
        all_flags = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6 | tun.TUN_F_TSO_ECN
        with contextlib.suppress(OSError):  # a kernel that lacks some: no receive offloads
            fcntl.ioctl(self.fd, tun.TUNSETOFFLOAD, all_flags)
            self._guest_offloads = sum(bit(f) for f in GUEST_OFFLOADS)
        self._set_offload(0)
        if self.created:
            fcntl.ioctl(self.fd, tun.TUNSETPERSIST, 1)
        if mtu is not None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s.fileno(), tun.SIOCSIFMTU, tun.ifreq_int(name, mtu))

    def _set_offload(self, flags: int) -> None:
        try:
            fcntl.ioctl(self.fd, tun.TUNSETOFFLOAD, flags)
        except OSError as e:
            log.warning("TAP %s: offloads 0x%x refused: %s", self.ifname, flags, e.strerror)

    # -- NetBackend -----------------------------------------------------------------------

    def offloads(self) -> int:
        return HOST_OFFLOADS | self._guest_offloads

    def start(self, port: PacketPort, features: int) -> None:
        self.stop()
        self._set_offload(offload_flags(features))
        self._port = port
        port.on_buffers(self._buffers_came)
        self._stopping = False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._stop_fd)
        self._thread = threading.Thread(target=self._receive_loop, args=(port,), name="net-rx", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self._stopping = True
            os.eventfd_write(self._stop_fd, 1)
            thread.join()
            self._thread = None
        if self._port is not None:
            self._port.on_buffers(None)
            self._port = None

    def send(self, packet: list[memoryview]) -> None:
        if len(packet) > IOV_MAX:
            os.write(self.fd, b"".join(packet))
        else:
            os.writev(self.fd, packet)

    def set_carrier(self, up: bool) -> None:
        try:
            fcntl.ioctl(self.fd, tun.TUNSETCARRIER, int(up).to_bytes(4, "little"))
        except OSError as e:  # older kernels (before 5.0) cannot
            log.info("TAP %s: carrier not changed: %s", self.ifname, e.strerror)

    def close(self) -> None:
        self.stop()
        if self.fd < 0:
            return
        if self.created:
            with contextlib.suppress(OSError):  # not persistent: gone once closed
                fcntl.ioctl(self.fd, tun.TUNSETPERSIST, 0)
        os.close(self.fd)
        self.fd = -1
        for fd in (self._stop_fd, self._buffers_fd):
            os.close(fd)

    def keep(self) -> None:
        """Leave the TAP when closing (it stays persistent)."""
        self.created = False

    # -- the receive thread ------------------------------------------------------------------

    def _buffers_came(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._buffers_fd, 1)

    def _receive_loop(self, port: PacketPort) -> None:
        fd = self.fd

        def read(iov: list[memoryview]) -> int:
            return os.readv(fd, iov)

        for_packets = select.poll()
        for_packets.register(fd, select.POLLIN)
        for_packets.register(self._stop_fd, select.POLLIN)
        for_buffers = select.poll()
        for_buffers.register(self._buffers_fd, select.POLLIN)
        for_buffers.register(self._stop_fd, select.POLLIN)
        receive = port.receive
        PACKET, NO_BUFFERS = Received.PACKET, Received.NO_BUFFERS
        while not self._stopping:
            result = PACKET
            try:
                for _ in range(RX_BATCH):
                    result = receive(read)
                    if result is not PACKET:
                        break
            except OSError as e:  # the TAP went away, or a bug: say so, do not spin
                self.read_errors += 1
                if self.read_errors <= 10:
                    log.warning("TAP %s: read failed: %s", self.ifname, e.strerror or e)
                time.sleep(0.1)
                continue
            if result is PACKET:
                continue
            if result is NO_BUFFERS:
                waiting = port.expire(1.0)
                for_buffers.poll(1000 if waiting else None)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._buffers_fd)
            else:
                for_packets.poll()
