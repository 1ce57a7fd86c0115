"""For tests of devices and backends: the model rig and the model's drivers.

``ModelRig`` serves a device on the in-process model of VDUSE's kernel half (no root, no
kernel module, milliseconds); ``BlkDriver`` is a small virtio-blk driver for it, whose
``read``/``write``/``flush``/``discard``/``write_zeroes``/``get_id`` read like using a disk,
``NetDriver`` a virtio-net one (``send``, ``receive`` frames), ``FramePipe`` a network
backend the test holds the other end of (served by the native data path as a TAP is),
``FuseDriver`` FUSE requests to a filesystem's session as the kernel's virtiofs sends them, and
``VirtioDriver`` the generic driver under them (feature negotiation, queues) for devices of
other types. The block
drivers also drive a real device bound to vhost_vdpa through ``VhostVdpa``
(``/dev/vhost-vdpa-N`` from this process, with memory of its own, as a VMM would). This
package sits above the runtime: nothing in pyvduse itself imports it.
"""

from __future__ import annotations

from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.model.net_driver import NetDriver
from pyvduse.model.vhost_vdpa import VhostVdpa
from pyvduse.model.virtio_driver import ProbeError, VirtioDriver
from pyvduse.testing.frame_pipe import FramePipe
from pyvduse.testing.fuse_client import Driver as FuseDriver
from pyvduse.testing.rig import ModelRig

__all__ = [
    "BlkDriver",
    "BlkIOError",
    "FramePipe",
    "FuseDriver",
    "ModelRig",
    "NetDriver",
    "ProbeError",
    "VhostVdpa",
    "VirtioDriver",
]
