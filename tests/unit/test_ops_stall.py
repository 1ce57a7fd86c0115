"""A stalled backend stalls its own requests, not the management socket nor the control path.

No timing is asserted: a reply "during the stall" is one that arrives while the stalled read
is still inside the backend (``StallingFile.returned`` unset), which it leaves only when the
test releases it (or after a minute); every wait has a generous timeout that only a hang hits."""

from __future__ import annotations

import threading
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
        self.returned = threading.Event()  # a stalled read left the backend

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        if self.stall.is_set():
            self.entered.set()
            self.release.wait(STALL_SECONDS)
            self.returned.set()
        super().readv(offset, bufs)


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
            # the management socket answers while the read is stuck
            reply = request(ops.control_path, {"cmd": "status"}, timeout=20.0)
            q0 = reply["result"]["queues"][0]
            assert q0["in_flight"] == 1 and q0["pending"] == 0
            reply = request(ops.control_path, {"cmd": "stats"}, timeout=20.0)
            assert reply["result"]["total"]["in_flight"] == 1
            assert not backend.returned.is_set()
            # a config change goes through while the queue is stuck
            reply = request(ops.control_path, {"cmd": "resize", "size": "8M"}, timeout=20.0)
            assert reply["result"]["changed"]
            assert drv.capacity == 8 * MiB and drv.virtio.config_changes == 1
            # the kernel's control messages are answered (not timed out: broken) meanwhile
            assert rig.kernel.get_vq_state(0) == (2,)  # the write and the stuck read
            status = rig.kernel.get_status()
            rig.kernel.set_status(status | Status.DEVICE_NEEDS_RESET)
            assert not rig.kernel.broken
            assert not backend.returned.is_set()
            # draining gives up after its timeout and says how many did not finish
            assert drain(rig.server, 0.3) == 1
            assert not backend.returned.is_set()
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
    # the drain may wait longer than the stall lasts: only the release (then the abort) ends it
    with served(sock_dir, BlkDevice(backend), drain_timeout=2 * STALL_SECONDS) as (_rig, drv, ops, _):
        assert drv is not None
        backend.stall.set()
        q = drv.virtio.queues[0]
        head = q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [512, 1])
        assert backend.entered.wait(5)
        threading.Timer(0.3, backend.release.set).start()
        assert ops.shutdown() == 0  # it waited for the read ...
        assert backend.returned.is_set()  # ... which the release ended
        assert ops.target.state == "stopping"
        assert q.wait(head, timeout=5).data[-1] == vb.ReqStatus.OK
        # an abort (a second SIGTERM) ends the wait at once
        backend.release.clear()
        backend.entered.clear()
        backend.returned.clear()
        head = q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [512, 1])
        assert backend.entered.wait(5)
        abort = threading.Event()
        threading.Timer(0.2, abort.set).start()
        assert ops.shutdown(abort=abort) == 1
        assert not backend.returned.is_set()  # the abort ended the wait, not the read
        backend.release.set()
        q.wait(head, timeout=5)
    backend.close()
