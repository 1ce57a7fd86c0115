"""The guide's asyncio example: one queue keeps many slow reads waiting at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from laggy_blk import LaggyBackend

from pyvduse.abi import virtio_blk as vb
from pyvduse.device.blk import BlkDevice
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.testing.rig import ModelRig


def test_slow_reads_of_one_queue_wait_together() -> None:
    backend = LaggyBackend(1 << 20, delay=0.05)
    data = os.urandom(32 * 512)
    backend.writev(0, [memoryview(data)])
    with ModelRig(BlkDevice(backend)) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        tickets = [
            q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, s)], [512, 1], indirect=True) for s in range(32)
        ]
        for s, t in enumerate(tickets):
            c = q.wait(t, 10)
            assert c.data == data[s * 512 : (s + 1) * 512] + bytes([vb.ReqStatus.OK])
    assert backend.most_waiting > 16  # a one-at-a-time queue would have had 1
