"""The model's driver asks for its interrupts with EVENT_IDX as Linux does (used_event), so
``DriverQueue.wait`` is woken by the device and never falls back to its timed poll in steady
state. Checked as a count of polls, never as a time."""

from __future__ import annotations

import threading

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_PACKED, bit
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.runtime.tuning import DataPath
from pyvduse.testing.rig import ModelRig

ROUNDS, DEPTH = 6, 32


class CountingEvent(threading.Event):
    """An Event that counts the waits that ended without it being set."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts = 0

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        if not woken:
            self.timeouts += 1
        return woken


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("data_path", [DataPath.PYTHON, DataPath.AUTO])
def test_rounds_of_reads_are_woken_by_interrupts_not_polls(packed: bool, data_path: DataPath) -> None:
    device = BlkDevice(MemoryBackend(1 << 20), BlkOptions(packed=packed))
    with ModelRig(device, data_path=data_path) as rig:
        drv = BlkDriver(rig.kernel)
        assert drv.virtio.features & bit(F_RING_EVENT_IDX)
        assert bool(drv.virtio.features & bit(F_RING_PACKED)) == packed
        q = drv.virtio.queues[0]
        irq = q.irq = CountingEvent()
        for _ in range(ROUNDS):
            tickets = [
                q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, s)], [512, 1], indirect=True) for s in range(DEPTH)
            ]
            for t in tickets:
                assert q.wait(t).data[-1] == vb.ReqStatus.OK
    # every round waits at least once: a poll each would be ROUNDS; a loaded machine may
    # let one wait time out now and then, never one per round
    assert irq.timeouts <= 1, f"{irq.timeouts} waits timed out in {ROUNDS} rounds"
