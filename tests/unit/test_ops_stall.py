"""A stalled backend stalls its own requests, not the management socket nor the control path."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import Status
from pyvduse.backend.file import FileBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.ops.client import request
from pyvduse.ops.drain import drain
from tests.unit.test_ops_socket import served, short_dir

sock_dir = pytest.fixture(name="sock_dir")(short_dir)

MiB = 1 << 20
STALL_SECONDS = 60.0  # how long a read hangs unless the test releases it


class StallingFile(FileBackend):
    """Reads hang (up to a minute) while ``stall`` is set, like a dead NFS server."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.stall = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        if self.stall.is_set():
            self.entered.set()
            self.release.wait(STALL_SECONDS)
        super().readv(offset, bufs)


def timed(fn: object, *args: object, **kw: object) -> tuple[object, float]:
    start = time.monotonic()
    result = fn(*args, **kw)  # type: ignore[operator]
    return result, time.monotonic() - start


def test_socket_and_control_messages_answer_during_a_stall(sock_dir: Path) -> None:
    img = sock_dir / "s.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    backend = StallingFile(str(img))
    device = BlkDevice(backend)
    with served(sock_dir, device) as (rig, drv, ops, _):
        assert drv is not None
        drv.write(0, b"s" * 4096)
        backend.stall.set()
        q = drv.virtio.queues[0]
        head = q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [4096, 1])
        assert backend.entered.wait(5), "the read never reached the backend"
        try:
            # the management socket
            reply, took = timed(request, ops.control_path, {"cmd": "status"}, timeout=1.0)
            assert took < 1.0
            q0 = reply["result"]["queues"][0]  # type: ignore[index]
            assert q0["in_flight"] == 1 and q0["pending"] == 0
            reply, took = timed(request, ops.control_path, {"cmd": "stats"}, timeout=1.0)
            assert took < 1.0 and reply["result"]["total"]["in_flight"] == 1  # type: ignore[index]
            # a config change goes through while the queue is stuck
            reply, took = timed(request, ops.control_path, {"cmd": "resize", "size": "8M"}, timeout=2.0)
            assert reply["result"]["changed"] and took < 2.0  # type: ignore[index]
            assert drv.capacity == 8 * MiB and drv.virtio.config_changes == 1
            # the kernel's control messages
            state, took = timed(rig.kernel.get_vq_state, 0)
            assert state == (2,) and took < 1.0  # the write and the stuck read
            status = rig.kernel.get_status()
            _, took = timed(rig.kernel.set_status, status | Status.DEVICE_NEEDS_RESET)
            assert took < 1.0 and not rig.kernel.broken
            # draining gives up after its timeout and says how many did not finish
            left, took = timed(drain, rig.server, 0.3)
            assert left == 1 and 0.3 <= took < 1.5
            assert q.ring.collect() == []  # still stuck
        finally:
            backend.release.set()
        done = q.wait(head, timeout=5)
        assert done.data[:4096] == b"s" * 4096 and done.data[-1] == vb.ReqStatus.OK
        assert drain(rig.server, 1.0) == 0
        s = request(ops.control_path, {"cmd": "stats"})["result"]
        assert s["total"]["in_flight"] == 0
        assert s["total"]["latency"]["buckets"][-1][1] >= 1  # the slow read, in a high bucket
        assert s["total"]["latency"]["buckets"][-1][0] >= 100_000
    backend.close()


def test_shutdown_drain_waits_for_the_request_in_flight(sock_dir: Path) -> None:
    img = sock_dir / "t.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
    backend = StallingFile(str(img))
    with served(sock_dir, BlkDevice(backend), drain_timeout=10.0) as (_rig, drv, ops, _):
        assert drv is not None
        backend.stall.set()
        q = drv.virtio.queues[0]
        head = q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [512, 1])
        assert backend.entered.wait(5)
        threading.Timer(0.3, backend.release.set).start()
        left, took = timed(ops.shutdown)
        assert left == 0 and 0.2 < took < 5
        assert ops.target.state == "stopping"
        assert q.wait(head, timeout=5).data[-1] == vb.ReqStatus.OK
        # an abort (a second SIGTERM) ends the wait at once
        backend.release.clear()
        backend.entered.clear()
        head = q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [512, 1])
        assert backend.entered.wait(5)
        abort = threading.Event()
        threading.Timer(0.2, abort.set).start()
        left, took = timed(ops.shutdown, abort=abort)
        assert left == 1 and took < 2
        backend.release.set()
        q.wait(head, timeout=5)
    backend.close()
