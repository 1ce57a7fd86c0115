"""Putting a device on the model in one line: kernel + transport + runtime."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from pyvduse.device.base import VirtioDevice
from pyvduse.ops.inspect import stats
from pyvduse.ops.target import Target
from pyvduse.runtime.server import DeviceServer
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.transport.model.kernel import ModelKernel
from pyvduse.transport.model.transport import ModelTransport


class ModelRig:
    """A device served on the model, ready for a model driver to probe."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        msg_timeout: float = 5.0,
        bounce_size: int = 16 << 20,
        data_path: DataPath = DataPath.AUTO,
        tuning: QueueTuning | None = None,
    ) -> None:
        self.device = device
        self.kernel = ModelKernel(device.spec(), msg_timeout=msg_timeout, bounce_size=bounce_size)
        # data_path alone is the common case; a whole tuning wins when given
        self.server = DeviceServer(device, tuning=tuning or QueueTuning(data_path=data_path))
        self.transport = ModelTransport(self.kernel, self.server)
        self.server.bind(self.transport)

    def stats(self) -> dict[str, Any]:
        """The device's counters as ``pyvduse ctl NAME stats`` shows them."""
        return stats(Target("model", self.server, self.transport))

    def __enter__(self) -> ModelRig:
        self.transport.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.transport.close()
        self.server.close_hooks()
