"""``pyvduse net``: a virtio-net device whose frames go to and come from a TAP interface."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from pyvduse.backend.tap import TapBackend, TapError
from pyvduse.cli.blk import (
    add_data_path_argument,
    add_device_arguments,
    add_ops_arguments,
    check_data_path,
    loop_tuning,
    ops_options,
    parse_bounce_size,
    parse_msg_timeout,
)
from pyvduse.daemon import Daemon, check_kernel, check_name
from pyvduse.device.net import NetConfigError, NetDevice, NetOptions, format_mac, parse_mac
from pyvduse.errors import UserError
from pyvduse.runtime.state_file import StateFile
from pyvduse.transport.kernel import sysfs

log = logging.getLogger("pyvduse")

CAP_NET_ADMIN = 12


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "net",
        help="serve a virtio-net device backed by a TAP interface",
        description="Create a VDUSE virtio-net device, attach it to the vdpa "
        "bus (Linux's virtio_net makes an interface of it) and pass its frames "
        "to and from a TAP interface until SIGINT or SIGTERM.",
    )
    p.add_argument("--name", required=True, help="device name (/dev/vduse/NAME, vdpa NAME)")
    p.add_argument(
        "--tap",
        required=True,
        metavar="IFNAME",
        help="the TAP interface (created if absent, and then removed on exit)",
    )
    p.add_argument("--mac", help="the interface's MAC address (default: a random locally administered one)")
    p.add_argument(
        "--mtu",
        type=int,
        metavar="N",
        help="the MTU the driver is told to use (VIRTIO_NET_F_MTU), also set on "
        "the TAP (default: the driver's, 1500)",
    )
    p.add_argument(
        "--offloads",
        choices=("on", "off"),
        default="on",
        help="offer checksum and segmentation offloads as far as the TAP carries them (default on)",
    )
    p.add_argument(
        "--mrg-rxbuf",
        action="store_true",
        help="offer mergeable receive buffers (VIRTIO_NET_F_MRG_RXBUF: the driver "
        "posts page-sized buffers and a frame may take several; without it, "
        "the default, it posts 64 KiB buffers, one per frame, which the Python "
        "engine serves several times faster)",
    )
    p.add_argument(
        "--link",
        choices=("up", "down"),
        default="up",
        help="the link state at start (default up; 'pyvduse ctl NAME link' changes it)",
    )
    add_data_path_argument(p)
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

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: kept in memory only
        self.data: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError, TypeError):
            loaded = json.loads(path.read_text()) if path is not None else None
            if isinstance(loaded, dict):
                self.data = loaded

    def save(self, **changes: object) -> None:
        self.data.update(changes)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)  # a kill leaves the old or the new file, never half of one

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class NetDaemon(Daemon):
    """A ``Daemon`` whose device is a network interface: ready once virtio_net has made the
    interface (``node`` is its name). After a restart the interface may live in another
    network namespace, where this one cannot see it: then the name it had."""

    def __init__(
        self, device: NetDevice, name: str, state: NetState | None = None, **options: object
    ) -> None:
        super().__init__(device, name, **options)  # type: ignore[arg-type]
        self.net_state = state or NetState(None)

    def _wait_for_node(self) -> str:
        deadline = time.monotonic() + (2.0 if self.resumed else self.node_timeout)
        while not self._stop_requested.is_set():
            found = sysfs.net_interfaces(self.name)
            if found:
                self.net_state.save(ifname=found[0])
                return found[0]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        known = self.net_state.data.get("ifname")
        if self.resumed and isinstance(known, str):
            return known
        return super()._wait_for_node()  # says why there is none


def announce(daemon: Daemon) -> None:
    """The one line scripts wait for (flushed: they read it through a pipe)."""
    sys.stdout.write(f"READY name={daemon.name} ifname={daemon.node}\n")
    sys.stdout.flush()


def preflight() -> None:
    if not has_net_admin():
        raise UserError("a VDUSE network device and its TAP need CAP_NET_ADMIN: run as root")
    check_kernel()


def run(args: argparse.Namespace) -> int:
    check_name(args.name)
    ops = ops_options(args)
    bounce = parse_bounce_size(args.bounce_size)
    msg_timeout = parse_msg_timeout(args.msg_timeout)
    try:
        mac = parse_mac(args.mac) if args.mac is not None else None
    except NetConfigError as e:
        raise UserError(str(e)) from None
    preflight()
    name = args.name
    reconnect = name in sysfs.vduse_devices()
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
    try:
        net_state.save(tap=args.tap if backend.created else None, link=link_up)
        options = NetOptions(
            mac=mac,
            mtu=args.mtu,
            queue_size=args.queue_size,
            packed=args.packed,
            mrg_rxbuf=args.mrg_rxbuf,
            offloads=args.offloads == "on",
            link_up=link_up,
        )
        try:
            device = NetDevice(backend, options)
        except NetConfigError as e:
            raise UserError(str(e)) from None
        tuning = loop_tuning(args)
        check_data_path(tuning.data_path, device, args.packed)
        device.on_link_change = lambda up: net_state.save(link=up)
        log.info(
            "MAC %s, TAP %s%s", format_mac(device.mac), args.tap, " (created)" if backend.created else ""
        )
        daemon = NetDaemon(
            device,
            name,
            net_state,
            state_dir=args.state_dir,
            resume=True if args.reconnect else None,
            tuning=tuning,
            ops=ops,
            msg_timeout=msg_timeout,
            bounce_size=bounce,
        )
        daemon.on_ready = announce
        daemon.run(signals=True)
        return 0
    finally:
        backend.close()
        if name not in sysfs.vduse_devices():  # nothing left to resume
            net_state.remove()
            with contextlib.suppress(OSError):
                state_dir.rmdir()


def serve_device(name: str, device: NetDevice) -> int:
    """Serve a network device of one's own (a backend written in Python) until SIGINT or
    SIGTERM, like ``pyvduse net`` does with a TAP: prints ``READY name=NAME ifname=IF``."""
    preflight()
    daemon = NetDaemon(device, name, state_dir=None)
    daemon.on_ready = announce
    daemon.run(signals=True)
    return 0
