#!/usr/bin/env python3
"""ABI smoke test against a real kernel with the vdpa and vduse modules loaded (as root).

Checks that the vdpa netlink client talks to the real family and that every VDUSE ioctl
number is recognised by the kernel: it creates a block device, exercises the device-fd
ioctls that are safe before attach, and destroys it again. It never attaches the device
(that needs a message loop answering SET_STATUS).

    python3 tests/vm/abi_smoke.py        # exits 0 on success

Lines starting with "NOTE" record behaviour that differs from the reference document
without failing the run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pyvduse.abi import vduse as v
from pyvduse.abi import virtio as vio
from pyvduse.abi import virtio_blk as vb
from pyvduse.transport.kernel.vdpa_netlink import VdpaError, VdpaNetlink

CONTROL = "/dev/vduse/control"
failures: list[str] = []


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(what)


def note(text: str) -> None:
    print(f"NOTE {text}", flush=True)


def ioctl_errno(fd: int, req: int, arg: bytearray | int) -> tuple[int, int]:
    """(return value, 0) on success or (-1, errno) on failure."""
    try:
        return fcntl.ioctl(fd, req, arg), 0
    except OSError as exc:
        return -1, exc.errno or 0


def expect_errno(fd: int, name: str, req: int, arg: bytearray | int, want: int) -> None:
    """The number must be recognised (not ENOTTY); compare the errno with the reference."""
    _, err = ioctl_errno(fd, req, arg)
    label = errno.errorcode.get(err, str(err)) if err else "success"
    check(f"{name} recognised", err != errno.ENOTTY, label)
    if err != want:
        wanted = errno.errorcode.get(want, str(want)) if want else "success"
        note(f"{name}: reference expects {wanted}, kernel gave {label}")


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def netlink_checks() -> None:
    with VdpaNetlink() as nl:
        names = nl.mgmtdev_names()
        check("mgmtdev_names lists vduse", "vduse" in names, repr(names))
        check("has_mgmtdev('vduse')", nl.has_mgmtdev("vduse"))
        check("has_mgmtdev('no-such-mgmtdev') is False", not nl.has_mgmtdev("no-such-mgmtdev"))
        devs = nl.dev_list()
        check("dev_list() works and is empty", devs == [], repr(devs))
        try:
            nl.dev_add("nonexistent")
        except VdpaError as exc:
            check(
                "dev_add('nonexistent') raises VdpaError(EINVAL)",
                exc.errno == errno.EINVAL,
                f"errno={errno.errorcode.get(exc.errno or 0)} {exc.strerror}",
            )
        else:
            check("dev_add('nonexistent') raises VdpaError", False, "no error")
        try:
            nl.dev_del("nonexistent")
        except VdpaError as exc:
            check(
                "dev_del('nonexistent') raises VdpaError",
                True,
                f"errno={errno.errorcode.get(exc.errno or 0)}",
            )
        else:
            check("dev_del('nonexistent') raises VdpaError", False, "no error")


def control_version_checks() -> None:
    # GET_API_VERSION on a throwaway fd: on the newest kernels it switches that fd to v1.
    fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = bytearray(8)
        _, err = ioctl_errno(fd, v.VDUSE_GET_API_VERSION, buf)
        version = struct.unpack("<Q", buf)[0]
        check("VDUSE_GET_API_VERSION", err == 0, f"version={version}")
        if version != 0:
            note(f"GET_API_VERSION returned {version} (reference: 0 on 6.1x)")
    finally:
        os.close(fd)
    fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        _, err = ioctl_errno(fd, v.VDUSE_SET_API_VERSION, bytearray(struct.pack("<Q", 1)))
        label = errno.errorcode.get(err, "success") if err else "success"
        check("VDUSE_SET_API_VERSION(1) handled", err in (0, errno.EINVAL), label)
        if err != errno.EINVAL:
            note(f"SET_API_VERSION(1): reference expects EINVAL on 6.12, got {label}")
        _, err = ioctl_errno(fd, v.iow(v.VDUSE_BASE, 0x7F, 8), bytearray(8))
        check(
            "unknown control ioctl gives EINVAL",
            err == errno.EINVAL,
            errno.errorcode.get(err, "success"),
        )
    finally:
        os.close(fd)


def device_checks() -> None:
    name = f"abi-smoke-{os.getpid()}"
    node = Path("/dev/vduse") / name
    ctl = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        _, err = ioctl_errno(ctl, v.VDUSE_SET_API_VERSION, bytearray(struct.pack("<Q", 0)))
        check("VDUSE_SET_API_VERSION(0)", err == 0, errno.errorcode.get(err, ""))

        config = vb.BlkConfig(capacity=2048).pack()
        features = vio.bit(vio.F_VERSION_1) | vio.bit(vio.F_ACCESS_PLATFORM)
        bad = v.DevConfig(name, 0, vio.DeviceId.BLOCK, features | vio.bit(vb.F_CONFIG_WCE), 1, 4096, config)
        _, err = ioctl_errno(ctl, v.VDUSE_CREATE_DEV, bytearray(bad.pack()))
        check(
            "VDUSE_CREATE_DEV refuses CONFIG_WCE with EINVAL",
            err == errno.EINVAL,
            errno.errorcode.get(err, "success"),
        )

        dev_config = v.DevConfig(name, 0, vio.DeviceId.BLOCK, features, 1, 4096, config)
        _, err = ioctl_errno(ctl, v.VDUSE_CREATE_DEV, bytearray(dev_config.pack()))
        check("VDUSE_CREATE_DEV block device", err == 0, errno.errorcode.get(err, ""))
        if err:
            return
        try:
            _, err = ioctl_errno(ctl, v.VDUSE_CREATE_DEV, bytearray(dev_config.pack()))
            check(
                "VDUSE_CREATE_DEV same name gives EEXIST",
                err == errno.EEXIST,
                errno.errorcode.get(err, "success"),
            )
            check(f"{node} appears", wait_for(node.exists))
            check(f"/sys/class/vduse/{name} exists", Path("/sys/class/vduse", name).is_dir())
            timeout = Path("/sys/class/vduse", name, "msg_timeout")
            if timeout.exists():
                print(f"info msg_timeout={timeout.read_text().strip()}")
            bounce = Path("/sys/class/vduse", name, "bounce_size")
            if bounce.exists():
                print(f"info bounce_size={bounce.read_text().strip()}")
            fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
            try:
                per_fd_checks(ctl, fd, name)
            finally:
                os.close(fd)
            with VdpaNetlink() as nl:
                devs = nl.dev_list()
                check("created but unattached device is not in dev_list()", devs == [], repr(devs))
        finally:
            _, err = ioctl_errno(ctl, v.VDUSE_DESTROY_DEV, bytearray(v.name_buffer(name)))
            check("VDUSE_DESTROY_DEV", err == 0, errno.errorcode.get(err, ""))
        check(f"{node} disappears", wait_for(lambda: not node.exists()))
        _, err = ioctl_errno(ctl, v.VDUSE_DESTROY_DEV, bytearray(v.name_buffer(name)))
        check(
            "VDUSE_DESTROY_DEV of a gone device gives EINVAL",
            err == errno.EINVAL,
            errno.errorcode.get(err, "success"),
        )
    finally:
        os.close(ctl)


def per_fd_checks(ctl: int, fd: int, name: str) -> None:
    try:
        os.open(Path("/dev/vduse") / name, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        check(
            "second open gives EBUSY",
            exc.errno == errno.EBUSY,
            errno.errorcode.get(exc.errno or 0, ""),
        )
    else:
        check("second open gives EBUSY", False, "opened twice")

    _, err = ioctl_errno(ctl, v.VDUSE_DESTROY_DEV, bytearray(v.name_buffer(name)))
    check(
        "VDUSE_DESTROY_DEV while open gives EBUSY",
        err == errno.EBUSY,
        errno.errorcode.get(err, "success"),
    )

    _, err = ioctl_errno(fd, v.VDUSE_VQ_SETUP, bytearray(v.VqConfig(0, 128).pack()))
    check("VDUSE_VQ_SETUP index 0 max_size 128", err == 0, errno.errorcode.get(err, ""))
    _, err = ioctl_errno(fd, v.VDUSE_VQ_SETUP, bytearray(v.VqConfig(1, 128).pack()))
    check(
        "VDUSE_VQ_SETUP index >= vq_num gives EINVAL",
        err == errno.EINVAL,
        errno.errorcode.get(err, "success"),
    )

    buf = bytearray(8)
    _, err = ioctl_errno(fd, v.VDUSE_DEV_GET_FEATURES, buf)
    feats = struct.unpack("<Q", buf)[0]
    check("VDUSE_DEV_GET_FEATURES returns 0", err == 0 and feats == 0, f"{feats:#x}")

    buf = bytearray(v.VqInfo.query(0))
    _, err = ioctl_errno(fd, v.VDUSE_VQ_GET_INFO, buf)
    info = v.VqInfo.unpack(bytes(buf))
    check(
        "VDUSE_VQ_GET_INFO before attach",
        err == 0 and info.index == 0 and not info.ready,
        repr(info),
    )

    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        _, err = ioctl_errno(fd, v.VDUSE_VQ_SETUP_KICKFD, bytearray(v.VqEventfd(0, efd).pack()))
        check("VDUSE_VQ_SETUP_KICKFD assign", err == 0, errno.errorcode.get(err, ""))
        deassign = v.VqEventfd(0, v.VDUSE_EVENTFD_DEASSIGN).pack()
        _, err = ioctl_errno(fd, v.VDUSE_VQ_SETUP_KICKFD, bytearray(deassign))
        check("VDUSE_VQ_SETUP_KICKFD deassign", err == 0, errno.errorcode.get(err, ""))
    finally:
        os.close(efd)

    data = v.config_data(vb.CAPACITY_OFFSET, struct.pack("<Q", 4096))
    _, err = ioctl_errno(fd, v.VDUSE_DEV_SET_CONFIG, bytearray(data))
    check("VDUSE_DEV_SET_CONFIG", err == 0, errno.errorcode.get(err, ""))
    over = v.config_data(vb.CONFIG_SIZE - 4, bytes(8))
    _, err = ioctl_errno(fd, v.VDUSE_DEV_SET_CONFIG, bytearray(over))
    check(
        "VDUSE_DEV_SET_CONFIG past config_size gives EINVAL",
        err == errno.EINVAL,
        errno.errorcode.get(err, "success"),
    )

    # Not allowed before attach / DRIVER_OK; the numbers must still be recognised.
    expect_errno(fd, "VDUSE_DEV_INJECT_CONFIG_IRQ", v.VDUSE_DEV_INJECT_CONFIG_IRQ, 0, errno.EINVAL)
    expect_errno(
        fd,
        "VDUSE_VQ_INJECT_IRQ",
        v.VDUSE_VQ_INJECT_IRQ,
        bytearray(struct.pack("<I", 0)),
        errno.EINVAL,
    )
    expect_errno(
        fd,
        "VDUSE_IOTLB_GET_FD",
        v.VDUSE_IOTLB_GET_FD,
        bytearray(v.IotlbEntry(0, 0, 0, 0).pack()),
        errno.EINVAL,
    )
    expect_errno(
        fd,
        "VDUSE_IOTLB_GET_INFO",
        v.VDUSE_IOTLB_GET_INFO,
        bytearray(v.IovaInfo(0, 0, 0).pack()),
        errno.EINVAL,
    )
    # No IOVA domain before attach, so even a well-formed umem is refused.
    umem = v.IovaUmem(0, 0, 64 << 20).pack()
    expect_errno(fd, "VDUSE_IOTLB_REG_UMEM", v.VDUSE_IOTLB_REG_UMEM, bytearray(umem), errno.EINVAL)
    # Nothing registered: the kernel answers ENOENT here.
    expect_errno(fd, "VDUSE_IOTLB_DEREG_UMEM", v.VDUSE_IOTLB_DEREG_UMEM, bytearray(umem), errno.ENOENT)
    _, err = ioctl_errno(fd, v.VDUSE_IOTLB_GET_FD2, bytearray(v.IotlbEntryV2(0, 0, 0, 0, 0).pack()))
    check(
        "VDUSE_IOTLB_GET_FD2 on API 0 gives ENOTTY",
        err == errno.ENOTTY,
        errno.errorcode.get(err, "success"),
    )
    _, err = ioctl_errno(fd, v.iow(v.VDUSE_BASE, 0x7F, 8), bytearray(8))
    check(
        "unknown device ioctl gives ENOTTY",
        err == errno.ENOTTY,
        errno.errorcode.get(err, "success"),
    )

    # No message is pending before attach: a non-blocking read must say EAGAIN.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        os.read(fd, v.MESSAGE_SIZE)
    except OSError as exc:
        check(
            "non-blocking read with no message gives EAGAIN",
            exc.errno == errno.EAGAIN,
            errno.errorcode.get(exc.errno or 0, ""),
        )
    else:
        check("non-blocking read with no message gives EAGAIN", False, "got a message")
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def main() -> int:
    if os.geteuid() != 0:
        print("abi_smoke: needs root", file=sys.stderr)
        return 2
    if not os.path.exists(CONTROL):
        print(f"abi_smoke: {CONTROL} missing (modprobe vduse)", file=sys.stderr)
        return 2
    print(f"kernel {os.uname().release}")
    netlink_checks()
    control_version_checks()
    device_checks()
    if failures:
        print(f"abi_smoke: {len(failures)} check(s) failed: {failures}")
        return 1
    print("abi_smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
