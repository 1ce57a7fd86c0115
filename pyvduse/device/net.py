"""virtio-net: the network device model (virtio 1.2 section 5.1), one receive/transmit pair.

Transmit (queue 1): each chain is one frame, v1 header first; it goes to the backend as the
driver's own buffers (no copy of ours) and completes at once. Receive (queue 0): the driver's
buffers are held as idle requests until a frame arrives; the backend reads it straight into
them (a TAP's ``readv``), across as many buffers as it needs with mergeable receive buffers
(their count in the header's ``num_buffers``), and the buffers of one frame are completed
together so the driver never sees half a frame.

A ``NetBackend`` that offers a TAP's fd (``native_tap``) lets the native data path serve
both queues in C (``native_plan``; pyvduse/fastpath/splitblk_net.c), the same steps without
Python per frame; mergeable receive buffers keep the Python engine.

VDUSE refuses the control queue (CTRL_VQ) and with it multiqueue and every feature that
needs it (``virtio_net.VDUSE_REFUSED_FEATURES``): asking for one is an error at creation,
on the model as on the kernel. Checksum and segmentation offloads are offered as far as the
backend carries them.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    DeviceId,
    bit,
    has,
)
from pyvduse.backend.net_base import NetBackend, ReadPacket, Received
from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
from pyvduse.device.engine_stats import PerQueueStats
from pyvduse.device.request import Request, complete_together
from pyvduse.ratelimit import RateLimitedLogger
from pyvduse.ring.chain import Chain
from pyvduse.ring.iovec import scatter, slice_segments, total

log = logging.getLogger(__name__)

HDR = vn.NET_HDR_V1_SIZE  # 12: with VERSION_1 every frame has the v1 header
#: The largest frame (header included) a backend may hand over: a 64 KiB GSO packet plus
#: its Ethernet and VLAN headers.
MAX_PACKET = HDR + 65536 + 18
#: A frame waits this long for enough receive buffers, then is dropped (a NIC with no
#: descriptors drops at once; waiting a little spares TCP a retransmission).
PENDING_SECONDS = 1.0

#: Offloads a device may offer when its backend carries them.
OFFLOAD_FEATURES = (
    bit(vn.F_CSUM)
    | bit(vn.F_GUEST_CSUM)
    | bit(vn.F_HOST_TSO4)
    | bit(vn.F_HOST_TSO6)
    | bit(vn.F_GUEST_TSO4)
    | bit(vn.F_GUEST_TSO6)
    | bit(vn.F_HOST_ECN)
    | bit(vn.F_GUEST_ECN)
)


class NetConfigError(ValueError):
    """The options cannot describe a net device VDUSE accepts."""


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` as 6 bytes; a multicast address cannot be a NIC's."""
    parts = text.replace("-", ":").split(":")
    try:
        raw = bytes(int(p, 16) for p in parts if len(p) in (1, 2))
    except ValueError:
        raw = b""
    if len(parts) != vn.MAC_LEN or len(raw) != vn.MAC_LEN:
        raise NetConfigError(f"'{text}' is not a MAC address: write it like 52:54:00:12:34:56")
    if raw[0] & 1:
        raise NetConfigError(f"{text} is a multicast address: a NIC needs a unicast one (an even first byte)")
    return raw


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A locally administered unicast address (as QEMU and systemd make them)."""
    raw = bytearray(os.urandom(vn.MAC_LEN))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


@dataclass(frozen=True)
class NativeNet:
    """What a native loop needs to serve a network device's two queues without calling
    Python for each frame (``NetDevice.native_plan``)."""

    tap_fd: int  # a TAP opened with IFF_VNET_HDR and a 12-byte header, non-blocking
    link: bytearray  # one byte, nonzero while the link is up: the loop reads it per frame
    guest_csum: bool  # GUEST_CSUM was negotiated (received frames keep the TAP's flags)
    stats: PerQueueStats[NetStats]  # where the engines' per-queue counters go


@dataclass
class NetOptions:
    """What the user can choose about a network device."""

    mac: bytes | None = None  # None: a random locally administered address
    mtu: int | None = None  # None: no MTU feature (the driver's default, 1500)
    queue_size: int = 256
    packed: bool = False
    #: Mergeable receive buffers: off by default, because every receive buffer costs the
    #: Python engine a request, and with them a 64 KiB frame takes 16 to 40 of them.
    mrg_rxbuf: bool = False
    offloads: bool = True
    link_up: bool = True
    extra_features: int = 0  # more feature bits to offer (tests, experiments)


@dataclass
class NetStats:
    """Counters of one queue, written by one thread (the queue's worker for transmit, the
    backend's receive thread for receive)."""

    packets: int = 0
    bytes: int = 0
    drops: int = 0  # frames lost: link down, no room, refused by the backend
    bad: int = 0  # malformed requests from the driver

    def add(self, other: NetStats) -> None:
        self.packets += other.packets
        self.bytes += other.bytes
        self.drops += other.drops
        self.bad += other.bad


def _put(segs: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the concatenated segments."""
    scatter(slice_segments(segs, offset, offset + len(data)), data)


class ReceiveQueue:
    """The receive buffers the driver gave, held until frames arrive: the ``PacketPort``
    a backend delivers through. One backend thread at a time receives (a lock makes it
    so); the queue's worker adds buffers."""

    def __init__(
        self,
        stats: NetStats,
        mergeable: Callable[[], bool],
        guest_csum: Callable[[], bool],
        link_up: Callable[[], bool],
        request_log: RateLimitedLogger | None = None,
    ) -> None:
        self.stats = stats
        self.request_log = request_log or RateLimitedLogger(log)
        self._mergeable = mergeable
        self._guest_csum = guest_csum
        self._link_up = link_up
        self._held: collections.deque[tuple[Request, int]] = collections.deque()
        self._starved = False
        self._callback: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._scratch = memoryview(bytearray(MAX_PACKET))
        self._expect = 2048  # the buffer bytes to offer the next read: the last frame's size
        self._pending: bytes | None = None  # a frame read when the buffers ran out
        self._pending_since = 0.0

    @property
    def held(self) -> int:
        """Receive buffers waiting for a frame."""
        return len(self._held)

    # -- the queue's worker ---------------------------------------------------------------

    def hold(self, request: Request) -> None:
        """Keep a receive buffer until a frame comes."""
        chain = request.chain
        if chain.error is not None or chain.readable or total(chain.writable) < HDR:
            self.stats.bad += 1
            self.request_log.warning(
                "receive buffer %d is malformed: %s",
                chain.head,
                chain.error or "readable buffers or shorter than a header",
            )
            request.complete(0)
            return
        request.idle = True
        self._held.append((request, total(chain.writable)))
        if self._pending is not None and self._lock.acquire(blocking=False):
            try:  # (when the lock is taken, the backend's thread is at it already)
                if self._pending is not None:
                    self._place_pending()
            finally:
                self._lock.release()
        if self._starved:
            self._starved = False
            callback = self._callback
            if callback is not None:
                callback()

    def clear(self) -> None:
        """Forget the buffers (the queues stopped: they belong to a driver that is gone)."""
        with self._lock:
            self._held.clear()
            self._pending = None

    # -- PacketPort: the backend's thread -----------------------------------------------

    def on_buffers(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback

    def deliver(self, packet: bytes | memoryview) -> bool:
        if len(packet) > MAX_PACKET:
            self.stats.drops += 1
            return True

        def copy(iov: list[memoryview]) -> int:
            return scatter(iov, packet)

        return self.receive(copy) is not Received.NO_BUFFERS

    def expire(self, older_than: float = PENDING_SECONDS) -> bool:
        with self._lock:
            if self._pending is not None and time.monotonic() - self._pending_since > older_than:
                self._pending = None
                self.stats.drops += 1
            return self._pending is not None

    def receive(self, read: ReadPacket) -> Received:
        with self._lock:
            if not self._link_up():
                try:
                    read([self._scratch])
                except BlockingIOError:
                    return Received.NO_PACKET
                self.stats.drops += 1
                return Received.PACKET
            if self._pending is not None and not self._place_pending():
                if time.monotonic() - self._pending_since <= PENDING_SECONDS:
                    return Received.NO_BUFFERS
                self._pending = None  # waited long enough: dropped
                self.stats.drops += 1
            mergeable = self._mergeable()
            taken, cap = self._take(self._expect if mergeable else 1)
            if not taken:
                return Received.NO_BUFFERS
            iov = [seg for r, _ in taken for seg in r.chain.writable]
            iov.append(self._scratch)  # a longer frame is then seen whole (and dropped)
            try:
                n = read(iov)
            except BlockingIOError:
                self._give_back(taken)
                return Received.NO_PACKET
            except BaseException:
                self._give_back(taken)
                raise
            self._expect = max(n, 2048)
            if n < HDR or (n > cap and not mergeable):
                self._give_back(taken)
                self.stats.drops += 1
                return Received.PACKET
            if n > cap:  # the rest is in the scratch buffer
                more, more_cap = self._take(n - cap)
                taken += more
                if cap + more_cap < n:
                    self._pending = b"".join(bytes(s) for s in slice_segments(iov, 0, n))
                    self._pending_since = time.monotonic()
                    self._give_back(taken)
                    return Received.PACKET
                scatter([seg for r, _ in more for seg in r.chain.writable], self._scratch[: n - cap])
            self._complete(taken, n)
            return Received.PACKET

    # -- helpers (under the lock) ---------------------------------------------------------

    def _pop(self) -> tuple[Request, int] | None:
        held = self._held
        while True:
            try:
                item = held.popleft()
            except IndexError:
                self._starved = True  # hold() calls back; look once more in case it ran first
                try:
                    item = held.popleft()
                except IndexError:
                    return None
                self._starved = False
            request = item[0]
            request.idle = False
            if request.poisoned:  # its memory went away while it waited
                request.fail()
                continue
            return item

    def _take(self, want: int) -> tuple[list[tuple[Request, int]], int]:
        """Buffers holding at least ``want`` bytes, or all there are."""
        taken: list[tuple[Request, int]] = []
        cap = 0
        while cap < want:
            item = self._pop()
            if item is None:
                break
            taken.append(item)
            cap += item[1]
        return taken, cap

    def _give_back(self, taken: list[tuple[Request, int]]) -> None:
        for item in reversed(taken):
            item[0].idle = True
            self._held.appendleft(item)

    def _place_pending(self) -> bool:
        """Put the waiting frame into buffers; False if there are still not enough."""
        packet = self._pending
        assert packet is not None
        taken, cap = self._take(len(packet))
        if cap < len(packet):
            self._give_back(taken)
            return False
        scatter([seg for r, _ in taken for seg in r.chain.writable], packet)
        self._pending = None
        self._complete(taken, len(packet))
        return True

    def _complete(self, taken: list[tuple[Request, int]], n: int) -> None:
        """The frame of ``n`` bytes fills ``taken`` in order: set the header's buffer count
        (and clear checksum flags the driver did not ask for), give back what is unused,
        complete the rest together."""
        outcomes: list[tuple[Request, int]] = []
        left = n
        for i, (request, cap) in enumerate(taken):
            if left <= 0:
                self._give_back(taken[i:])
                break
            used = min(cap, left)
            outcomes.append((request, used))
            left -= used
        first = outcomes[0][0].chain.writable
        _put(first, 10, len(outcomes).to_bytes(2, "little"))  # num_buffers
        if not self._guest_csum():
            first[0][0] = 0  # flags: DATA_VALID / NEEDS_CSUM only with GUEST_CSUM
        st = self.stats
        st.packets += 1
        st.bytes += n - HDR
        complete_together(outcomes)


class NetDevice(VirtioDevice):
    """A virtio-net device whose frames go to and come from a ``NetBackend``."""

    def __init__(self, backend: NetBackend, options: NetOptions | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.options = opts = options or NetOptions()
        refused = opts.extra_features & vn.VDUSE_REFUSED_MASK
        if refused:
            names = ", ".join(_feature_name(b) for b in range(64) if refused >> b & 1)
            raise NetConfigError(
                f"VDUSE refuses {names}: a VDUSE net device has no control "
                "queue, hence one queue pair and no feature that needs it"
            )
        if opts.mtu is not None and not vn.MIN_MTU <= opts.mtu <= 65535:
            raise NetConfigError(f"MTU {opts.mtu} must be {vn.MIN_MTU} to 65535")
        qs = opts.queue_size
        if not (2 <= qs <= 32768 and qs & (qs - 1) == 0):
            raise NetConfigError(f"queue size {qs} must be a power of two from 2 to 32768")
        self.mac = opts.mac if opts.mac is not None else random_mac()
        if len(self.mac) != vn.MAC_LEN or self.mac[0] & 1:
            raise NetConfigError("the MAC address must be 6 bytes, unicast")
        self.link_up = opts.link_up
        #: The link state as a byte a native engine reads (set_link keeps it in step).
        self.link_cell = bytearray([int(opts.link_up)])
        #: Per queue (RX_QUEUE, TX_QUEUE): receive counted by the backend's thread, transmit
        #: by the transmit queue's worker.
        self.queue_stats = [NetStats(), NetStats()]
        #: ... and with those of a native engine serving a queue (``native_plan``).
        self.per_queue = PerQueueStats(self.queue_stats, NetStats)
        self.rx = ReceiveQueue(
            self.queue_stats[vn.RX_QUEUE],
            mergeable=lambda: has(self.features, vn.F_MRG_RXBUF),
            guest_csum=lambda: has(self.features, vn.F_GUEST_CSUM),
            link_up=lambda: self.link_up,
            request_log=self.request_log,
        )
        self._started = False
        self._link_lock = threading.Lock()
        #: Called with the new state after ``set_link`` (the daemon keeps it for a restart).
        self.on_link_change: Callable[[bool], None] | None = None

    # -- identity -----------------------------------------------------------------------

    def offered_features(self) -> int:
        o = self.options
        f = (
            REQUIRED_FEATURES
            | bit(F_RING_EVENT_IDX)
            | bit(F_RING_INDIRECT_DESC)
            | bit(vn.F_MAC)
            | bit(vn.F_STATUS)
        )
        if o.mrg_rxbuf:
            f |= bit(vn.F_MRG_RXBUF)
        if o.mtu is not None:
            f |= bit(vn.F_MTU)
        if o.packed:
            f |= bit(F_RING_PACKED)
        if o.offloads:
            f |= self.backend.offloads() & OFFLOAD_FEATURES
        return f | o.extra_features

    def config(self) -> vn.NetConfig:
        return vn.NetConfig(
            mac=self.mac,
            status=vn.S_LINK_UP if self.link_up else 0,
            max_virtqueue_pairs=1,
            mtu=self.options.mtu or 0,
        )

    def spec(self) -> DeviceSpec:
        return DeviceSpec(
            device_id=DeviceId.NET,
            features=self.offered_features(),
            config=self.config().pack(),
            num_queues=vn.NUM_QUEUES,
            queue_size=self.options.queue_size,
        )

    def accept_features(self, features: int) -> bool:
        return super().accept_features(features) and not features & vn.VDUSE_REFUSED_MASK

    def identity(self) -> dict[str, object]:
        return {
            **super().identity(),
            "backend": self.backend.description,
            "mac": format_mac(self.mac),
            "mtu": self.options.mtu,
        }

    # -- what ctl status / stats show ---------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "backend": self.backend.description,
            "backend_kind": self.backend.kind,
            "mac": format_mac(self.mac),
            "mtu": self.options.mtu,
            "link": "up" if self.link_up else "down",
            "rx_buffers_held": self.rx.held,
        }

    def queue_counts(self, queue: int) -> dict[str, object]:
        st = self.per_queue.snapshot(queue)
        return {"direction": "rx" if queue == vn.RX_QUEUE else "tx", **_counts(st)}

    def total_counts(self) -> dict[str, object]:
        return _counts(self.per_queue.total())

    # -- the native data path --------------------------------------------------------------

    def native_plan(self) -> NativeNet | str:
        """How a native data path can serve this device, or why it cannot: a subclass that
        handles frames itself, a backend that is not a TAP, or mergeable receive buffers."""
        if any(getattr(type(self), m) is not getattr(NetDevice, m) for m in ("submit", "handle", "transmit")):
            return f"{type(self).__name__} handles its frames itself"
        fd = self.backend.native_tap()
        if fd is None:
            return f"the native data path has no {self.backend.kind} network backend"
        if self.options.mrg_rxbuf:
            return "mergeable receive buffers (--mrg-rxbuf) are served by the Python engine"
        return NativeNet(fd, self.link_cell, has(self.features, vn.F_GUEST_CSUM), self.per_queue)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, features: int) -> None:
        super().start(features)
        self.backend.start(self.rx, features)
        self._started = True

    def quiesce(self) -> None:
        """Stop the backend's receiving, then drop the held buffers (the queues stop)."""
        if self._started:
            self.backend.stop()
            self._started = False
        self.rx.clear()

    def set_link(self, up: bool) -> None:
        """Link up or down (``ctl link``): config space + config interrupt, so the driver's
        carrier follows; while down, nothing is sent or received (counted as drops)."""
        with self._link_lock:
            self.link_up = up
            self.link_cell[0] = int(up)
            status = vn.S_LINK_UP if up else 0
            self.update_config(vn.STATUS_OFFSET, status.to_bytes(2, "little"))
            self.backend.set_carrier(up)
            if self.on_link_change is not None:
                self.on_link_change(up)

    # -- requests -----------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if request.queue == vn.RX_QUEUE:
            self.rx.hold(request)
        else:
            request.complete(self.transmit(request.queue, request.chain))

    def handle(self, queue: int, chain: Chain) -> int:
        """Transmit one frame. A receive buffer is held by ``submit``; one handed here (by
        a native worker: a chain its loop cannot use, or one the last daemon held when it
        died) goes back to the driver empty, which counts a length error."""
        if queue == vn.RX_QUEUE:
            malformed = chain.error is not None or chain.readable or total(chain.writable) < HDR
            if malformed:
                self.queue_stats[vn.RX_QUEUE].bad += 1
            why = "malformed" if malformed else "the native loop cannot fill it, or the last daemon held it"
            self.request_log.warning("receive buffer %d given back empty: %s", chain.head, chain.error or why)
            return 0
        return self.transmit(queue, chain)

    def transmit(self, queue: int, chain: Chain) -> int:
        st = self.queue_stats[vn.TX_QUEUE]
        readable = chain.readable
        n = total(readable)
        if chain.error is not None or n < HDR or chain.writable:
            st.bad += 1
            self.request_log.warning(
                "queue %d: bad frame %d: %s",
                queue,
                chain.head,
                chain.error or "shorter than a header or writable buffers",
            )
            return 0
        if not self.link_up:
            st.drops += 1
            return 0
        try:
            self.backend.send(readable)
        except OSError as e:
            st.drops += 1
            self.request_log.warning(
                "queue %d: frame of %d bytes not sent: %s", queue, n - HDR, e.strerror or e
            )
            return 0
        st.packets += 1
        st.bytes += n - HDR
        return 0


def _counts(st: NetStats) -> dict[str, object]:
    return {"packets": st.packets, "bytes": st.bytes, "drops": st.drops, "bad_requests": st.bad}


def _feature_name(b: int) -> str:
    for attr, value in vars(vn).items():
        if attr.startswith("F_") and value == b:
            return attr[2:]
    return f"feature bit {b}"
