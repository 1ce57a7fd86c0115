"""Building a native engine for one queue, and telling when one can be used.

The native loop serves a queue only in the configuration it implements exactly: a split ring
of a device that says how (``native_plan()``: a ``BlkDevice`` that handles requests as
``BlkDevice`` does, over a backend whose ``native_storage()`` is null, memory, a file
descriptor, or NBD with a connection per queue in the build with libnbd; or a ``NetDevice``
over a TAP without mergeable receive buffers), over driver memory that is a ``RegionMap``.
It never looks at concrete device or backend classes. Everything else keeps the Python
worker. Choosing is the runtime's job (``DataPath``); this module only
answers "can it?" and "build it".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pyvduse.abi import virtio_net as vn
from pyvduse.backend.base import NativeStorage
from pyvduse.device.base import VirtioDevice
from pyvduse.device.blk import NativeBlk
from pyvduse.device.net import NativeNet
from pyvduse.fastpath.config import (
    NEVER,
    AioMode,
    DeviceConfig,
    DeviceKind,
    EngineConfig,
    EngineTuning,
    Interrupts,
    RingLayout,
    StorageConfig,
    StorageKind,
    TestKnobs,
)
from pyvduse.ring.budget import wakeup_budget
from pyvduse.ring.inflight import InflightLog
from pyvduse.ring.memory import GuestMemory, RegionMap
from pyvduse.ring.split import SplitQueue

if TYPE_CHECKING:
    import pyvduse.fastpath._splitblk as _splitblk
    from pyvduse.fastpath._splitblk import Engine as Engine
else:
    Engine = Any  # the extension may not be built
    try:  # the build with io_uring and libnbd (liburing-dev, libnbd-dev at install time) ...
        import pyvduse.fastpath._splitblk_full as _splitblk
    except ImportError:
        try:  # ... with io_uring only ...
            import pyvduse.fastpath._splitblk_uring as _splitblk
        except ImportError:
            try:  # ... or the one without
                import pyvduse.fastpath._splitblk as _splitblk
            except ImportError:  # not built: no compiler or no Python headers at install time
                _splitblk = None

# What Engine.run returns (only ever compared when the extension exists)
RUN_STOPPED: int = _splitblk.RUN_STOPPED if _splitblk is not None else 0
RUN_DEFER: int = _splitblk.RUN_DEFER if _splitblk is not None else 1
RUN_NBD_LOST: int = getattr(_splitblk, "RUN_NBD_LOST", 3)
# EngineTuning.aio: requests served inline one at a time, or on io_uring, many in flight
AIO_SYNC, AIO_URING, AIO_NBD = AioMode.SYNC, AioMode.URING, AioMode.NBD


def extension() -> Any:
    """The compiled extension in use (its constants: BACKEND_*, RUN_*, ...), None unbuilt."""
    return _splitblk


def available() -> bool:
    """Whether the extension was built (``pip install`` with a C compiler and headers)."""
    return _splitblk is not None and os.environ.get("PYVDUSE_NO_NATIVE") != "1"


def uring_built() -> bool:
    """Whether the extension in use was built with io_uring (liburing), so that
    ``EngineTuning(aio=AioMode.URING)`` can work (the kernel may still refuse it: then the
    engine's constructor raises OSError)."""
    return available() and bool(_splitblk.HAS_URING)


def nbd_built() -> bool:
    """Whether the extension in use has the NBD client path (built with libnbd)."""
    return available() and bool(getattr(_splitblk, "HAS_NBD", 0))


@runtime_checkable
class NativeServable(Protocol):
    """A device that can say how a native loop serves it (``BlkDevice``, ``NetDevice``)."""

    def native_plan(self) -> NativeBlk | NativeNet | str: ...


#: What the native loop serves a device by: a virtio-blk device's storage, or a TAP.
Plan = NativeBlk | NativeNet


def plan_of(device: VirtioDevice, packed: bool) -> Plan | str:
    """How the native loop would serve ``device``, or why it cannot."""
    if not available():
        return (
            "the native data path is not built (reinstall with a C compiler and the "
            "Python headers: apt install gcc python3-dev; pip install -e .)"
        )
    if packed:
        return "the native data path serves split rings only"
    if not isinstance(device, NativeServable):
        return f"the native data path serves virtio-blk and virtio-net devices, not {type(device).__name__}"
    plan = device.native_plan()
    if isinstance(plan, str | NativeNet):
        return plan
    storage = plan.storage
    if storage.kind == "nbd":
        if not nbd_built():
            return (
                "the native data path was built without libnbd (reinstall with "
                "libnbd-dev: apt install libnbd-dev; pip install -e .)"
            )
        if storage.connections is None or storage.connections.queue_count != plan.num_queues:
            return "the NBD server does not allow multi-conn, so the queues share one connection"
    return plan


def require_plan(device: VirtioDevice) -> Plan:
    """``device``'s native plan on a split ring; ValueError saying why there is none."""
    plan = plan_of(device, packed=False)
    if isinstance(plan, str):
        raise ValueError(plan)
    return plan


def why_not(device: VirtioDevice, packed: bool) -> str | None:
    """Why the native loop cannot serve ``device`` (None: it can)."""
    plan = plan_of(device, packed)
    return plan if isinstance(plan, str) else None


_DEFAULT_TUNING = EngineTuning()
_NO_TEST_KNOBS = TestKnobs()
_KINDS = {
    "null": StorageKind.NULL,
    "fd": StorageKind.FD,
    "memory": StorageKind.MEMORY,
    "nbd": StorageKind.NBD,
}


def storage_config(storage: NativeStorage, nbd: object = None) -> StorageConfig:
    """The engine's view of a backend's storage; ``nbd``: the connection it is lent."""
    if storage.kind == "nbd":
        return StorageConfig(
            StorageKind.NBD, nbd=nbd, nbd_fua=storage.fua_writes, nbd_max=storage.max_command
        )
    return StorageConfig(
        _KINDS[storage.kind],
        fd=storage.fd,
        direct=storage.direct,
        memory=storage.memory,
        unpinnable=storage.unpinnable,
        on_unpinnable=storage.on_unpinnable,
    )


def region_tuples(memory: RegionMap) -> list[tuple[int, int, memoryview, bool]]:
    return [(r.start, r.last, r.mem, r.writable) for r in memory.regions]


def ring_layout(
    ring: SplitQueue,
    memory: RegionMap,
    log: InflightLog | None = None,
    inflight: bytearray | memoryview | None = None,
) -> RingLayout:
    """Where ``ring`` is in ``memory`` and where it stands (run_native hands the rest of its
    position over)."""
    last_avail, used, signalled, _ = ring.position()
    return RingLayout(
        region_tuples(memory),
        ring.num,
        ring.desc_addr,
        ring.avail_addr,
        ring.used_addr,
        event_idx=ring.event_idx,
        indirect=ring.indirect,
        last_avail=last_avail,
        used_idx=used,
        signalled=signalled,
        log=None if log is None else log.mem,
        inflight=inflight,
    )


def config(
    plan: Plan,
    index: int,
    ring: SplitQueue,
    memory: GuestMemory,
    log: InflightLog | None,
    irq: tuple[int, int] | None,
    notify: Callable[[int], None],
    on_error: Callable[[int, int, int], None],
    *,
    tuning: EngineTuning = _DEFAULT_TUNING,
    affinity_fd: int = -1,
    follow_cpus: Sequence[int] = (),
    inflight: bytearray | memoryview | None = None,
    nbd: object = None,
    test: TestKnobs = _NO_TEST_KNOBS,
) -> EngineConfig:
    """What a native engine serving queue ``index`` of the device ``plan`` describes is
    made from: positioned where ``ring`` stands, with ``log`` (None: none); it interrupts
    through ``irq`` (the VDUSE fd and its inject request) or, without, calls
    ``notify(index)``; ``on_error`` hears of requests the storage failed. ``tuning``: when
    it publishes, whether it polls, how it waits for the storage (``AioMode.URING``:
    ValueError if the extension was built without liburing, OSError if the kernel refuses
    io_uring; the budget defaults to ring/budget.py's). With ``affinity_fd`` (the queue's
    irq_cb_affinity, open for writing) it points the queue's interrupts at its own CPU
    whenever that is one of ``follow_cpus`` (the first 64 CPUs can be followed).
    ``inflight`` (``ring.num`` bytes) is the map of heads in flight shared with the Python
    ring; the engine allocates its own without it. An NBD backend's engine
    (``AioMode.NBD``) takes ``nbd``, the binding's handle it is lent (None: down).
    ``test``: the test-only knobs. See config.py for each field."""
    if not isinstance(memory, RegionMap):
        raise ValueError("the native data path needs driver memory as a RegionMap")
    irq_fd, irq_request = irq if irq is not None else (-1, 0)
    if not tuning.budget:
        tuning = replace(tuning, budget=wakeup_budget(ring.num))
    if isinstance(plan, NativeNet):  # frames are served as they come: no io_uring
        receive = index == vn.RX_QUEUE
        kind = DeviceKind.NET_RX if receive else DeviceKind.NET_TX
        device = DeviceConfig(kind=kind, link=plan.link, guest_csum=plan.guest_csum)
        storage = StorageConfig(StorageKind.TAP, fd=plan.tap_fd)
        # Received frames go to the driver once per run of them (or once the oldest has
        # waited hold_ns), whatever their size: NAPI then takes more per interrupt. Sent
        # ones keep the publish rule: a completion frees the guest's buffer, and TCP holds
        # back a socket whose sent data is not freed yet (TCP small queues). bench/net.py,
        # one TCP stream, four runs each: into the interface 0.56-0.61x veth once per run,
        # 0.45-0.54x with the rule; out of it 0.41-0.58x once per run, 0.49-0.59x with it.
        tuning = replace(tuning, aio=AioMode.SYNC, publish_ns=NEVER if receive else tuning.publish_ns)
    else:
        device = DeviceConfig(plan.capacity, plan.readonly, plan.serial)
        storage = storage_config(plan.storage, nbd)
    return EngineConfig(
        ring=ring_layout(ring, memory, log, inflight),
        device=device,
        storage=storage,
        interrupts=Interrupts(
            irq_fd,
            irq_request,
            index,
            notify=None if irq is not None else notify,
            on_error=on_error,
            affinity_fd=affinity_fd,
            follow_mask=sum(1 << c for c in set(follow_cpus) if c < 64),
        ),
        tuning=tuning,
        test=test,
    )


def build(
    plan: Plan,
    index: int,
    ring: SplitQueue,
    memory: GuestMemory,
    log: InflightLog | None,
    irq: tuple[int, int] | None,
    notify: Callable[[int], None],
    on_error: Callable[[int, int, int], None],
    **options: Any,
) -> Engine:
    """The native engine ``config`` describes for these arguments and ``options`` (its
    keyword arguments): ``Engine(config(...))``."""
    assert _splitblk is not None
    return _splitblk.Engine(config(plan, index, ring, memory, log, irq, notify, on_error, **options))
