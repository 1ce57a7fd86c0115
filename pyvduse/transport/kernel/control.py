"""``/dev/vduse/control``: creating and destroying VDUSE devices, with errors users can act on."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from pyvduse.abi import vduse as v
from pyvduse.abi.virtio import DeviceId
from pyvduse.errors import AccessDenied, KernelMissing, KernelRefused, NameTaken
from pyvduse.transport.kernel import sysfs

_U64 = struct.Struct("<Q")


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
    """An open control fd, set to the newest API version both the kernel and this library
    speak (``api_version``: 1 on Linux 7.x, 0 before), with the VDUSE control features the
    kernel offers (``vduse_features``, VDUSE_GET_FEATURES: 0 before 7.x).

    On 5.15-6.1x VDUSE_GET_API_VERSION reports the fd's version, which starts at 0; on 7.x
    it reports the kernel's newest (and sets the fd to it). Either way the answer, capped at
    what we speak, is set explicitly: a device created on this fd gets that version.
    """

    def __init__(self, api_version: int | None = None) -> None:
        """``api_version``: insist on that version (EINVAL from the kernel if it has not
        got it) instead of choosing."""
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
            if api_version is None:
                api_version = min(self._ioctl_u64(v.VDUSE_GET_API_VERSION), v.API_VERSION_MAX)
            fcntl.ioctl(self.fd, v.VDUSE_SET_API_VERSION, bytearray(_U64.pack(api_version)))
            self.api_version = api_version
            self.vduse_features = self._kernel_features()
        except OSError:
            os.close(self.fd)
            raise

    def _ioctl_u64(self, request: int) -> int:
        buf = bytearray(_U64.size)
        fcntl.ioctl(self.fd, request, buf)
        return int(_U64.unpack(buf)[0])

    def _kernel_features(self) -> int:
        """VDUSE_GET_FEATURES; 0 on kernels without it (they answer an unknown control
        ioctl with EINVAL)."""
        try:
            return self._ioctl_u64(v.VDUSE_GET_FEATURES)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                return 0
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
            if e.errno == errno.EINVAL and config.device_id == DeviceId.FS:
                raise KernelRefused(
                    config.name,
                    f"this kernel ({os.uname().release}) refuses virtio-fs devices (device id 26) "
                    "over VDUSE: they need Linux 6.15 or later (the test VM: --kernel 7.3)",
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
