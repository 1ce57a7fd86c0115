"""``pyvduse net``: a virtio-net device whose frames go to and come from a TAP interface."""

from __future__ import annotations

import argparse
import contextlib
import logging

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
from pyvduse.daemon import check_name
from pyvduse.device.net import NetConfigError, NetDevice, NetOptions, format_mac, parse_mac
from pyvduse.errors import UserError
from pyvduse.netdaemon import NetDaemon, NetState, announce, preflight
from pyvduse.runtime.state_file import StateFile
from pyvduse.transport.kernel import sysfs

log = logging.getLogger("pyvduse")


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
