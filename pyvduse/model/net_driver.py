"""A virtio-net driver for the model, usable from a test like a network interface.

It does what Linux's virtio_net does that a device can see: refuses to probe a device that
offers features needing a control queue without one, keeps the receive ring full of buffers
(small ones with mergeable receive buffers, else each large enough for a 64 KiB frame),
reads ``num_buffers`` to reassemble a frame spread over several buffers, and sends each frame
as the v1 header and the frame in two buffers.
"""

from __future__ import annotations

import collections
import time
from typing import cast

from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import has
from pyvduse.model.split_driver import Completion
from pyvduse.model.virtio_driver import DriverQueue, ProbeError, VirtioDriver
from pyvduse.transport.model.kernel import ModelKernel

HDR = vn.NET_HDR_V1_SIZE
#: A receive buffer without mergeable buffers holds a whole 64 KiB frame, as Linux's "big
#: packets" do.
BIG_BUFFER = HDR + 65536 + 18


def header(
    flags: int = 0,
    gso_type: int = vn.HDR_GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    num_buffers: int = 0,
) -> bytes:
    """A v1 virtio-net header."""
    return vn.NET_HDR_V1.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


class NetDriver:
    """send / receive frames through the model's virtio-net device."""

    def __init__(
        self,
        kernel: ModelKernel,
        *,
        rx_buffers: int | None = None,
        buffer_size: int = 1536,
        device_features: int = (1 << 28) - 1,
        queue_size: int | None = None,
    ) -> None:
        self.virtio = VirtioDriver(kernel, device_features=device_features, queue_size=queue_size)
        offered = kernel.get_device_features()
        if not has(offered, vn.F_CTRL_VQ):
            needs_cvq = offered & vn.VDUSE_REFUSED_MASK
            if needs_cvq:  # as virtnet_validate_features: Linux fails probe
                raise ProbeError(
                    f"the device offers features 0x{needs_cvq:x} that need a "
                    "control queue, and no control queue"
                )
        self.virtio.probe()
        self.rxq, self.txq = self.virtio.queues[vn.RX_QUEUE], self.virtio.queues[vn.TX_QUEUE]
        self.mergeable = has(self.virtio.features, vn.F_MRG_RXBUF)
        self.buffer_size = buffer_size if self.mergeable else max(buffer_size, BIG_BUFFER)
        ring_size = self.rxq.ring.num
        # 64 KiB buffers fill the model's bounce space (16 MiB) long before a ring of them
        default = ring_size if self.mergeable else min(ring_size, 64)
        self.rx_buffers = min(rx_buffers or default, ring_size)
        self._used: collections.deque[Completion] = collections.deque()
        self.malformed = 0  # received frames whose buffers did not add up
        self.refill()

    @property
    def config(self) -> vn.NetConfig:
        return vn.NetConfig.unpack(self.virtio.kernel.get_config(0, vn.CONFIG_SIZE))

    @property
    def link_up(self) -> bool:
        return bool(self.config.status & vn.S_LINK_UP)

    @property
    def features(self) -> int:
        return self.virtio.features

    def refill(self) -> None:
        """Give the device receive buffers until ``rx_buffers`` are posted."""
        q = self.rxq
        kick = False
        with q.lock:
            while q.ring.in_flight() < self.rx_buffers:
                q.ring.add([], [self.buffer_size], token=(0, None), publish=True)
                kick = True
            kick = kick and q.ring.kick_needed()
        if kick:
            q.kernel.kick(q.index)

    def post_receive(self, readable: list[bytes], sizes: list[int]) -> None:
        """Offer the device one receive chain as given (readable buffers, then writable ones
        of these sizes: tests offer malformed ones) and kick."""
        q = self.rxq
        with q.lock:
            q.ring.add(readable, sizes, token=(0, None))
            q.ring.kick_needed()
        q.kernel.kick(q.index)

    def send(self, frame: bytes, hdr: bytes | None = None, *, timeout: float = 10.0) -> None:
        """Transmit ``frame`` (after ``hdr``, a zero header by default) and wait until the
        device has taken it."""
        q = self.txq
        ticket = q.submit([hdr if hdr is not None else header(), frame], [])
        q.wait(ticket, timeout)

    def send_many(self, frames: list[bytes], *, timeout: float = 10.0) -> None:
        """Transmit several frames at once, then wait for all of them."""
        q = self.txq
        tickets = [q.submit([header(), f], []) for f in frames]
        for t in tickets:
            q.wait(t, timeout)

    def _collect(self, q: DriverQueue) -> None:
        with q.lock:
            for c in q.ring.collect():
                c.token = cast(tuple[int, object], c.token)[1]
                self._used.append(c)

    def receive(self, timeout: float = 10.0) -> tuple[bytes, bytes]:
        """The next received frame: (its header, the frame). The buffers are reposted."""
        q = self.rxq
        deadline = time.monotonic() + timeout
        while True:
            self._collect(q)
            if self._used:
                first = self._used[0]
                count = vn.NET_HDR_V1.unpack(first.data[:HDR])[6] if first.length >= HDR else 1
                if not self.mergeable:
                    count = 1
                if count < 1 or first.length < HDR:
                    self._used.popleft()
                    self.malformed += 1
                    self.refill()
                    continue
                if len(self._used) >= count:
                    parts = [self._used.popleft() for _ in range(count)]
                    data = b"".join(c.data[: c.length] for c in parts)
                    self.refill()
                    return data[:HDR], data[HDR:]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame received")
            q.irq.wait(min(left, 0.05))
            q.irq.clear()

    def remove(self) -> None:
        self.virtio.remove()
