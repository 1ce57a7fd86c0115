"""pyvduse: userspace virtio devices for Linux, served through VDUSE.

The names below are the public API; everything else (``pyvduse.ring``, ``pyvduse.runtime``,
``pyvduse.transport``, ...) is internal and may change. A device is a ``VirtioDevice`` (or a
``BlkDevice`` over a ``Backend``); a ``Daemon`` serves it on the real kernel or on the
in-process model; ``pyvduse.testing`` has the model rig and the model drivers for tests.

Names are imported on first use, so ``import pyvduse`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    # devices and the request contract
    "VirtioDevice": "pyvduse.device.base",
    "DeviceSpec": "pyvduse.device.base",
    "Request": "pyvduse.device.request",
    "Chain": "pyvduse.ring.chain",
    "BlkDevice": "pyvduse.device.blk",
    "BlkOptions": "pyvduse.device.blk",
    "NetDevice": "pyvduse.device.net",
    "NetOptions": "pyvduse.device.net",
    "FsDevice": "pyvduse.device.fs",
    # a device from scratch: its id, and the features every device offers
    "DeviceId": "pyvduse.abi.virtio",
    "REQUIRED_FEATURES": "pyvduse.device.base",
    # backends
    "Backend": "pyvduse.backend.base",
    "LaterBackend": "pyvduse.backend.base",
    "FileBackend": "pyvduse.backend.file",
    "MemoryBackend": "pyvduse.backend.memory",
    "NullBackend": "pyvduse.backend.null",
    "NetBackend": "pyvduse.backend.net_base",
    "PacketQueueBackend": "pyvduse.backend.packet_queue",
    # serving
    "Daemon": "pyvduse.daemon",
    "check_kernel": "pyvduse.daemon",
    "NetDaemon": "pyvduse.netdaemon",
    "serve_device": "pyvduse.netdaemon",
    "FsDaemon": "pyvduse.fsdaemon",
    "parse_size": "pyvduse.sizes",
    "QueueTuning": "pyvduse.runtime.tuning",
    "DataPath": "pyvduse.runtime.tuning",
    "Aio": "pyvduse.runtime.tuning",
    "OpsOptions": "pyvduse.ops.service",
    # tests on the model
    "ModelRig": "pyvduse.testing",
    "BlkDriver": "pyvduse.testing",
    "BlkIOError": "pyvduse.testing",
    # errors
    "PyvduseError": "pyvduse.errors",
    "ConfigError": "pyvduse.errors",
    "MissingDependency": "pyvduse.errors",
    "KernelMissing": "pyvduse.errors",
    "AccessDenied": "pyvduse.errors",
    "DeviceError": "pyvduse.errors",
    "NameTaken": "pyvduse.errors",
    "NoSuchDevice": "pyvduse.errors",
    "DeviceBusy": "pyvduse.errors",
    "DeviceBroken": "pyvduse.errors",
    "KernelRefused": "pyvduse.errors",
    "StateMismatch": "pyvduse.errors",
    "UserError": "pyvduse.errors",
    "NetConfigError": "pyvduse.device.net",
    "BlkConfigError": "pyvduse.device.blk",
    "RequestError": "pyvduse.device.request",
    "RingError": "pyvduse.ring.errors",
}

__all__ = [
    "REQUIRED_FEATURES",
    "AccessDenied",
    "Aio",
    "Backend",
    "BlkConfigError",
    "BlkDevice",
    "BlkDriver",
    "BlkIOError",
    "BlkOptions",
    "Chain",
    "ConfigError",
    "Daemon",
    "DataPath",
    "DeviceBroken",
    "DeviceBusy",
    "DeviceError",
    "DeviceId",
    "DeviceSpec",
    "FileBackend",
    "FsDaemon",
    "FsDevice",
    "KernelMissing",
    "KernelRefused",
    "LaterBackend",
    "MemoryBackend",
    "MissingDependency",
    "ModelRig",
    "NameTaken",
    "NetBackend",
    "NetConfigError",
    "NetDaemon",
    "NetDevice",
    "NetOptions",
    "NoSuchDevice",
    "NullBackend",
    "OpsOptions",
    "PacketQueueBackend",
    "PyvduseError",
    "QueueTuning",
    "Request",
    "RequestError",
    "RingError",
    "StateMismatch",
    "UserError",
    "VirtioDevice",
    "__version__",
    "check_kernel",
    "parse_size",
    "serve_device",
]

if TYPE_CHECKING:
    from pyvduse.abi.virtio import DeviceId
    from pyvduse.backend.base import Backend, LaterBackend
    from pyvduse.backend.file import FileBackend
    from pyvduse.backend.memory import MemoryBackend
    from pyvduse.backend.net_base import NetBackend
    from pyvduse.backend.null import NullBackend
    from pyvduse.backend.packet_queue import PacketQueueBackend
    from pyvduse.daemon import Daemon, check_kernel
    from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
    from pyvduse.device.blk import BlkConfigError, BlkDevice, BlkOptions
    from pyvduse.device.fs import FsDevice
    from pyvduse.device.net import NetConfigError, NetDevice, NetOptions
    from pyvduse.device.request import Request, RequestError
    from pyvduse.errors import (
        AccessDenied,
        ConfigError,
        DeviceBroken,
        DeviceBusy,
        DeviceError,
        KernelMissing,
        KernelRefused,
        MissingDependency,
        NameTaken,
        NoSuchDevice,
        PyvduseError,
        StateMismatch,
        UserError,
    )
    from pyvduse.fsdaemon import FsDaemon
    from pyvduse.netdaemon import NetDaemon, serve_device
    from pyvduse.ops.service import OpsOptions
    from pyvduse.ring.chain import Chain
    from pyvduse.ring.errors import RingError
    from pyvduse.runtime.tuning import Aio, DataPath, QueueTuning
    from pyvduse.sizes import parse_size
    from pyvduse.testing import BlkDriver, BlkIOError, ModelRig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvduse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # next time without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
