"""A network backend for tests: frames pass through a ``SOCK_SEQPACKET`` socket pair.

The device's end behaves as a TAP opened with IFF_VNET_HDR does (one frame, v1 header first,
per message; non-blocking), so both data paths serve it as they serve a TAP -- the Python
engine with ``FrameFdBackend``'s thread, the native loop by reading and writing the fd
itself -- while the test holds the other end: ``inject`` gives the driver a frame,
``sent`` returns the next frame the driver transmitted. No root, no TAP, no kernel module.
"""

from __future__ import annotations

import select
import socket

from pyvduse.backend.frame_fd import FrameFdBackend
from pyvduse.device.net import MAX_PACKET


class FramePipe(FrameFdBackend):
    """Frames between the device and the test, through a socket pair. ``offloads``: the
    virtio-net offload features to offer (the pipe carries the header as it is)."""

    kind = "pipe"

    def __init__(self, offloads: int = 0) -> None:
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        # room for many frames each way, as a TAP's queue has
        for s in (ours, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._offloads = offloads
        super().__init__(ours.detach(), "frame pipe")

    def offloads(self) -> int:
        return self._offloads

    def inject(self, frame: bytes) -> None:
        """Give the driver ``frame`` (header + frame) as the TAP's side would."""
        self.peer.send(frame)

    def sent(self, timeout: float = 5.0) -> bytes:
        """The next frame the driver transmitted (header + frame); TimeoutError if none
        comes within ``timeout`` seconds."""
        if not select.select([self.peer], [], [], timeout)[0]:
            raise TimeoutError(f"no frame sent within {timeout} s")
        return self.peer.recv(MAX_PACKET + 1)

    def close(self) -> None:
        super().close()
        self.peer.close()

    def __enter__(self) -> FramePipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["FramePipe"]
