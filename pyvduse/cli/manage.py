"""``pyvduse list`` and ``pyvduse destroy``: look after devices on the host."""

from __future__ import annotations

import argparse

from pyvduse.device.failing import FailingDevice
from pyvduse.errors import UserError
from pyvduse.runtime.server import DeviceServer
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.control import Control, missing_module_hint
from pyvduse.transport.kernel.device_fd import device_in_use
from pyvduse.transport.kernel.transport import KernelTransport


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="list VDUSE devices and whether a daemon serves each")
    p.set_defaults(func=run_list)
    p = sub.add_parser("destroy", help="detach and remove a VDUSE device whose daemon is gone")
    p.add_argument("name")
    p.set_defaults(func=run_destroy)


def _served(name: str) -> bool:
    return device_in_use(str(sysfs.device_node(name)))


def run_list(args: argparse.Namespace) -> int:
    if not sysfs.CONTROL.exists():
        raise UserError(missing_module_hint())
    for name in sysfs.vduse_devices():
        driver = sysfs.bound_driver(name) or "-"
        nodes = sysfs.block_devices(name) or sysfs.vhost_devices(name)
        served = "served" if _served(name) else "orphaned"
        ifnames = sysfs.net_interfaces(name)
        where = (
            f"ifname={','.join(ifnames)}" if ifnames else f"dev={','.join('/dev/' + n for n in nodes) or '-'}"
        )
        print(f"{name}\t{served}\tdriver={driver}\t{where}")
    return 0


def run_destroy(args: argparse.Namespace) -> int:
    name = args.name
    if not sysfs.CONTROL.exists():
        raise UserError(missing_module_hint())
    if name not in sysfs.vduse_devices():
        raise UserError(f"no VDUSE device named '{name}' (see 'pyvduse list')")
    from pyvduse.transport.kernel.vdpa_netlink import VdpaError, VdpaNetlink  # slow import

    if _served(name):
        raise UserError(f"'{name}' is still served by a running daemon: stop that process (SIGTERM) instead")
    try:
        with VdpaNetlink() as nl:
            found = [d for d in nl.dev_list() if d.name == name]
    except VdpaError as e:
        raise UserError(f"cannot query the vdpa bus: {e}") from None
    if found:
        # Attached: take the device over with a stand-in that fails all I/O, so the driver's
        # remove path (flush, reset) is answered, then detach and destroy it.
        d = found[0]
        device = FailingDevice(d.device_id, d.max_vqs, d.max_vq_size)
        server = DeviceServer(device)
        transport = KernelTransport(name, device.spec(), server)
        server.bind(transport)
        transport.remove_orphan()
    else:
        with Control() as ctl:
            ctl.destroy(name)
    if name in sysfs.vduse_devices():
        raise UserError(f"'{name}' could not be removed: see 'dmesg'")
    print(f"destroyed {name}")
    _remove_tap(name)
    return 0


def _remove_tap(name: str) -> None:
    """A ``pyvduse net`` daemon that died leaves the TAP it created (persistent, for the next
    daemon): with the device gone, nobody will need it."""
    from pyvduse.backend.tap import SYS_NET, TapBackend, TapError
    from pyvduse.netdaemon import NetState
    from pyvduse.runtime.state_file import DEFAULT_STATE_DIR

    state = NetState(DEFAULT_STATE_DIR / name / "net.json")
    tap = state.data.get("tap")
    if isinstance(tap, str) and (SYS_NET / tap).exists():
        try:
            TapBackend(tap, owned=True).close()  # not persistent any more: gone
            print(f"removed TAP {tap}")
        except (TapError, ValueError) as e:
            print(f"TAP {tap} left: {e}")
    state.remove()
