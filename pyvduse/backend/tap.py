"""A TAP interface as a network backend: frames pass between the virtqueues and the TAP.

The TAP is opened with IFF_VNET_HDR and a 12-byte header (TUNSETVNETHDRSZ), so each frame
keeps the virtio-net header the driver wrote, offload requests and all: what the driver sends
is one ``writev`` of its own buffers, and a received frame is one ``readv`` straight into the
driver's receive buffers. TUNSETOFFLOAD tells the kernel which offloads the driver took, so
it hands over unsegmented TCP and partial checksums only when the driver can take them.

A TAP this backend creates is made persistent while it runs, so that a daemon killed with
``kill -9`` leaves it (and the addresses and routes on it) for the next daemon to reopen, and
is removed when the daemon stops (``close``). One we did not create is left as it was.
Frames pass as ``FrameFdBackend`` moves them (a thread of its own receives, the transmit
queue's worker sends), or the native data path takes the TAP's fd (``native_tap``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from pyvduse.abi import tun
from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import bit, has
from pyvduse.backend.frame_fd import FrameFdBackend

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
SYS_NET = Path("/sys/class/net")

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


class TapBackend(FrameFdBackend):
    """TAP interface ``ifname``, created if absent."""

    kind = "tap"

    def __init__(self, ifname: str, *, mtu: int | None = None, owned: bool = False) -> None:
        tun.encode_ifname(ifname)
        self.ifname = ifname
        flags = tun_flags(ifname)
        if interface_exists(ifname) and (flags is None or not flags & tun.IFF_TAP):
            raise TapError(
                errno.EINVAL, f"{ifname} exists and is not a TAP interface: choose another --tap name"
            )
        #: We made it (or a daemon of ours did, before a crash): removed on close.
        self.created = owned or not interface_exists(ifname)
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(
                errno.ENOENT, f"{TUN_DEVICE} does not exist: load the tun module (modprobe tun)"
            ) from None
        try:
            self._setup(fd, mtu)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, f"TAP {ifname}")

    def _setup(self, fd: int, mtu: int | None) -> None:
        name = self.ifname
        try:
            fcntl.ioctl(
                fd, tun.TUNSETIFF, tun.ifreq_flags(name, tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR)
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
        fcntl.ioctl(fd, tun.TUNSETVNETHDRSZ, vn.NET_HDR_V1_SIZE.to_bytes(4, "little"))
        self._guest_offloads = 0
        all_flags = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6 | tun.TUN_F_TSO_ECN
        with contextlib.suppress(OSError):  # a kernel that lacks some: no receive offloads
            fcntl.ioctl(fd, tun.TUNSETOFFLOAD, all_flags)
            self._guest_offloads = sum(bit(f) for f in GUEST_OFFLOADS)
        self._set_offload(fd, 0)
        if self.created:
            fcntl.ioctl(fd, tun.TUNSETPERSIST, 1)
        if mtu is not None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s.fileno(), tun.SIOCSIFMTU, tun.ifreq_int(name, mtu))

    def _set_offload(self, fd: int, flags: int) -> None:
        try:
            fcntl.ioctl(fd, tun.TUNSETOFFLOAD, flags)
        except OSError as e:
            log.warning("TAP %s: offloads 0x%x refused: %s", self.ifname, flags, e.strerror)

    def _negotiated(self, features: int) -> None:
        self._set_offload(self.fd, offload_flags(features))

    # -- NetBackend -----------------------------------------------------------------------

    def offloads(self) -> int:
        return HOST_OFFLOADS | self._guest_offloads

    def set_carrier(self, up: bool) -> None:
        try:
            fcntl.ioctl(self.fd, tun.TUNSETCARRIER, int(up).to_bytes(4, "little"))
        except OSError as e:  # older kernels (before 5.0) cannot
            log.info("TAP %s: carrier not changed: %s", self.ifname, e.strerror)

    def close(self) -> None:
        self.stop()
        if self.fd >= 0 and self.created:
            with contextlib.suppress(OSError):  # not persistent: gone once closed
                fcntl.ioctl(self.fd, tun.TUNSETPERSIST, 0)
        super().close()

    def keep(self) -> None:
        """Leave the TAP when closing (it stays persistent)."""
        self.created = False
