"""Choosing which vdpa bus driver takes a new device: virtio_vdpa or vhost_vdpa.

The vdpa bus offers a new device to every loaded driver and the first one wins, so with
both modules loaded the module loaded first would take every device. To give a device to
the driver the user asked for, and to no other even for a moment (virtio_vdpa would create
a host ``/dev/vdX`` that udev and LVM scan, for a disk meant for a VM), the device is added
with the bus's autoprobe switched off, marked with ``driver_override`` and then bound
explicitly. The autoprobe switch is the bus's, for every device: pyvduse daemons hold an
exclusive lock on it (``flock``) while it is off, for the few milliseconds of an add, so
they never race each other; another tool adding a vdpa device in that window would find it
unbound (and could bind it with ``drivers_probe``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pyvduse.transport.kernel import sysfs

#: ``--bind`` names and the vdpa bus driver each stands for.
DRIVERS = {"virtio": "virtio_vdpa", "vhost": "vhost_vdpa"}
MODULE_HINT = {"virtio_vdpa": "a host block device", "vhost_vdpa": "a VM (/dev/vhost-vdpa-N)"}


class BindError(OSError):
    """The device could not be given to the wanted driver."""


@contextlib.contextmanager
def autoprobe_off(bus: Path = sysfs.VDPA_BUS) -> Iterator[bool]:
    """While inside, devices added to the bus are not bound to any driver. Yields False
    (and changes nothing) on a kernel without the switch; restores it on the way out."""
    switch = bus / "drivers_autoprobe"
    try:
        fd = os.open(switch, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # other pyvduse daemons wait here
        before = os.pread(fd, 16, 0).strip() or b"1"
        os.pwrite(fd, b"0", 0)
        try:
            yield True
        finally:
            os.pwrite(fd, before, 0)
    finally:
        os.close(fd)  # releases the lock


def reserve(name: str, driver: str, bus: Path = sysfs.VDPA_BUS) -> bool:
    """Mark device ``name`` for ``driver`` only (``driver_override``); False on a kernel
    without it."""
    override = bus / "devices" / name / "driver_override"
    if not override.exists():
        return False
    override.write_text(driver)
    return True


def bind(name: str, driver: str, bus: Path = sysfs.VDPA_BUS) -> None:
    """Bind the unbound device ``name`` to ``driver`` (its probe runs now)."""
    try:
        (bus / "drivers" / driver / "bind").write_text(name)
    except OSError as e:
        raise BindError(e.errno, f"{driver} refused device '{name}': {e.strerror}") from None


def wrong_driver(name: str, driver: str, bus: Path = sysfs.VDPA_BUS) -> str | None:
    """The driver other than ``driver`` that holds ``name``, if one does."""
    link = bus / "devices" / name / "driver"
    try:
        bound = Path(os.readlink(link)).name
    except OSError:
        return None
    return None if bound == driver else bound
