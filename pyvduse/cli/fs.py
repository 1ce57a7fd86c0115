"""``pyvduse fs``: a virtio-fs device serving a host directory (``mount -t virtiofs TAG``)."""

from __future__ import annotations

import argparse
import logging
import os

from pyvduse.cli import plugins
from pyvduse.cli.blk import parse_bounce_size, parse_msg_timeout
from pyvduse.daemon import check_bind, check_name
from pyvduse.device.fs import MAX_REQUEST_QUEUES, FsConfigError, FsDevice
from pyvduse.errors import UserError
from pyvduse.fs.api import Filesystem
from pyvduse.fs.passthrough import Passthrough
from pyvduse.fsdaemon import FsDaemon, announce, preflight
from pyvduse.runtime.executors import DEFAULT_IO_THREADS, Aio
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.transport.kernel.vdpa_bind import DRIVERS as BIND_DRIVERS

log = logging.getLogger("pyvduse")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fs",
        help="serve a host directory as a virtio-fs device",
        description="Create a VDUSE virtio-fs device serving DIR (confined to it) and "
        "attach it to the vdpa bus until SIGINT or SIGTERM: 'mount -t virtiofs TAG "
        "MOUNTPOINT' mounts it (Linux 6.15 or later).",
    )
    p.add_argument("--name", required=True, help="device name (/dev/vduse/NAME, vdpa NAME)")
    p.add_argument("--tag", required=True, help="the name mount uses (1 to 36 bytes)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dir", metavar="PATH", help="the directory to serve")
    what.add_argument(
        "--fs",
        metavar="MODULE:CLASS",
        help="a pyvduse.fs.Filesystem of one's own (MODULE:CLASS or FILE.py:CLASS), "
        "constructed with the --fs-arg values",
    )
    p.add_argument(
        "--fs-arg", action="append", metavar="K=V", help="an argument for --fs's constructor (repeatable)"
    )
    p.add_argument("--readonly", action="store_true", help="refuse every change (EROFS)")
    p.add_argument(
        "--queues",
        type=int,
        default=1,
        metavar="N",
        help=f"request queues, 1 to {MAX_REQUEST_QUEUES} (default 1)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=128,
        metavar="N",
        help="descriptors per virtqueue, a power of two (default 128)",
    )
    p.add_argument(
        "--io-threads",
        type=int,
        default=DEFAULT_IO_THREADS,
        metavar="N",
        help=f"threads serving requests, shared by the queues (default {DEFAULT_IO_THREADS})",
    )
    p.add_argument(
        "--bind",
        choices=sorted(BIND_DRIVERS),
        default="virtio",
        help="'virtio' (virtio_vdpa: mount it on this host; the default) or 'vhost' "
        "(vhost_vdpa: /dev/vhost-vdpa-N, for a VM)",
    )
    p.add_argument("--msg-timeout", metavar="SECONDS", help="sysfs msg_timeout (default 30)")
    p.add_argument("--bounce-size", metavar="SIZE", help="kernel bounce buffer size, 1M to 1G")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_name(args.name)
    bounce = parse_bounce_size(args.bounce_size)
    msg_timeout = parse_msg_timeout(args.msg_timeout)
    if not 1 <= args.io_threads <= 1024:
        raise UserError(f"--io-threads {args.io_threads} must be 1 to 1024")
    check_bind(args.bind)
    fs = make_filesystem(args)
    try:
        try:
            device = FsDevice(
                fs, args.tag, request_queues=args.queues, queue_size=args.queue_size, readonly=args.readonly
            )
        except FsConfigError as e:
            raise UserError(str(e).replace("a virtio-fs tag", "--tag")) from None
        preflight(args.bind)
        tuning = QueueTuning(data_path=DataPath.PYTHON, aio=Aio.THREADS, io_threads=args.io_threads)
        daemon = FsDaemon(
            device,
            args.name,
            tuning=tuning,
            msg_timeout=msg_timeout,
            bounce_size=bounce,
            bind=args.bind,
        )
        daemon.on_ready = announce
        daemon.run(signals=True)
        return 0
    finally:
        close = getattr(fs, "close", None)
        if callable(close):
            close()


def make_filesystem(args: argparse.Namespace) -> Filesystem:
    """The filesystem --dir or --fs names (its arguments checked first)."""
    if args.fs is None:
        if args.fs_arg:
            raise UserError("--fs-arg goes with --fs, not --dir")
        if not os.path.isdir(args.dir):
            raise UserError(f"--dir {args.dir} is not a directory: give the directory to serve")
        try:
            return Passthrough(args.dir)
        except OSError as e:
            raise UserError(f"--dir {args.dir}: {e.strerror}") from None
    cls = plugins.load_class(args.fs, "--fs")
    if not (isinstance(cls, type) and issubclass(cls, Filesystem)):
        raise UserError(f"--fs {args.fs} is not a subclass of pyvduse.fs.Filesystem")
    fs = plugins.construct(cls, plugins.parse_args(args.fs_arg, "--fs-arg"), "--fs")
    assert isinstance(fs, Filesystem)
    return fs
