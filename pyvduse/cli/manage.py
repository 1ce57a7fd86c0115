"""``pyvduse list`` and ``pyvduse destroy``: look after devices on the host."""

from __future__ import annotations

import argparse
import errno
import os
import select
import threading

from pyvduse.abi import vduse as v
from pyvduse.errors import UserError
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.control import Control, missing_module_hint
from pyvduse.transport.kernel.device_fd import DeviceFd
from pyvduse.transport.kernel.vdpa_netlink import VdpaError, VdpaNetlink


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="list VDUSE devices and whether a daemon serves each")
    p.set_defaults(func=run_list)
    p = sub.add_parser("destroy", help="detach and remove a VDUSE device whose daemon is gone")
    p.add_argument("name")
    p.set_defaults(func=run_destroy)


def _served(name: str) -> bool:
    """Whether a process holds ``/dev/vduse/NAME`` open (only one open is allowed)."""
    try:
        fd = os.open(sysfs.device_node(name), os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return e.errno == errno.EBUSY
    os.close(fd)
    return False


def run_list(args: argparse.Namespace) -> int:
    if not sysfs.CONTROL.exists():
        raise UserError(missing_module_hint())
    for name in sysfs.vduse_devices():
        driver = sysfs.bound_driver(name) or "-"
        nodes = sysfs.block_devices(name) or sysfs.vhost_devices(name)
        served = "served" if _served(name) else "orphaned"
        print(f"{name}\t{served}\tdriver={driver}\t"
              f"dev={','.join('/dev/' + n for n in nodes) or '-'}")
    return 0


class _Answerer:
    """Answers OK to every control message while an orphaned device is detached.

    Without it the kernel would wait ``msg_timeout`` for the dead daemon and then mark the
    device broken.
    """

    def __init__(self, dev: DeviceFd) -> None:
        self.dev = dev
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.dev.fd, select.POLLIN)
        poller.register(self.stop_fd, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.stop_fd in ready or ready.get(self.dev.fd, 0) & select.POLLERR:
                return
            req = self.dev.read_request()
            self.dev.write_response(v.pack_response(req.request_id, v.VDUSE_REQ_RESULT_OK,
                                                    vq_index=req.vq_index))

    def close(self) -> None:
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join()
        os.close(self.stop_fd)


def run_destroy(args: argparse.Namespace) -> int:
    name = args.name
    if not sysfs.CONTROL.exists():
        raise UserError(missing_module_hint())
    if name not in sysfs.vduse_devices():
        raise UserError(f"no VDUSE device named '{name}' (see 'pyvduse list')")
    try:
        dev = DeviceFd.open(str(sysfs.device_node(name)))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UserError(f"'{name}' is still served by a running daemon: stop that process "
                            "(SIGTERM) instead") from None
        raise
    answerer = _Answerer(dev)
    try:
        with VdpaNetlink() as nl:
            if any(d.name == name for d in nl.dev_list()):
                nl.dev_del(name)
    except VdpaError as e:
        raise UserError(f"cannot detach '{name}': {e}") from None
    finally:
        answerer.close()
        dev.close()
    with Control() as ctl:
        ctl.destroy(name)
    print(f"destroyed {name}")
    return 0
