"""What every virtio device gives the transports, and what it is given back.

A device describes itself once (``DeviceSpec``: id, offered features, initial config space,
queue count and size), agrees or not to the negotiated features, and turns each request
(a validated ``Chain``) into bytes written. It never sees file descriptors, threads or which
transport it runs on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from pyvduse.abi.virtio import F_ACCESS_PLATFORM, F_VERSION_1, bit
from pyvduse.ring.chain import Chain

#: Transport features every pyvduse device requires (VDUSE refuses devices without
#: ACCESS_PLATFORM; VERSION_1 gives little-endian rings and config).
REQUIRED_FEATURES = bit(F_VERSION_1) | bit(F_ACCESS_PLATFORM)


@dataclass(frozen=True)
class DeviceSpec:
    """The fixed identity a transport needs to create the device."""

    device_id: int
    features: int
    config: bytes
    num_queues: int
    queue_size: int
    vendor_id: int = 0


ConfigWriter = Callable[[int, bytes], None]


class VirtioDevice(ABC):
    """Base class of device models."""

    def __init__(self) -> None:
        self.features = 0
        self._config_writer: ConfigWriter | None = None

    @abstractmethod
    def spec(self) -> DeviceSpec:
        """The device's identity; called once before creation."""

    def accept_features(self, features: int) -> bool:
        """Whether the driver's choice is acceptable (answering FEATURES_OK)."""
        offered = self.spec().features
        return features & ~offered == 0 and features & REQUIRED_FEATURES == REQUIRED_FEATURES

    def start(self, features: int) -> None:
        """DRIVER_OK: the negotiated features are final."""
        self.features = features

    def reset(self) -> None:
        """The driver reset the device: forget negotiated state."""
        self.features = 0

    @abstractmethod
    def handle(self, queue: int, chain: Chain) -> int:
        """Serve one request; returns the number of bytes written to writable buffers."""

    def bind_config_writer(self, writer: ConfigWriter | None) -> None:
        """The transport's way to push config-space changes (set config + config IRQ)."""
        self._config_writer = writer

    def update_config(self, offset: int, data: bytes) -> None:
        if self._config_writer is None:
            raise RuntimeError("device is not attached to a transport")
        self._config_writer(offset, data)
