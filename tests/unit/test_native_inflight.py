"""The native worker with requests in flight on io_uring, through the model and the runtime.

The engine's test-only gate holds requests whose sector has a bit set until the test writes
a byte to a pipe (see test_native_uring.py), so a backend that "hangs" is deterministic:
the runtime must answer a reset within the message timeout, drop what hangs and let nothing
it does afterwards reach driver memory; a drain must wait for every request in flight; a
remap must keep them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.backend.file import FileBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.config import EngineConfig, TestKnobs
from pyvduse.model.arena import CoherentArena
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.model.virtio_driver import DriverQueue
from pyvduse.ops.drain import drain
from pyvduse.runtime.native_worker import NativeQueueWorker
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.testing.rig import ModelRig

if not native.uring_built():
    pytest.skip("the io_uring build of the native engine is not there", allow_module_level=True)

MiB = 1 << 20
GATE = 1 << 9  # sectors with this bit set wait for the gate


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """Every engine the runtime builds gets the gate; yields (read end, write end)."""
    r, w = os.pipe()
    ext: Any = native.extension()
    real = ext.Engine

    def gated(config: EngineConfig) -> Any:
        return real(replace(config, test=TestKnobs(gate_fd=r, gate_mask=GATE)))

    monkeypatch.setattr(ext, "Engine", gated)
    logging.disable(logging.WARNING)
    yield r, w
    logging.disable(logging.NOTSET)
    os.write(w, b"x" * 64)  # whatever still waits
    time.sleep(0.2)
    os.close(w)
    os.close(r)


def rig_for(tmp_path: Path, msg_timeout: float = 5.0) -> tuple[ModelRig, BlkDevice, bytes]:
    image = os.urandom(4 * MiB)
    path = tmp_path / "disk.img"
    path.write_bytes(image)
    device = BlkDevice(FileBackend(str(path)))
    rig = ModelRig(device, msg_timeout=msg_timeout, tuning=QueueTuning(data_path=DataPath.NATIVE))
    return rig, device, image


def probe(rig: ModelRig) -> tuple[BlkDriver, DriverQueue]:
    """A driver whose first request has mapped the bounce region (the native engine leaves
    a request into memory not yet mapped to Python, which serves it at once)."""
    drv = BlkDriver(rig.kernel)
    drv.read(0, 512)
    return drv, drv.virtio.queues[0]


def read(q: DriverQueue, sector: int) -> int:
    return q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, sector)], [4096, 1], indirect=True)


def wait_in_flight(rig: ModelRig, n: int) -> None:
    deadline = time.monotonic() + 5
    while rig.server.queue_counters[0].in_flight < n:
        assert time.monotonic() < deadline, "the requests never reached the engine"
        time.sleep(0.002)


def test_many_in_flight_complete_out_of_order(tmp_path: Path, gate: tuple[int, int]) -> None:
    rig, _device, image = rig_for(tmp_path)
    with rig:
        _, q = probe(rig)
        worker = rig.server.workers[0]
        assert isinstance(worker, NativeQueueWorker) and worker.aio == "io_uring"
        held = {read(q, GATE + 8 * k): GATE + 8 * k for k in range(8)}
        wait_in_flight(rig, 8)
        free = {read(q, 8 * k): 8 * k for k in range(8)}
        for ticket, sector in free.items():  # later, but not held: they finish first
            c = q.wait(ticket, 5)
            assert c.data[:-1] == image[sector * 512 : sector * 512 + 4096]
        assert rig.server.queue_counters[0].in_flight == 8
        os.write(gate[1], b"x" * 8)
        for ticket, sector in held.items():
            c = q.wait(ticket, 5)
            assert c.data[-1] == vb.ReqStatus.OK
            assert c.data[:-1] == image[sector * 512 : sector * 512 + 4096]
        assert max(b for b, n in enumerate(rig.server.queue_counters[0].depth_hist) if n) >= 4


def test_drain_waits_for_the_engines_requests(tmp_path: Path, gate: tuple[int, int]) -> None:
    rig, _, _ = rig_for(tmp_path)
    with rig:
        _, q = probe(rig)
        tickets = [read(q, GATE + 8 * k) for k in range(4)]
        wait_in_flight(rig, 4)
        assert drain(rig.server, 0.1) == 1
        os.write(gate[1], b"x" * 4)
        assert drain(rig.server, 5) == 0
        for t in tickets:
            assert q.wait(t, 5).data[-1] == vb.ReqStatus.OK


def test_a_reset_with_hung_requests_is_answered_in_time(tmp_path: Path, gate: tuple[int, int]) -> None:
    rig, _, _ = rig_for(tmp_path, msg_timeout=1.0)
    with rig:
        _, q = probe(rig)
        tickets = [read(q, GATE + 8 * k) for k in range(6)]
        wait_in_flight(rig, 6)
        ring = q.ring
        assert isinstance(ring, DriverSplitRing)
        buffers = [w for _, (_, wbufs, _, _) in ring.pending.items() for w in wbufs]
        before = [rig.kernel.iova.read(a, n) for a, n in buffers]
        used_before = ring.used_idx()
        assert rig.kernel.reset()
        assert not rig.kernel.broken  # answered within the kernel's msg_timeout
        os.write(gate[1], b"x" * 6)  # the "backend" wakes: its reads land in fenced pages
        time.sleep(0.3)
        assert [rig.kernel.iova.read(a, n) for a, n in buffers] == before
        assert ring.used_idx() == used_before
        del tickets
        assert BlkDriver(rig.kernel).read(0, 512)  # a fresh probe is served


def test_a_remap_keeps_the_engines_requests(tmp_path: Path, gate: tuple[int, int]) -> None:
    """An unmap of memory no request uses, while requests are in flight and finish within
    the grace: they complete normally after the remap."""
    rig, _device, image = rig_for(tmp_path)
    with rig:
        _, q = probe(rig)
        spare = rig.kernel.iova.alloc_coherent(4096)
        rig.transport.memory.view(spare, 16)  # the device has it mapped
        held = {read(q, GATE + 8 * k): GATE + 8 * k for k in range(4)}
        wait_in_flight(rig, 4)
        import threading

        threading.Timer(0.2, os.write, (gate[1], b"x" * 4)).start()
        assert rig.kernel.free_coherent(spare)
        for ticket, sector in held.items():
            c = q.wait(ticket, 5)
            assert c.data[-1] == vb.ReqStatus.OK
            assert c.data[:-1] == image[sector * 512 : sector * 512 + 4096]
        assert BlkDriver(rig.kernel).read(0, 512)


def test_an_unmap_under_hung_requests_fails_them_with_nothing_written(
    tmp_path: Path, gate: tuple[int, int]
) -> None:
    """Requests whose buffers, status byte included, are in memory that is unmapped while
    they hang past the grace: they complete with a used length of 0 (their IOERR went to
    fenced pages: a length of 1 would make the driver read a stale status), and nothing
    reaches that memory."""
    rig, _, image = rig_for(tmp_path, msg_timeout=1.0)
    with rig:
        _, q = probe(rig)
        ring = q.ring
        assert isinstance(ring, DriverSplitRing)
        carved = CoherentArena(rig.kernel.iova)
        saved, ring.arena = ring.arena, carved  # type: ignore[assignment]
        try:
            c = q.wait(read(q, 8), 5)  # maps the region (Python) and tells the engine
            assert c.data[:-1] == image[8 * 512 : 8 * 512 + 4096]
            held = [read(q, GATE + 8 * k) for k in range(4)]
        finally:
            ring.arena = saved
        wait_in_flight(rig, 4)
        buffers = [w for _, (_, wbufs, _, _) in ring.pending.items() for w in wbufs]
        before = [rig.kernel.iova.read(a, n) for a, n in buffers]
        assert rig.kernel.free_coherent(carved.base)
        assert not rig.kernel.broken  # answered within the kernel's msg_timeout
        os.write(gate[1], b"x" * 4)
        for ticket in held:
            assert q.wait(ticket, 5).length == 0
        assert [rig.kernel.iova.read(a, n) for a, n in buffers] == before
        assert BlkDriver(rig.kernel).read(0, 512)
