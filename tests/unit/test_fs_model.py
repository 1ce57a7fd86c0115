"""A virtio-fs device on the model (as Linux 6.15+ allows it), served by the Python ring
engine: FUSE requests on a request queue complete out of order through the thread pool,
FORGETs on the high-priority queue get no reply."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

from pyvduse.abi import fuse
from pyvduse.device.fs import FsDevice
from pyvduse.fs.passthrough import Passthrough
from pyvduse.model.virtio_driver import DriverQueue, VirtioDriver
from pyvduse.runtime.tuning import DataPath
from pyvduse.testing.rig import ModelRig

unique = iter(range(2, 1 << 30, 2))


def request(q: DriverQueue, opcode: int, nodeid: int, body: bytes, reply: int = 4096) -> int:
    hdr = fuse.IN_HEADER.pack(40 + len(body), opcode, next(unique), nodeid, 0, 0, 1, 0, 0)
    return q.submit([hdr, body] if body else [hdr], [16, reply] if reply else [16])


def reply(q: DriverQueue, ticket: int) -> tuple[int, bytes]:
    c = q.wait(ticket)
    length, error, _ = fuse.OUT_HEADER.unpack(c.data[:16])
    assert c.length == length
    return error, c.data[16:length]


def test_fuse_over_the_model(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    fs = Passthrough(tmp_path)
    dev = FsDevice(fs, "modelfs", request_queues=2, queue_size=64)
    with ModelRig(dev, data_path=DataPath.PYTHON) as rig:
        drv = VirtioDriver(rig.kernel)
        drv.probe()
        assert rig.kernel.get_config(0, 40) == fuse.fs_config("modelfs", 2)
        hi, q1, q2 = drv.queues
        init = fuse.INIT_IN.pack(7, 41, 65536, fuse.INIT_EXT, 0, *[0] * 11)
        error, data = reply(q1, request(q1, fuse.Opcode.INIT, 0, init))
        assert error == 0 and fuse.INIT_OUT.unpack(data)[:2] == (7, 38)
        # Many lookups in flight on two queues at once, collected in reverse order.
        tickets = [(q, request(q, fuse.Opcode.LOOKUP, 1, b"f\0")) for q in (q1, q2) * 8]
        nodeids = set()
        for q, t in reversed(tickets):
            error, data = reply(q, t)
            assert error == 0
            nodeids.add(fuse.ENTRY_OUT.unpack(data)[0])
        assert len(nodeids) == 1 and fs.inode_count() == 2
        (ino,) = nodeids
        # FORGET on the high-priority queue: no reply, the inode goes once all are forgotten.
        c = hi.wait(
            hi.submit(
                [fuse.IN_HEADER.pack(48, fuse.Opcode.FORGET, 0, ino, 0, 0, 0, 0, 0), struct.pack("<Q", 16)],
                [],
            )
        )
        assert c.length == 0
        assert fs.inode_count() == 1
        # A request too short for a header completes with nothing; the queue goes on.
        assert q1.wait(q1.submit([b"short"], [16])).length == 0
        error, _ = reply(q1, request(q1, fuse.Opcode.GETATTR, ino, fuse.GETATTR_IN.pack(0, 0, 0)))
        assert error == -errno.ESTALE  # forgotten
        error, data = reply(q1, request(q1, fuse.Opcode.STATFS, 1, b""))
        assert error == 0 and len(data) == fuse.KSTATFS.size
        drv.remove()
    fs.close()
