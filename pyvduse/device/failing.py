"""A stand-in device that fails every request: used to detach an orphaned device cleanly.

When a daemon died, detaching its device makes the driver flush and reset it; someone must
answer both the control messages and the data path, or the kernel waits (and the driver's
remove path hangs). This device answers every request with an I/O error.
"""

from __future__ import annotations

from pyvduse.abi import virtio_blk as vb
from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
from pyvduse.ring.chain import Chain


class FailingDevice(VirtioDevice):
    """Accepts any features; completes every request with IOERR in its last writable byte."""

    def __init__(self, device_id: int, num_queues: int, queue_size: int) -> None:
        super().__init__()
        self._spec = DeviceSpec(device_id, REQUIRED_FEATURES, b"", num_queues, queue_size)

    def spec(self) -> DeviceSpec:
        return self._spec

    def accept_features(self, features: int) -> bool:
        return True

    def handle(self, queue: int, chain: Chain) -> int:
        if chain.error is None and chain.writable:
            last = chain.writable[-1]
            last[len(last) - 1] = vb.ReqStatus.IOERR
            return 1
        return 0
