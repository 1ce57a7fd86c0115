"""A network backend that is Python code: frames sent land in a queue, frames are injected.

For tests on the model and for devices written in Python (``examples/reflector_net.py``):
``sent`` holds what the driver transmitted (header + frame, as bytes), ``inject`` gives the
driver a frame, waiting in a backlog while it has no receive buffer. No thread of its own:
injected frames go in on the caller's thread, the backlog on the receive queue's worker.
"""

from __future__ import annotations

import collections
import queue
import threading

from pyvduse.backend.net_base import NetBackend, PacketPort


class PacketQueueBackend(NetBackend):
    """Frames to and from Python."""

    kind = "queue"
    description = "in-process packet queue"

    def __init__(self, offloads: int = 0, backlog: int = 1024) -> None:
        self._offloads = offloads
        self.limit = backlog
        self.sent: queue.Queue[bytes] = queue.Queue()
        self.features = 0
        self.dropped = 0  # injected frames lost to a full backlog
        self._backlog: collections.deque[bytes] = collections.deque()
        self._port: PacketPort | None = None
        self._lock = threading.RLock()

    def offloads(self) -> int:
        return self._offloads

    def start(self, port: PacketPort, features: int) -> None:
        with self._lock:
            self.features = features
            self._port = port
            port.on_buffers(self.flush)
        self.flush()

    def stop(self) -> None:
        with self._lock:
            if self._port is not None:
                self._port.on_buffers(None)
            self._port = None

    def send(self, packet: list[memoryview]) -> None:
        self.sent.put(b"".join(packet))

    def inject(self, packet: bytes) -> None:
        """Give the driver ``packet`` (header + frame) as soon as it has a buffer for it."""
        with self._lock:
            if len(self._backlog) >= self.limit:
                self.dropped += 1
                return
            self._backlog.append(bytes(packet))
        self.flush()

    def flush(self) -> None:
        """Deliver what waits, as far as there are buffers."""
        with self._lock:
            port = self._port
            while port is not None and self._backlog:
                if not port.deliver(self._backlog[0]):
                    break
                self._backlog.popleft()

    @property
    def waiting(self) -> int:
        return len(self._backlog)
