"""What a network device's packets go to and come from: the ``NetBackend`` interface.

A virtio-net device sends every frame the driver transmits to its backend (``send``), and
the backend hands it the frames it receives through a ``PacketPort`` (the device's receive
queue): either by reading them straight into the driver's receive buffers (``receive`` with
a read function, as a TAP's ``readv`` does) or by copying bytes in (``deliver``). Every
frame, both ways, starts with virtio-net's 12-byte v1 header (``virtio_net.NET_HDR_V1``),
which is also what a TAP opened with IFF_VNET_HDR reads and writes.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol


class Received(enum.Enum):
    """What ``PacketPort.receive`` did."""

    PACKET = "packet"  # a packet was read (delivered, or dropped if it could not fit)
    NO_PACKET = "no-packet"  # the read function had none (it raised BlockingIOError)
    NO_BUFFERS = "no-buffers"  # the driver has given no buffer to read into: nothing read


#: Reads one packet (header + frame) into the buffers given, in order, and returns its
#: length; raises BlockingIOError when there is none.
ReadPacket = Callable[[list[memoryview]], int]


class PacketPort(Protocol):
    """The receive side of a network device, as its backend sees it (any thread)."""

    def receive(self, read: ReadPacket) -> Received:
        """Have ``read`` store one packet in the driver's receive buffers."""
        ...

    def deliver(self, packet: bytes | memoryview) -> bool:
        """Copy one packet (header + frame) in; False when there is no buffer for it now."""
        ...

    def on_buffers(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (from the device's thread) when buffers come after
        ``receive`` or ``deliver`` found none; it must not block."""
        ...

    def expire(self, older_than: float) -> bool:
        """Drop a packet that has waited for buffers longer than ``older_than`` seconds;
        True if there is still one waiting."""
        ...


class NetBackend(ABC):
    """Where a virtio-net device's frames go: a TAP, a socket, a Python program."""

    #: Says what the backend is, for logs and ``status``.
    description = "network backend"
    kind = "net"

    def offloads(self) -> int:
        """The virtio-net offload features (CSUM, GUEST_CSUM, HOST_TSO4, ...) the backend can
        carry: frames it can take with partial checksums or unsegmented (HOST_*, CSUM), and
        frames it can give that way (GUEST_*). None by default: plain frames only."""
        return 0

    @abstractmethod
    def start(self, port: PacketPort, features: int) -> None:
        """The driver is ready with ``features`` negotiated: start delivering received
        frames to ``port`` (offloads the driver did not take must not be used)."""

    @abstractmethod
    def stop(self) -> None:
        """The driver reset the device or the daemon stops: after this returns, ``port`` is
        not used any more (until the next ``start``)."""

    @abstractmethod
    def send(self, packet: list[memoryview]) -> None:
        """Transmit one frame (header + frame, in segments); raise OSError to drop it."""

    def native_tap(self) -> int | None:
        """The fd of a TAP opened with IFF_VNET_HDR and a 12-byte header (non-blocking) that
        a native data path may read frames from and write frames to itself, instead of
        calling ``send`` and waiting for ``start``'s port to be fed; None (the default):
        frames go through this object."""
        return None

    def set_carrier(self, up: bool) -> None:
        """The device's link went up or down (``ctl link``): the backend may show it too."""

    def close(self) -> None:
        """The daemon is done with the backend."""
