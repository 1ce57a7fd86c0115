"""``status`` and ``stats``: snapshots of a running device as plain JSON-ready dicts.

Read without locks from whatever thread asks (the management socket, a metrics scrape): the
counters are plain integers written by one worker each, so a snapshot is at most a request
old. Nothing here reads through anything that can block (no backend call, no kernel message).
"""

from __future__ import annotations

import time
from typing import Any

from pyvduse.abi import virtio as vio
from pyvduse.abi import virtio_blk as vb
from pyvduse.abi import virtio_net as vn
from pyvduse.abi.vduse import vduse_feature_names
from pyvduse.ops.protocol import Json
from pyvduse.ops.target import Target
from pyvduse.runtime.native_worker import NativeQueueWorker
from pyvduse.runtime.worker import LATENCY_BUCKETS, QueueCounters, QueueWorker


def _bit_names(module: Any, lo: int, hi: int) -> dict[int, str]:
    out = {}
    for attr, value in vars(module).items():
        if attr.startswith("F_") and isinstance(value, int) and lo <= value < hi:
            out[value] = attr[2:]
    return out


TRANSPORT_FEATURES = _bit_names(vio, vio.TRANSPORT_F_START, 64)
BLK_FEATURES = _bit_names(vb, 0, vio.TRANSPORT_F_START)
NET_FEATURES = {**_bit_names(vn, 0, vio.TRANSPORT_F_START), **_bit_names(vn, vio.TRANSPORT_F_END, 64)}


def feature_names(features: int, device_id: int) -> list[str]:
    names = []
    by_kind: dict[int, dict[int, str]] = {vio.DeviceId.BLOCK: BLK_FEATURES, vio.DeviceId.NET: NET_FEATURES}
    device = by_kind.get(device_id, {})
    for n in range(64):
        if features >> n & 1:
            names.append(TRANSPORT_FEATURES.get(n) or device.get(n) or f"BIT_{n}")
    return names


def status_names(status: int) -> list[str]:
    return [s.name or "" for s in vio.Status if status & s]


_KINDS: dict[int, str] = {
    vio.DeviceId.BLOCK: "virtio-blk",
    vio.DeviceId.NET: "virtio-net",
    vio.DeviceId.FS: "virtio-fs",
}


def device_kind(device_id: int) -> str:
    return _KINDS.get(device_id, f"virtio device {device_id}")


# -- status ---------------------------------------------------------------------------------


def _workers(target: Target) -> dict[int, QueueWorker]:
    for _ in range(10):  # the control thread may replace workers while we copy
        try:
            return dict(target.server.workers)
        except RuntimeError:
            continue
    return {}


def _ring_avail_idx(queue: object) -> int | None:
    """The driver's avail index, read from the ring (split rings; None when unknown)."""
    inner = getattr(queue, "queue", queue)  # a LoggedQueue wraps the ring
    read = getattr(inner, "avail_idx", None)
    if read is None:
        return None
    try:
        value = read()
    except Exception:  # the ring may be going away under us: report nothing
        return None
    return value if isinstance(value, int) else None


def queue_status(
    index: int,
    size: int,
    worker: QueueWorker | None,
    counters: QueueCounters | None,
    irq_cpus: list[int] | None = None,
    refused: str | None = None,
) -> Json:
    q: Json = {"index": index, "size": size, "served": worker is not None, "irq_cpus": irq_cpus}
    if worker is None and refused is not None:  # set up by the driver, not served: why
        q["broken"] = refused
    if worker is not None:
        ring = worker.queue
        q["size"] = ring.num
        last_avail, used = worker.indices()
        avail = _ring_avail_idx(ring)
        q.update(
            avail_idx=avail,
            last_avail_idx=last_avail,
            used_idx=used,
            pending=None if avail is None else (avail - last_avail) & 0xFFFF,
            broken=worker.broken or ring.broken,
            engine="native" if isinstance(worker, NativeQueueWorker) else "python",
            aio=worker.aio if worker.device.may_wait else "inline",
        )
    q["in_flight"] = counters.in_flight if counters else 0
    q["in_flight_s"] = in_flight_seconds(counters)
    q["completed"] = counters.completed if counters else 0
    return q


def in_flight_seconds(counters: QueueCounters | None) -> float | None:
    """How long the request in flight has been (None when there is none)."""
    started = counters.started if counters else 0
    return round((time.monotonic_ns() - started) / 1e9, 6) if started else None


