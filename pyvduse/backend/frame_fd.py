"""A network backend whose frames are the messages of one file descriptor.

Each ``read`` of the fd gives one frame and each ``write`` sends one, the virtio-net v1
header first: a TAP opened with IFF_VNET_HDR and a 12-byte header (``TapBackend``), or one
end of a ``SOCK_SEQPACKET`` socket pair (``pyvduse.testing.FramePipe``). What the driver
sends is one ``writev`` of its own buffers, and a received frame is one ``readv`` straight
into the driver's receive buffers. The fd is non-blocking; receiving runs on a thread of
its own (``net-rx``), sending on the transmit queue's worker. A native data path takes the
fd itself (``native_tap``) and serves both queues in C: the thread then finds no receive
buffer held and stays asleep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time

from pyvduse.backend.net_base import NetBackend, PacketPort, Received

log = logging.getLogger(__name__)

#: Frames received per wake-up before looking at the stop request again.
RX_BATCH = 64
IOV_MAX = 1024


class FrameFdBackend(NetBackend):
    """Frames to and from ``fd`` (non-blocking, one frame per read or write), owned from
    now on: ``close`` closes it."""

    def __init__(self, fd: int, description: str) -> None:
        self.fd = fd
        self.description = description
        self._port: PacketPort | None = None
        self._thread: threading.Thread | None = None
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._buffers_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self.read_errors = 0

    def _negotiated(self, features: int) -> None:
        """The driver's features are known (``start``): a subclass sets the fd up for them."""

    # -- NetBackend -----------------------------------------------------------------------

    def native_tap(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def start(self, port: PacketPort, features: int) -> None:
        self.stop()
        self._negotiated(features)
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

    def close(self) -> None:
        self.stop()
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        for fd in (self._stop_fd, self._buffers_fd):
            os.close(fd)

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
            except OSError as e:  # the fd went away, or a bug: say so, do not spin
                self.read_errors += 1
                if self.read_errors <= 10:
                    log.warning("%s: read failed: %s", self.description, e.strerror or e)
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
