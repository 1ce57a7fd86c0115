"""``pyvduse net``: a virtio-net device whose frames go to and come from a TAP interface."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import threading
import time
from pathlib import Path

from pyvduse.backend.tap import TapBackend, TapError
from pyvduse.cli.blk import (
    ReadyWaiter,
    _check_name,
    add_device_arguments,
    add_ops_arguments,
    bounce_size,
    open_state,
    ops_options,
    resuming,
    serve,
)
from pyvduse.device.net import NetConfigError, NetDevice, NetOptions, format_mac, parse_mac
from pyvduse.errors import UserError
from pyvduse.runtime.state_file import DEFAULT_STATE_DIR, StateFile
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.control import missing_module_hint

log = logging.getLogger("pyvduse")

CAP_NET_ADMIN = 12
INTERFACE_WAIT_SECONDS = 30.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("net", help="serve a virtio-net device backed by a TAP interface",
                       description="Create a VDUSE virtio-net device, attach it to the vdpa "
                       "bus (Linux's virtio_net makes an interface of it) and pass its frames "
                       "to and from a TAP interface until SIGINT or SIGTERM.")
    p.add_argument("--name", required=True, help="device name (/dev/vduse/NAME, vdpa NAME)")
    p.add_argument("--tap", required=True, metavar="IFNAME",
                   help="the TAP interface (created if absent, and then removed on exit)")
    p.add_argument("--mac", help="the interface's MAC address (default: a random locally "
                   "administered one)")
    p.add_argument("--mtu", type=int, metavar="N",
                   help="the MTU the driver is told to use (VIRTIO_NET_F_MTU), also set on "
                   "the TAP (default: the driver's, 1500)")
    p.add_argument("--queue-size", type=int, default=256, metavar="N",
                   help="descriptors per virtqueue, a power of two (default 256)")
    p.add_argument("--offloads", choices=("on", "off"), default="on",
                   help="offer checksum and segmentation offloads as far as the TAP carries "
                   "them (default on)")
    p.add_argument("--mrg-rxbuf", action="store_true",
                   help="offer mergeable receive buffers (VIRTIO_NET_F_MRG_RXBUF: the driver "
                   "posts page-sized buffers and a frame may take several; without it, "
                   "the default, it posts 64 KiB buffers, one per frame, which the Python "
                   "engine serves several times faster)")
    p.add_argument("--link", choices=("up", "down"), default="up",
                   help="the link state at start (default up; 'pyvduse ctl NAME link' "
                   "changes it)")
    add_device_arguments(p)
    add_ops_arguments(p)
    p.set_defaults(func=run)


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (VDUSE net devices and TAPs need it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: let the kernel say


class NetState:
    """What a restarted daemon must know besides the in-flight logs: whether a daemon of
    ours created the TAP (so it is removed at the end), the link state, the interface name.
    Kept as JSON next to the state file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self.data = loaded

    def save(self, **changes: object) -> None:
        self.data.update(changes)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)  # a kill leaves the old or the new file, never half of one

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def device_identity(device: NetDevice) -> dict[str, object]:
    """What must not change across a restart for the in-flight logs to apply."""
    spec = device.spec()
    return {"backend": device.backend.description, "features": spec.features,
            "queues": spec.num_queues, "queue_size": spec.queue_size,
            "mac": format_mac(device.mac), "mtu": device.options.mtu}


def interface_waiter(state: NetState, reconnect: bool) -> ReadyWaiter:
    """READY's ``ifname=``: the interface virtio_net made (after a restart it may live in
    another network namespace, where we cannot see it: then the name it had)."""

    def wait(name: str, stop: threading.Event) -> tuple[str, str]:
        deadline = time.monotonic() + (2.0 if reconnect else INTERFACE_WAIT_SECONDS)
        while not stop.is_set():
            found = sysfs.net_interfaces(name)
            if found:
                state.save(ifname=found[0])
                return f"ifname={found[0]}", found[0]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        known = state.data.get("ifname")
        if reconnect and isinstance(known, str):
            return f"ifname={known}", known
        if stop.is_set():
            return "ifname=-", "-"
        raise UserError(f"no network interface appeared for '{name}' within "
                        f"{INTERFACE_WAIT_SECONDS:.0f} s: check 'dmesg' for virtio_net errors")

    return wait


def preflight() -> None:
    if not has_net_admin():
        raise UserError("a VDUSE network device and its TAP need CAP_NET_ADMIN: run as root")
    if not sysfs.CONTROL.exists():
        raise UserError(missing_module_hint())
    if "virtio_vdpa" not in sysfs.vdpa_drivers() and "vhost_vdpa" not in sysfs.vdpa_drivers():
        raise UserError("no vdpa bus driver is loaded: run 'modprobe virtio_vdpa' for a host "
                        "network interface (or 'modprobe vhost_vdpa' to give it to a VM)")


def run(args: argparse.Namespace) -> int:
    _check_name(args.name)
    ops = ops_options(args)
    bounce = bounce_size(args)
    try:
        mac = parse_mac(args.mac) if args.mac is not None else None
    except NetConfigError as e:
        raise UserError(str(e)) from None
    preflight()
    name = args.name
    reconnect = resuming(args)
    state_dir = args.state_dir / name
    net_state = NetState(state_dir / "net.json")
    link_up = args.link == "up"
    if reconnect:  # the kernel keeps the MAC and link state: take them as they are
        stored = StateFile.peek_identity(state_dir / "state") or {}
        if mac is None and isinstance(stored.get("mac"), str):
            mac = parse_mac(str(stored["mac"]))
        link_up = bool(net_state.data.get("link", link_up))
    owned = reconnect and net_state.data.get("tap") == args.tap
    try:
        backend = TapBackend(args.tap, mtu=args.mtu, owned=owned)
    except TapError as e:
        raise UserError(e.strerror or str(e)) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    removed = False
    try:
        net_state.save(tap=args.tap if backend.created else None, link=link_up)
        options = NetOptions(mac=mac, mtu=args.mtu, queue_size=args.queue_size,
                             packed=args.packed, mrg_rxbuf=args.mrg_rxbuf,
                             offloads=args.offloads == "on", link_up=link_up)
        try:
            device = NetDevice(backend, options)
        except NetConfigError as e:
            raise UserError(str(e)) from None
        device.on_link_change = lambda up: net_state.save(link=up)
        state = open_state(name, args.state_dir, device, reconnect, device_identity(device))
        log.info("MAC %s, TAP %s%s", format_mac(device.mac), args.tap,
                 " (created)" if backend.created else "")
        code = serve(name, device, msg_timeout=args.msg_timeout, bounce_size=bounce,
                     state=state, reconnect=reconnect, ops=ops,
                     wait_ready=interface_waiter(net_state, reconnect))
        removed = name not in sysfs.vduse_devices()
        return code
    finally:
        backend.close()
        if removed or name not in sysfs.vduse_devices():  # nothing left to resume
            net_state.remove()
            with contextlib.suppress(OSError):
                state_dir.rmdir()


def serve_device(name: str, device: NetDevice, **options: object) -> int:
    """Serve a network device of one's own (a backend written in Python) until SIGINT or
    SIGTERM, like ``pyvduse net`` does with a TAP: prints ``READY name=NAME ifname=IF``."""
    preflight()
    state = NetState(DEFAULT_STATE_DIR / name / "net.json")
    try:
        return serve(name, device, wait_ready=interface_waiter(state, False),
                     **options)  # type: ignore[arg-type]
    finally:
        state.remove()
