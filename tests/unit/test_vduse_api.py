"""VDUSE API version 1 when the kernel has it, 0 otherwise: the control fd's negotiation
(VDUSE_GET/SET_API_VERSION, VDUSE_GET_FEATURES) and the device fd's IOTLB calls, against
fake kernels that answer as 6.12 and 7.3 do (vduse_dev.c of each, read)."""

from __future__ import annotations

import errno
import fcntl
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvduse.abi import vduse as v
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.control import Control
from pyvduse.transport.kernel.device_fd import DeviceFd

U64 = struct.Struct("<Q")
Ioctl = Callable[[int, int, bytearray], int]


class FakeControl:
    """/dev/vduse/control of a kernel whose newest API is ``newest`` (6.12: 0, and the fd
    reports its own version; 7.x: 1, and GET switches a fresh fd to it)."""

    def __init__(self, newest: int, features: int | None) -> None:
        self.newest, self.features = newest, features
        self.version: int | None = None  # not asked yet
        self.calls: list[tuple[int, int]] = []

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        if request == v.VDUSE_GET_API_VERSION:
            if self.version is None:
                self.version = self.newest if self.newest >= 1 else 0
            arg[:8] = U64.pack(self.version)
        elif request == v.VDUSE_SET_API_VERSION:
            (value,) = U64.unpack(arg)
            self.calls.append((request, value))
            if value > self.newest:
                raise OSError(errno.EINVAL, "Invalid argument")
            self.version = value
        elif request == v.VDUSE_GET_FEATURES and self.features is not None:
            arg[:8] = U64.pack(self.features)
        else:
            raise OSError(errno.EINVAL, "Invalid argument")  # unknown control ioctl
        return 0


def _control(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel: FakeControl) -> Control:
    node = tmp_path / "control"
    node.write_bytes(b"")
    monkeypatch.setattr(sysfs, "CONTROL", node)
    monkeypatch.setattr(fcntl, "ioctl", kernel.ioctl)
    return Control()


def test_linux_6_12_gets_api_0_and_no_features(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kernel = FakeControl(newest=0, features=None)
    with _control(monkeypatch, tmp_path, kernel) as ctl:
        assert (ctl.api_version, ctl.vduse_features) == (0, 0)
    assert kernel.calls == [(v.VDUSE_SET_API_VERSION, 0)]


def test_linux_7_3_gets_api_1_and_its_features(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kernel = FakeControl(newest=1, features=0x3)
    with _control(monkeypatch, tmp_path, kernel) as ctl:
        assert (ctl.api_version, ctl.vduse_features) == (1, 0x3)
        assert v.vduse_feature_names(ctl.vduse_features) == ["queue_ready", "suspend"]
    assert kernel.calls == [(v.VDUSE_SET_API_VERSION, 1)]


def test_a_newer_kernel_gets_the_newest_we_speak(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kernel = FakeControl(newest=2, features=0x7)
    with _control(monkeypatch, tmp_path, kernel) as ctl:
        assert ctl.api_version == v.API_VERSION_MAX == 1
    assert kernel.calls == [(v.VDUSE_SET_API_VERSION, 1)]


def test_an_api_version_asked_for_is_set_as_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    node = tmp_path / "control"
    node.write_bytes(b"")
    monkeypatch.setattr(sysfs, "CONTROL", node)
    kernel = FakeControl(newest=0, features=None)
    monkeypatch.setattr(fcntl, "ioctl", kernel.ioctl)
    with pytest.raises(OSError) as e:
        Control(api_version=1)  # 6.12 has no API 1
    assert e.value.errno == errno.EINVAL
    with Control(api_version=0) as ctl:
        assert ctl.api_version == 0


class FakeDevice:
    """/dev/vduse/NAME of a device created with API ``api`` (7.3: GET_FD2 only on API 1,
    ENOTTY otherwise; start > last or asid >= nas is EINVAL; reserved must be zero)."""

    def __init__(self, api: int, region: tuple[int, int] = (0, 0xFFFF), nas: int = 1) -> None:
        self.api, self.region, self.nas = api, region, nas
        self.requests: list[int] = []

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        self.requests.append(request)
        if request == v.VDUSE_IOTLB_GET_FD2:
            if self.api < 1:
                raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
            e = v.IotlbEntryV2.unpack(bytes(arg))
            if any(struct.unpack_from("<11I", arg, 36)):
                raise OSError(errno.EINVAL, "reserved")
            asid = e.asid
        elif request == v.VDUSE_IOTLB_GET_FD:
            e1 = v.IotlbEntry.unpack(bytes(arg))
            e, asid = v.IotlbEntryV2(e1.offset, e1.start, e1.last, e1.perm, 0), 0
        else:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        if (
            e.start > e.last
            or asid >= self.nas
            or not (self.region[0] <= e.last and e.start <= self.region[1])
        ):
            raise OSError(errno.EINVAL, "Invalid argument")
        out = v.IotlbEntryV2(0x1000, *self.region, v.VDUSE_ACCESS_RW, asid)
        arg[:] = out.pack()[: len(arg)]
        return 42  # the new fd


@pytest.mark.parametrize("api", [0, 1])
def test_iotlb_get_fd_uses_get_fd2_on_api_1(monkeypatch: pytest.MonkeyPatch, api: int) -> None:
    dev = FakeDevice(api)
    monkeypatch.setattr(fcntl, "ioctl", dev.ioctl)
    entry, fd = DeviceFd(-1, api).iotlb_get_fd(0x10, 0x10)
    assert (entry, fd) == (v.IotlbEntry(0x1000, 0, 0xFFFF, v.VDUSE_ACCESS_RW), 42)
    assert dev.requests == [v.VDUSE_IOTLB_GET_FD2 if api else v.VDUSE_IOTLB_GET_FD]


def test_iotlb_get_fd_names_the_address_space(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = FakeDevice(1, nas=2)
    monkeypatch.setattr(fcntl, "ioctl", dev.ioctl)
    assert DeviceFd(-1, 1).iotlb_get_fd(0, 0, asid=1)[1] == 42
    with pytest.raises(OSError):
        DeviceFd(-1, 1).iotlb_get_fd(0, 0, asid=2)
    with pytest.raises(ValueError, match="API-0"):
        DeviceFd(-1, 0).iotlb_get_fd(0, 0, asid=1)


@pytest.mark.parametrize("api", [0, 1])
def test_probe_api_version_of_a_device_taken_over(monkeypatch: pytest.MonkeyPatch, api: int) -> None:
    dev = FakeDevice(api)
    monkeypatch.setattr(fcntl, "ioctl", dev.ioctl)
    assert DeviceFd(-1).probe_api_version() == api


def test_probe_api_version_of_a_broken_device_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, request: int, arg: bytearray) -> int:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fcntl, "ioctl", broken)
    with pytest.raises(PermissionError):
        DeviceFd(-1).probe_api_version()
