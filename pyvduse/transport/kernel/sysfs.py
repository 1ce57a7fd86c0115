"""The sysfs and /dev paths of VDUSE and vdpa devices, and small readers for them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DEV_VDUSE = Path("/dev/vduse")
CONTROL = DEV_VDUSE / "control"
CLASS_VDUSE = Path("/sys/class/vduse")
MODULE_VDUSE = Path("/sys/module/vduse")
VDPA_BUS = Path("/sys/bus/vdpa")
VDPA_DEVICES = VDPA_BUS / "devices"
VDPA_DRIVERS = VDPA_BUS / "drivers"
CPUS_ONLINE = Path("/sys/devices/system/cpu/online")
PROC = Path("/proc")


def device_node(name: str) -> Path:
    return DEV_VDUSE / name


def vduse_attr(name: str, attr: str) -> Path:
    return CLASS_VDUSE / name / attr


def vq_attr(name: str, index: int, attr: str) -> Path:
    """A per-queue attribute: /sys/class/vduse/NAME/vqN/ATTR (e.g. irq_cb_affinity)."""
    return CLASS_VDUSE / name / f"vq{index}" / attr


def online_cpus_text() -> str:
    """The online CPUs as the kernel lists them ("0-3,6"); this process's CPUs if unknown."""
    try:
        return CPUS_ONLINE.read_text().strip()
    except OSError:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def write_attr(path: Path, value: str) -> None:
    path.write_text(value)


def vdpa_drivers() -> list[str]:
    """The vdpa bus drivers loaded (virtio_vdpa, vhost_vdpa)."""
    try:
        return sorted(os.listdir(VDPA_DRIVERS))
    except FileNotFoundError:
        return []


def bound_driver(name: str) -> str | None:
    """Which vdpa driver bound device ``name``, if any."""
    link = VDPA_DEVICES / name / "driver"
    try:
        return Path(os.readlink(link)).name
    except OSError:
        return None


def _virtio_children(name: str, kind: str) -> list[str]:
    """What the virtio driver bound to vdpa device ``name`` made, by class (``block``,
    ``net``)."""
    out = []
    for virtio in (VDPA_DEVICES / name).glob("virtio*"):
        d = virtio / kind
        if d.is_dir():
            out.extend(sorted(os.listdir(d)))
    return out


def virtio_drivers(name: str) -> list[str]:
    """The drivers bound to the virtio devices virtio_vdpa made of vdpa device ``name``
    (``virtio_blk``, ``virtiofs``, ...)."""
    out = []
    for virtio in sorted((VDPA_DEVICES / name).glob("virtio*")):
        try:
            out.append(Path(os.readlink(virtio / "driver")).name)
        except OSError:
            continue
    return out


def block_devices(name: str) -> list[str]:
    """Block device names (``vda``) that virtio_vdpa created for vdpa device ``name``."""
    return _virtio_children(name, "block")


def net_interfaces(name: str) -> list[str]:
    """Network interfaces (``eth0``) that virtio_net made for vdpa device ``name``, as far
    as this network namespace sees them."""
    return _virtio_children(name, "net")


def vhost_devices(name: str) -> list[str]:
    """``vhost-vdpa-N`` char devices that vhost_vdpa created for vdpa device ``name``."""
    return sorted(p.name for p in (VDPA_DEVICES / name).glob("vhost-vdpa-*"))


def vduse_devices() -> list[str]:
    """Names of the VDUSE devices that exist."""
    try:
        return sorted(n for n in os.listdir(DEV_VDUSE) if n != "control")
    except FileNotFoundError:
        return []


def node_holders(node: str, proc: Path = PROC) -> list[int]:
    """The processes that have the character device ``node`` open (a VMM holding a
    ``/dev/vhost-vdpa-N``); empty when none does or the node is gone."""
    try:
        rdev = os.stat(node).st_rdev
    except OSError:
        return []
    name = os.path.basename(node)
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                if name not in os.readlink(fd):
                    continue
                st = os.stat(fd)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev:
                pids.append(int(entry.name))
                break
    return sorted(pids)