def status(target: Target) -> Json:
    server, spec = target.server, target.spec
    device = server.device
    counters = target.server.queue_counters
    workers = _workers(target)
    features = server.features
    out: Json = {
        "name": target.name,
        "pid": target.pid,
        "state": target.state,
        "node": target.node,
        "uptime_s": round(time.monotonic() - target.started, 3),
        "device": device_kind(spec.device_id),
        "driver_ok": server.running.is_set(),
        "status": target.status_byte,
        "status_names": status_names(target.status_byte or 0),
        "features": f"0x{features:x}",
        "ring": "packed" if features >> vio.F_RING_PACKED & 1 else "split",
        "feature_names": feature_names(features, spec.device_id),
        "offered_features": f"0x{spec.features:x}",
        "control": target.control_path,
        "metrics": target.metrics_address,
    }
    out.update(device.status())
    out["aio"] = server.tuning.aio.value
    out["bounce_memory"] = getattr(target.transport, "bounce_memory", None)
    transport = target.transport
    # The VDUSE API version the device speaks (1 on Linux 7.x, 0 before) and the VDUSE
    # control features the kernel offers (VDUSE_GET_FEATURES; none before 7.x); None and
    # [] off the kernel (the in-process model).
    out["vduse_api"] = getattr(transport, "vduse_api", None)
    out["vduse_features"] = vduse_feature_names(getattr(transport, "vduse_features", 0))
    refused = dict(server.refused)
    out["queues"] = [
        queue_status(
            i,
            spec.queue_size,
            workers.get(i),
            counters.get(i),
            transport.interrupt_cpus(i) if transport else None,
            refused.get(i),
        )
        for i in range(spec.num_queues)
    ]
    return out


# -- stats ----------------------------------------------------------------------------------


def latency(hist: list[int], sum_ns: int) -> Json:
    """A latency histogram as JSON: ``buckets`` are ``[upper bound in µs, count]`` (not
    cumulative: bucket b holds requests that took [2**(b-1), 2**b) µs, bucket 0 under 1 µs),
    up to the last non-empty one."""
    last = max((b for b, n in enumerate(hist) if n), default=-1)
    return {
        "count": sum(hist),
        "sum_us": round(sum_ns / 1000, 3),
        "buckets": [[1 << b, hist[b]] for b in range(last + 1)],
    }


def depth(hist: list[int], total: int) -> Json:
    """The queue-depth histogram as JSON: ``buckets`` are ``[upper bound, count]``: bucket b
    counts requests taken while [2**(b-1), 2**b) requests were in flight, themselves
    included (bucket 1: alone, 2: two or three, ...), up to the last non-empty one; ``sum``
    adds those depths up (``sum / count``: the mean depth)."""
    last = max((b for b, n in enumerate(hist) if n), default=0)
    return {
        "count": sum(hist),
        "sum": total,
        "buckets": [[1 << b, hist[b]] for b in range(1, last + 1)],
    }


def stats(target: Target) -> Json:
    """Per-queue counters and their totals."""
    device = target.server.device
    counters = target.server.queue_counters
    queues = []
    all_hist = [0] * LATENCY_BUCKETS
    all_depth = [0] * LATENCY_BUCKETS
    all_ns = in_flight = completed = all_depth_sum = 0
    for i in range(target.spec.num_queues):
        c = counters.get(i)
        hist, sum_ns = c.latency_totals() if c else ([0] * LATENCY_BUCKETS, 0)
        q: Json = {"index": i}
        q.update(device.queue_counts(i))
        totals = c.totals() if c else None
        depth_hist = totals.depth if totals else [0] * LATENCY_BUCKETS
        depth_sum = totals.depth_sum if totals else 0
        q["in_flight"] = c.in_flight if c else 0
        q["in_flight_s"] = in_flight_seconds(c)
        q["completed"] = sum(hist)
        q["latency"] = latency(hist, sum_ns)
        q["depth"] = depth(depth_hist, depth_sum)
        queues.append(q)
        all_depth = [a + b for a, b in zip(all_depth, depth_hist, strict=True)]
        all_depth_sum += depth_sum
        all_hist = [a + b for a, b in zip(all_hist, hist, strict=True)]
        all_ns += sum_ns
        in_flight += q["in_flight"]
        completed += q["completed"]
    total: Json = dict(device.total_counts())
    total.update(
        in_flight=in_flight,
        completed=completed,
        latency=latency(all_hist, all_ns),
        depth=depth(all_depth, all_depth_sum),
    )
    out: Json = {"name": target.name, "queues": queues, "total": total}
    capacity = device.status().get("capacity")
    if capacity is not None:
        out["capacity"] = capacity
    return out


def percentile(lat: Json, fraction: float) -> int | None:
    """Upper bound (µs) of the bucket holding the ``fraction`` quantile; None if empty."""
    count = lat["count"]
    if not count:
        return None
    want = fraction * count
    seen = 0
    for bound, n in lat["buckets"]:
        seen += n
        if seen >= want:
            return int(bound)
    return None
