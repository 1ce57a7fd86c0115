"""What a native engine is built from: the one object ``Engine(config)`` takes.

The engine's constructor reads these attributes by name (C, ``_splitblk.c``: any object
with them will do, these dataclasses are the documented shape) and refuses a missing
attribute or one of the wrong type with a TypeError naming it (``engine config: ring.num
must be an int, not str``), a value out of range with a ValueError. ``engine.build`` makes
one from a device's ``NativeBlk`` plan and the ring it takes over; tests and the fuzzer
make their own. Plain data, importable without the extension.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NEVER",
    "AioMode",
    "DeviceConfig",
    "DeviceKind",
    "EngineConfig",
    "EngineTuning",
    "Interrupts",
    "RingLayout",
    "StorageConfig",
    "StorageKind",
    "TestKnobs",
]

#: publish_ns / hold_ns meaning "never" (only once per round).
NEVER = (1 << 64) - 1
#: The largest read or write an NBD engine sends as one command unless told otherwise.
NBD_MAX_DEFAULT = 32 << 20


class StorageKind(enum.IntEnum):
    """Where the data is (the C enum BACKEND_*; a test checks they agree)."""

    NULL = 0  # reads zeroes, drops writes
    FD = 1  # a file descriptor: preadv/pwritev, or io_uring
    MEMORY = 2  # a writable buffer holding the disk
    NBD = 3  # an NBD connection driven through libnbd (the build with libnbd)
    TAP = 4  # a TAP opened with IFF_VNET_HDR (a virtio-net queue: DeviceConfig.kind)


class DeviceKind(enum.IntEnum):
    """What the queue is (the C enum DEV_*)."""

    BLK = 0  # a virtio-blk queue
    NET_RX = 1  # virtio-net's receive queue: frames read from the TAP into its buffers
    NET_TX = 2  # virtio-net's transmit queue: each chain a frame written to the TAP


class AioMode(enum.IntEnum):
    """How the engine waits for the storage (the C enum AIO_*)."""

    SYNC = 0  # inline, one request at a time
    URING = 1  # io_uring, up to the queue's size in flight (the build with liburing)
    NBD = 2  # the NBD connection's asynchronous commands (with StorageKind.NBD only)


@dataclass(frozen=True)
class RingLayout:
    """The split ring: driver memory, where the three areas are, where the ring stands."""

    #: Driver memory: (first IOVA, last IOVA, a buffer of last - first + 1 bytes, writable).
    regions: Sequence[tuple[int, int, Any, bool]]
    num: int  # the queue size, a power of two up to 32768
    desc: int  # IOVAs of the descriptor table, the avail ring, the used ring
    avail: int
    used: int
    event_idx: bool = False  # VIRTIO_F_RING_EVENT_IDX was negotiated
    indirect: bool = False  # VIRTIO_F_RING_INDIRECT_DESC was negotiated
    last_avail: int = 0  # the next avail slot to take
    used_idx: int = 0  # the next used slot to fill
    signalled: int = 0  # the used index the driver was last told about
    #: The in-flight log (writable, ``ring.inflight.log_size(num)`` bytes); None: no log.
    log: Any = None
    #: The map of heads in flight shared with the Python ring (writable, ``num`` bytes:
    #: byte [head] is 1 while head is taken and not completed); None: the engine's own.
    inflight: Any = None


@dataclass(frozen=True)
class DeviceConfig:
    """What the device is and answers."""

    #: virtio-blk: the capacity in bytes, a writable 8-byte cell the engine reads as it
    #: changes (required); None for a virtio-net queue.
    capacity: Any = None
    readonly: bool = False
    serial: bytes = b""  # GET_ID's answer, up to 20 bytes (padded with zeroes)
    #: A virtio-net queue (NET_RX, NET_TX) needs ``StorageKind.TAP`` with its fd, and
    #: ``AioMode.SYNC``: frames are served as they come.
    kind: DeviceKind = DeviceKind.BLK
    #: virtio-net: a writable byte, nonzero while the link is up (None: always up); while
    #: it is down, frames sent are dropped and frames the TAP has are read and dropped.
    link: Any = None
    #: virtio-net receive: GUEST_CSUM was negotiated (without it the header's flags are
    #: cleared, as the driver expects neither DATA_VALID nor NEEDS_CSUM).
    guest_csum: bool = False


@dataclass(frozen=True)
class StorageConfig:
    """Where requests' data goes."""

    kind: StorageKind = StorageKind.NULL
    #: StorageKind.FD: the file or block device; the engine serves its own duplicate of it
    #: (closed with the engine), so the caller may close this one whenever it likes
    fd: int = -1
    #: ``fd`` was opened with O_DIRECT: buffers not aligned to ``dio_align`` are copied
    #: through the engine's own; requests at an offset or of a length not aligned go to
    #: Python.
    direct: bool = False
    dio_align: int = 512  # a power of two up to 1 MiB
    memory: Any = None  # StorageKind.MEMORY: a writable buffer, the disk's bytes
    #: The storage's byte (writable, 1 byte; None: the engine's own) saying driver memory
    #: cannot be pinned for transfers with the file: 1 once one failed with EFAULT (VDUSE's
    #: bounce pages, with O_DIRECT or a FUSE file in direct-I/O mode), by this engine,
    #: another of the storage or its Python backend; every request is then copied through
    #: the engine's own buffers. ``on_unpinnable()`` is called by the engine that set it.
    unpinnable: Any = None
    on_unpinnable: Callable[[], object] | None = None
    #: StorageKind.NBD: a libnbd handle ready for commands (the binding's NBD object or its
    #: capsule; None: no connection yet), whose socket the engine alone polls.
    nbd: Any = None
    nbd_fua: bool = False  # every write carries FUA
    nbd_max: int = NBD_MAX_DEFAULT  # longer reads and writes go to Python


