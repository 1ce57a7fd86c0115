"""A ``Daemon`` for virtio-fs: ready once the guest-side driver can mount the tag.

Bound to virtio_vdpa, a virtio-fs device has no node: it is ready when Linux's virtiofs
driver has bound it (``mount -t virtiofs TAG DIR`` then works); bound to vhost_vdpa, when
/dev/vhost-vdpa-N exists, as for any device. A restarted daemon cannot resume a mount (the
kernel's inode numbers and open handles lived in the dead daemon), so an ``FsDaemon``
never resumes: a device left behind must be unmounted and destroyed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pyvduse.daemon import Daemon, check_kernel
from pyvduse.device.fs import FsDevice
from pyvduse.errors import KernelMissing, NoSuchDevice
from pyvduse.transport.kernel import sysfs

#: Where the virtiofs driver shows up once registered (loaded, or built in: a built-in
#: driver may have no /sys/module entry).
VIRTIOFS_DRIVER = Path("/sys/bus/virtio/drivers/virtiofs")


class FsDaemon(Daemon):
    """Serves an ``FsDevice``; ``node`` is ``virtiofs:TAG`` (or /dev/vhost-vdpa-N)."""

    def __init__(self, device: FsDevice, name: str, **options: object) -> None:
        options.setdefault("state_dir", None)
        options["resume"] = False
        super().__init__(device, name, **options)  # type: ignore[arg-type]
        self.fs_device = device

    def _wait_for_node(self) -> str:
        if self.bind != "virtio":
            return super()._wait_for_node()
        deadline = time.monotonic() + self.node_timeout
        while time.monotonic() < deadline and not self._stop_requested.is_set():
            if "virtiofs" in sysfs.virtio_drivers(self.name):
                return f"virtiofs:{self.fs_device.tag}"
            time.sleep(0.05)
        if self._stop_requested.is_set() or self.broken is not None:
            return super()._wait_for_node()  # says why
        raise NoSuchDevice(
            self.name,
            f"the virtiofs driver did not bind '{self.name}' within {self.node_timeout:.0f} s: "
            "check 'dmesg' for driver errors",
        )


def preflight(bind: str) -> None:
    """KernelMissing unless VDUSE (and, for a local mount, virtiofs) is there."""
    check_kernel(bind)
    if bind == "virtio" and not VIRTIOFS_DRIVER.exists():
        raise KernelMissing("the virtiofs module is not loaded: run 'modprobe virtiofs'")


def announce(daemon: Daemon) -> None:
    """The one line scripts wait for (flushed: they read it through a pipe)."""
    assert isinstance(daemon.device, FsDevice)
    extra = f" dev={daemon.node}" if daemon.bind != "virtio" else ""
    sys.stdout.write(f"READY name={daemon.name} tag={daemon.device.tag}{extra}\n")
    sys.stdout.flush()
