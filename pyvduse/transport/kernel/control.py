"""``/dev/vduse/control``: creating and destroying VDUSE devices, with errors users can act on."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from pyvduse.abi import vduse as v
from pyvduse.errors import AccessDenied, KernelMissing, KernelRefused, NameTaken
from pyvduse.transport.kernel import sysfs


def kernel_has_vduse_module(modules_root: Path = Path("/lib/modules")) -> bool:
    """Whether ``modprobe vduse`` can work: the running kernel ships the module."""
    index = modules_root / os.uname().release / "modules.dep"
    try:
        return "/vduse.ko" in index.read_text()
    except OSError:
        return False


def missing_module_hint(modules_root: Path = Path("/lib/modules")) -> str:
    if kernel_has_vduse_module(modules_root):
        return "the vduse kernel module is not loaded: run 'modprobe vduse' as root"
    return (
        "the vduse kernel module is not loaded and this kernel does not ship it: run "
        "'modprobe vduse' on Linux 5.15+ built with CONFIG_VDPA_USER, or try pyvduse in "
        "the test VM: 'pyvduse testvm -- bash examples/quickstart.sh'"
    )


class Control:
    """An open control fd, set to API version 0 (portable from 5.15 to the newest kernel)."""

    def __init__(self) -> None:
        path = str(sysfs.CONTROL)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KernelMissing(missing_module_hint()) from None
        except PermissionError:
            raise AccessDenied(
                f"no permission to open {path}: run as root, or give your user access to it with a udev rule"
            ) from None
        try:
            fcntl.ioctl(self.fd, v.VDUSE_SET_API_VERSION, bytearray(struct.pack("<Q", v.VDUSE_API_VERSION)))
        except OSError:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, config: v.DevConfig) -> None:
        try:
            fcntl.ioctl(self.fd, v.VDUSE_CREATE_DEV, bytearray(config.pack()))
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise NameTaken(
                    config.name,
                    f"a VDUSE device named '{config.name}' already "
                    "exists: choose another name, or destroy the old one",
                    option="name",
                ) from None
            if e.errno == errno.EPERM:
                raise AccessDenied(
                    f"the kernel refused to create '{config.name}' (EPERM): network devices "
                    "need CAP_NET_ADMIN; run as root"
                ) from None
            if e.errno == errno.EINVAL:
                raise KernelRefused(
                    config.name,
                    f"the kernel refused the configuration of '{config.name}' "
                    "(EINVAL): check the device type, features and queue count this kernel "
                    "supports",
                ) from None
            raise

    def destroy(self, name: str) -> None:
        fcntl.ioctl(self.fd, v.VDUSE_DESTROY_DEV, bytearray(v.name_buffer(name)))
