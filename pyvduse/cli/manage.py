"""``pyvduse list`` and ``pyvduse destroy``: look after devices on the host."""

from __future__ import annotations

import argparse
import errno

from pyvduse.errors import UserError
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.control import Control
from pyvduse.transport.kernel.vdpa_netlink import VdpaError, VdpaNetlink


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="list VDUSE devices")
    p.set_defaults(func=run_list)
    p = sub.add_parser("destroy", help="detach and remove a VDUSE device whose daemon is gone")
    p.add_argument("name")
    p.set_defaults(func=run_destroy)


def run_list(args: argparse.Namespace) -> int:
    if not sysfs.CONTROL.exists():
        raise UserError("the vduse kernel module is not loaded: run 'modprobe vduse' as root")
    for name in sysfs.vduse_devices():
        driver = sysfs.bound_driver(name) or "-"
        nodes = sysfs.block_devices(name) or sysfs.vhost_devices(name)
        print(f"{name}\tdriver={driver}\tdev={','.join('/dev/' + n for n in nodes) or '-'}")
    return 0


def run_destroy(args: argparse.Namespace) -> int:
    name = args.name
    if name not in sysfs.vduse_devices():
        raise UserError(f"no VDUSE device named '{name}' (see 'pyvduse list')")
    try:
        with VdpaNetlink() as nl:
            if any(d.name == name for d in nl.dev_list()):
                nl.dev_del(name)
    except VdpaError as e:
        raise UserError(f"cannot detach '{name}': {e}") from None
    with Control() as ctl:
        try:
            ctl.destroy(name)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise UserError(f"'{name}' is still open by its daemon: stop that process "
                                "first") from None
            raise
    print(f"destroyed {name}")
    return 0