@dataclass(frozen=True)
class Interrupts:
    """How the driver hears of completions, and Python of errors."""

    #: The VDUSE device fd and its VDUSE_VQ_INJECT_IRQ request (-1: call ``notify``).
    irq_fd: int = -1
    irq_request: int = 0
    irq_index: int = 0  # the queue's index
    notify: Callable[[int], object] | None = None  # notify(index), when there is no irq_fd
    #: on_error(request type, sector, errno) for a request the storage failed.
    on_error: Callable[[int, int, int], object] | None = None
    #: The queue's irq_cb_affinity, open for writing (-1: none): the engine points the
    #: interrupts at its own CPU whenever that is in ``follow_mask`` (bit n: CPU n).
    affinity_fd: int = -1
    follow_mask: int = 0


@dataclass(frozen=True)
class EngineTuning:
    """How the engine trades CPU, interrupts and latency (see runtime.tuning)."""

    #: AioMode.URING: the fd's reads, writes and flushes on io_uring (ValueError in a build
    #: without liburing, OSError when the kernel refuses io_uring); AioMode.NBD with NBD.
    aio: AioMode = AioMode.SYNC
    #: Copy every request of the fd through the engine's own buffers from the start (it
    #: starts doing so by itself after an EFAULT: memory the kernel cannot pin).
    bounce: bool = False
    nowait: bool = True  # io_uring: try reads and writes inline first (RWF_NOWAIT)
    poll_ns: int = 0  # after the ring empties, watch it this long before sleeping
    publish_ns: int = NEVER  # publish a round's completions after a request this long
    hold_ns: int = NEVER  # ... or once the oldest is this old
    budget: int = 0  # requests per kick (0: 4 * num, ring/budget.py)


@dataclass(frozen=True)
class TestKnobs:
    """Test-only: deterministic orders and faults the tests cannot get otherwise."""

    __test__ = False  # not a pytest test class

    #: io_uring requests whose sector & gate_mask != 0 are linked behind a one-byte read of
    #: gate_fd (a pipe): they start only once the test writes a byte per request there.
    gate_fd: int = -1
    gate_mask: int = 0
    #: The next ``efault`` transfers between the file and driver memory (that succeeded)
    #: are taken for ones that failed with EFAULT, on the inline and the io_uring paths.
    efault: int = 0
    #: Each io_uring request is waited for as soon as it is submitted, so requests complete
    #: in the order they were taken (the differential tests).
    serial: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``Engine(config)`` reads, in groups by concern."""

    ring: RingLayout
    device: DeviceConfig
    storage: StorageConfig = field(default_factory=StorageConfig)
    interrupts: Interrupts = field(default_factory=Interrupts)
    tuning: EngineTuning = field(default_factory=EngineTuning)
    test: TestKnobs = field(default_factory=TestKnobs)
