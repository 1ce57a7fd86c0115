"""``pyvduse blk``: serve a disk image (or RAM, or nothing) as a virtio-blk device."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyvduse.abi.vduse import MAX_BOUNCE_SIZE, MIN_BOUNCE_SIZE
from pyvduse.backend.base import Backend
from pyvduse.backend.file import FileBackend
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.nbd import DEFAULT_RECONNECT_SECONDS, NbdBackend, NbdError
from pyvduse.backend.nbd_binding import NbdUnavailable
from pyvduse.backend.null import NullBackend
from pyvduse.backend.rbd_spec import DEFAULT_OPTIONS as RBD_DEFAULT_OPTIONS
from pyvduse.cli import plugins
from pyvduse.daemon import Daemon, check_bind, check_kernel, check_name
from pyvduse.device.base import VirtioDevice
from pyvduse.device.blk import BlkConfigError, BlkDevice, BlkOptions
from pyvduse.errors import UserError
from pyvduse.fastpath import engine as native
from pyvduse.ops.service import DEFAULT_DRAIN_TIMEOUT, OpsOptions
from pyvduse.runtime.executors import DEFAULT_IO_THREADS, Aio
from pyvduse.runtime.state_file import DEFAULT_STATE_DIR
from pyvduse.runtime.tuning import HOLD_MAX_US, MAX_US, PUBLISH_AFTER_US, DataPath, QueueTuning
from pyvduse.sizes import parse_size
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.irq_affinity import FOLLOW, IrqPlacement, parse_cpu_list
from pyvduse.transport.kernel.vdpa_bind import DRIVERS as BIND_DRIVERS

#: --cache → FileBackend's ``direct``: None lets it choose (O_DIRECT where the filesystem takes it).
CACHE_DIRECT: dict[str, bool | None] = {"auto": None, "none": True, "writeback": False}

log = logging.getLogger("pyvduse")

#: The longest --msg-timeout taken (a day): longer is a mistake, 0 waits forever.
MAX_MSG_TIMEOUT = 86400


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "blk",
        help="serve a virtio-blk device",
        description="Create a VDUSE virtio-blk device, attach it to the vdpa "
        "bus and serve it until SIGINT or SIGTERM.",
    )
    p.add_argument("--name", required=True, help="device name (/dev/vduse/NAME, vdpa NAME)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", metavar="PATH", help="raw image file or block device to serve")
    src.add_argument("--memory", metavar="SIZE", help="serve SIZE bytes of RAM (e.g. 1G)")
    src.add_argument("--null", metavar="SIZE", help="discard writes, read zeroes, SIZE bytes")
    src.add_argument(
        "--nbd",
        metavar="URI",
        help="serve an NBD server's export through libnbd: nbd://HOST[:PORT]/EXPORT, "
        "nbds://... (TLS), nbd+unix:///EXPORT?socket=PATH",
    )
    src.add_argument(
        "--rbd",
        metavar="POOL/IMAGE[@SNAP]",
        help="serve a Ceph RBD image through librbd (a snapshot is served read-only; "
        "'rbd resize' while served resizes the device)",
    )
    src.add_argument(
        "--backend",
        metavar="MODULE:CLASS",
        help="a backend of your own: a pyvduse.Backend subclass in an importable "
        "module or a FILE.py, constructed with the --backend-arg values",
    )
    p.add_argument(
        "--backend-arg",
        action="append",
        metavar="KEY=VALUE",
        help="an argument of --backend's constructor (repeat for more; converted "
        "by its annotations: int, float, bool, Path)",
    )
    p.add_argument(
        "--device",
        metavar="MODULE:CLASS",
        help="a device of your own (a pyvduse.VirtioDevice subclass), constructed "
        "with the --device-arg values, and backend= and options= when it takes "
        "them (the backend from --file, --memory, ...)",
    )
    p.add_argument(
        "--device-arg",
        action="append",
        metavar="KEY=VALUE",
        help="an argument of --device's constructor (repeat for more)",
    )
    p.add_argument(
        "--nbd-reconnect",
        type=float,
        default=DEFAULT_RECONNECT_SECONDS,
        metavar="SECONDS",
        help="--nbd: when the server goes away, requests wait "
        "this long while pyvduse reconnects, then fail (default "
        f"{DEFAULT_RECONNECT_SECONDS:g})",
    )
    p.add_argument(
        "--ceph-conf",
        metavar="PATH",
        help="--rbd: the cluster's ceph.conf (default: Ceph's own search, $CEPH_CONF, /etc/ceph/ceph.conf)",
    )
    p.add_argument(
        "--ceph-id",
        metavar="NAME",
        help="--rbd: the Ceph client's name without 'client.' (default admin)",
    )
    p.add_argument(
        "--ceph-option",
        action="append",
        metavar="KEY=VALUE",
        help="--rbd: a Ceph option, as in ceph.conf (repeat for more): keyring=PATH, "
        "mon_host=ADDR, rados_osd_op_timeout=SECONDS (how long a request waits for a "
        "cluster that is gone before it fails; pyvduse's defaults: "
        + ", ".join(f"{k}={v}" for k, v in RBD_DEFAULT_OPTIONS.items())
        + ")",
    )
    p.add_argument("--readonly", action="store_true", help="offer the device read-only")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="virtqueues (default 1)")
    p.add_argument(
        "--block-size",
        type=int,
        default=512,
        choices=(512, 1024, 2048, 4096),
        help="logical block size (default 512)",
    )
    p.add_argument("--serial", default="", help="serial number, up to 20 bytes")
    add_device_arguments(p)
    p.add_argument(
        "--bind",
        choices=sorted(BIND_DRIVERS),
        default="virtio",
        help="the vdpa driver the device is given to: 'virtio' (virtio_vdpa: a "
        "block device /dev/vdX on this host; the default) or 'vhost' "
        "(vhost_vdpa: /dev/vhost-vdpa-N, for a VM)",
    )
    add_data_path_argument(p)
    p.add_argument(
        "--irq-cpus",
        default=FOLLOW,
        metavar="follow|first|driver|LIST",
        help="where the kernel runs each queue's interrupt callback "
        "(vqN/irq_cb_affinity): 'follow' (the default: the CPU of the driver's "
        "mask that the queue's native worker runs on, the first one until then), "
        "'first' CPU of the driver's mask (one CPU per queue, like a hardware "
        "interrupt), 'driver' (its whole mask, rotating over it), or a CPU list "
        "like 0,2-3 (queue i on the i-th CPU of the list)",
    )
    p.add_argument(
        "--aio",
        choices=[a.value for a in Aio],
        default=Aio.IO_URING.value,
        help="how a file backend's reads, writes and flushes run, many per queue "
        "at once: 'io_uring' (the native data path submits them to an io_uring; "
        "queues on the Python engine use a thread pool; the default), 'threads' "
        "(a thread pool, Python engine) or 'sync' (one at a time, inline)",
    )
    p.add_argument(
        "--cache",
        choices=("auto", "writeback", "none"),
        default="auto",
        help="'auto' (the default: direct I/O where the file's filesystem takes "
        "O_DIRECT, as block devices, ext4 and xfs do, the host's page cache where it "
        "does not, as on tmpfs), 'none' (always O_DIRECT: no page cache; requests the "
        "device cannot take directly are copied through aligned buffers) or "
        "'writeback' (always through the host's page cache)",
    )
    p.add_argument(
        "--bounce-memory",
        choices=("kernel", "daemon"),
        default="kernel",
        help="whose pages VDUSE's bounce buffer (where the kernel copies every "
        "request's data) is: the kernel's (the default) or the daemon's own "
        "(VDUSE_IOTLB_REG_UMEM), which direct I/O (--cache none) can reach with "
        "no copy of ours",
    )
    p.add_argument(
        "--io-threads",
        type=int,
        default=DEFAULT_IO_THREADS,
        metavar="N",
        help=f"threads of the pool for --aio threads (default {DEFAULT_IO_THREADS})",
    )
    p.add_argument(
        "--worker-cpus",
        choices=("any", "irq"),
        default="any",
        help="where each queue's worker thread runs: 'any' (wherever the "
        "scheduler puts it; the default) or 'irq', on the CPUs its interrupts "
        "are handled on (the daemon and the completion work share them and leave "
        "the other CPUs to the application: more IOPS at depth when the "
        "application runs elsewhere, less at iodepth 1 when it does not)",
    )
    add_ops_arguments(p)
    p.set_defaults(func=run)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """What every device command takes about the VDUSE device and its crash recovery."""
    p.add_argument(
        "--msg-timeout",
        metavar="SECONDS",
        help="how long the kernel waits for the daemon's answer to each control "
        f"message, whole seconds 0 to {MAX_MSG_TIMEOUT} (0: forever; sysfs "
        "msg_timeout, 30 unless set)",
    )
    p.add_argument(
        "--bounce-size",
        metavar="SIZE",
        help="kernel bounce buffer size, 1M to 1G (sysfs bounce_size; 64M unless set)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=256,
        metavar="N",
        help="descriptors per virtqueue, a power of two (default 256)",
    )
    p.add_argument(
        "--packed", action="store_true", help="offer the packed virtqueue layout (VIRTIO_F_RING_PACKED)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="where the crash-recovery state lives (default /run/pyvduse)",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="require an existing device left by a dead daemon, and resume it "
        "(the default when /dev/vduse/NAME exists)",
    )


def add_ops_arguments(p: argparse.ArgumentParser) -> None:
    """Operations: management socket, metrics endpoint, shutdown drain."""
    p.add_argument(
        "--control",
        metavar="PATH",
        help="management socket for 'pyvduse ctl' (default /run/pyvduse/NAME.sock)",
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (needs prometheus_client)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="on SIGTERM, wait this long for requests in "
        f"flight before detaching (default {DEFAULT_DRAIN_TIMEOUT:g})",
    )


def ops_options(args: argparse.Namespace) -> OpsOptions:
    """The operations options, checked (one-line UserError) before any device exists."""
    ops = OpsOptions(control=args.control, metrics=args.metrics, drain_timeout=args.drain_timeout)
    ops.validate()
    return ops


def make_backend(args: argparse.Namespace, before: Callable[[], None] | None = None) -> Backend | None:
    """The backend the arguments ask for; UserError on a missing file or bad size. None: a
    --device plugin given no backend. ``before``: run before a plugin's constructor (the
    kernel checks, so that a plugin creates nothing a machine without VDUSE cannot serve)."""
    if args.backend is not None:
        cls = plugins.load_class(args.backend, "--backend")
        if not issubclass(cls, Backend):
            raise UserError(
                f"--backend {args.backend}: {cls.__name__} is not a backend (a subclass of pyvduse.Backend)"
            )
        backend: Backend = plugins.construct(
            cls, plugins.parse_args(args.backend_arg, "--backend-arg"), "--backend", before=before
        )
        return backend
    if args.backend_arg:
        raise UserError("--backend-arg is for --backend")
    rbd = getattr(args, "rbd", None)
    if rbd is None and any(getattr(args, o, None) for o in ("ceph_conf", "ceph_id", "ceph_option")):
        raise UserError("--ceph-conf, --ceph-id and --ceph-option are for --rbd")
    if all(getattr(args, o, None) is None for o in ("file", "memory", "null", "nbd", "rbd")):
        if args.device is not None:
            return None
        raise UserError(
            "say what to serve: --file PATH, --memory SIZE, --null SIZE, "
            "--nbd URI, --rbd POOL/IMAGE, --backend MODULE:CLASS or --device MODULE:CLASS"
        )
    if args.file is not None:
        path = args.file
        if not os.path.exists(path):
            raise UserError(
                f"image file {path} does not exist: create it first, for example 'truncate -s 1G {path}'"
            )
        try:
            return FileBackend(path, readonly=args.readonly, direct=CACHE_DIRECT[args.cache])
        except PermissionError:
            if args.readonly:
                raise UserError(
                    f"no permission to read {path}: fix its permissions (or run as a user who may read it)"
                ) from None
            raise UserError(
                f"no permission to open {path} for reading and writing: fix its permissions or use --readonly"
            ) from None
        except OSError as e:
            if e.errno == errno.EINVAL and args.cache == "none":
                raise UserError(
                    f"{path} cannot be opened for direct I/O (--cache none): its "
                    "filesystem does not support O_DIRECT; use --cache "
                    "writeback"
                ) from None
            raise UserError(f"cannot open {path}: {e.strerror}") from None
    if args.nbd is not None:
        return make_nbd_backend(args)
    if rbd is not None:
        return make_rbd_backend(args)
    text = args.memory if args.memory is not None else args.null
    try:
        size = parse_size(text)
    except ValueError as e:
        raise UserError(str(e)) from None
    if size <= 0:
        raise UserError("the size must be larger than zero")
    if args.memory is None:
        return NullBackend(size)
    try:
        return MemoryBackend(size)
    except (OSError, OverflowError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "too large"
        raise UserError(
            f"cannot reserve {text} of memory for --memory ({why}): use a smaller "
            "size, or --file for a disk larger than this machine's memory"
        ) from None


def make_nbd_backend(args: argparse.Namespace) -> NbdBackend:
    """Connect to the NBD server (one connection per queue if it allows multi-conn)."""
    if not 0 <= args.nbd_reconnect <= 86400:
        raise UserError(f"--nbd-reconnect {args.nbd_reconnect:g} must be 0 to 86400 seconds")
    try:
        return NbdBackend(args.nbd, connections=args.queues, reconnect_seconds=args.nbd_reconnect)
    except NbdUnavailable as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(f"--nbd: {e}") from None
    except NbdError as e:
        raise UserError(f"{e}: is the server running, and is this its address and export name?") from None


def make_rbd_backend(args: argparse.Namespace) -> Backend:
    """Connect to the Ceph cluster and open the image (librbd is loaded only now)."""
    from pyvduse.backend.rbd import RbdBackend, RbdError
    from pyvduse.backend.rbd_binding import RbdUnavailable

    options = {}
    for item in args.ceph_option or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--ceph-option {item}: give KEY=VALUE, as in ceph.conf")
        options[key.strip()] = value.strip()
    try:
        return RbdBackend(
            args.rbd, conf=args.ceph_conf, client_id=args.ceph_id, options=options, readonly=args.readonly
        )
    except RbdUnavailable as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(f"--rbd: {e}") from None
    except RbdError as e:
        raise UserError(str(e)) from None


def nbd_options(backend: NbdBackend, options: BlkOptions) -> BlkOptions:
    """``options`` with what the server's export dictates: read-only, block sizes, which
    requests it can serve."""
    info = backend.info
    block_size = options.block_size
    if info.min_block > block_size:
        if info.min_block > 4096 or info.min_block & (info.min_block - 1):
            raise UserError(
                f"the NBD server's minimum block size {info.min_block} is more "
                "than virtio-blk's largest, 4096: it cannot be served"
            )
        log.info("block size %d: the NBD server's minimum", info.min_block)
        block_size = info.min_block
    if backend.size % block_size:
        raise UserError(
            f"the NBD export's size {backend.size} is not a multiple of the block "
            f"size {block_size}: it cannot be served as a virtio-blk disk"
        )
    preferred = info.preferred_block
    physical = preferred if block_size < preferred <= 1 << 16 and not preferred & (preferred - 1) else 0
    if info.readonly and not options.readonly:
        log.info("the NBD export is read-only: so is the device")
    return dataclasses.replace(
        options,
        readonly=options.readonly or info.readonly,
        block_size=block_size,
        flush=info.can_flush,
        discard=info.can_trim,
        write_zeroes=info.can_zero,
        physical_block_size=physical,
        opt_io_size=preferred if physical else 0,
    )


def build_device(
    args: argparse.Namespace, backend: Backend | None, before: Callable[[], None] | None = None
) -> VirtioDevice:
    options = BlkOptions(
        readonly=args.readonly,
        block_size=args.block_size,
        serial=args.serial,
        num_queues=args.queues,
        queue_size=args.queue_size,
        packed=args.packed,
    )
    if isinstance(backend, NbdBackend):
        options = nbd_options(backend, options)
    if backend is not None and backend.kind == "rbd":
        readonly = bool(getattr(backend, "readonly", False))
        if backend.size % options.block_size:
            raise UserError(
                f"the RBD image's size {backend.size} is not a multiple of the block size "
                f"{options.block_size}: resize it ('rbd resize') or give another --block-size"
            )
        if readonly and not options.readonly:
            log.info("%s is read-only: so is the device", backend.description)
        options = dataclasses.replace(options, readonly=readonly)
    if args.device is not None:
        cls = plugins.load_class(args.device, "--device")
        if not issubclass(cls, VirtioDevice):
            raise UserError(
                f"--device {args.device}: {cls.__name__} is not a device (a subclass of pyvduse.VirtioDevice)"
            )
        extra: dict[str, object] = {"options": options}
        if backend is not None:
            extra["backend"] = backend
        device: VirtioDevice = plugins.construct(
            cls, plugins.parse_args(args.device_arg, "--device-arg"), "--device", extra, before
        )
        return device
    if args.device_arg:
        raise UserError("--device-arg is for --device")
    assert backend is not None
    try:
        return BlkDevice(backend, options)
    except BlkConfigError as e:
        raise UserError(str(e)) from None


def add_data_path_argument(p: argparse.ArgumentParser) -> None:
    """--data-path and the native loop's --poll-us and --publish-us (``loop_tuning``)."""
    p.add_argument(
        "--data-path",
        choices=[d.value for d in DataPath],
        default="auto",
        help="who serves the queues: 'native' (the C loop of pyvduse.fastpath), "
        "'python' (the reference engine) or 'auto' (native where it can; "
        "the default)",
    )
    p.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="native data path: when a queue runs empty, keep watching it this "
        "many microseconds with notifications off before sleeping (fewer kicks "
        "and wake-ups under load, at the price of CPU; default 0)",
    )
    p.add_argument(
        "--publish-us",
        type=int,
        default=PUBLISH_AFTER_US,
        metavar="US",
        help="while a queue serves a run of requests, hand the finished ones to "
        "the driver (and interrupt it) as soon as one took this many "
        "microseconds, instead of at the end of the run (default "
        f"{PUBLISH_AFTER_US}; short requests are held at most "
        f"{HOLD_MAX_US} us or this, whichever is more; larger: fewer interrupts, "
        f"later completions; {MAX_US}: at the end of each run)",
    )


def loop_tuning(args: argparse.Namespace, **more: Any) -> QueueTuning:
    """The queue workers' tuning from --data-path, --poll-us and --publish-us (and ``more``
    of QueueTuning's fields); a value out of range is a user error."""
    for option, value in (("--poll-us", args.poll_us), ("--publish-us", args.publish_us)):
        if not 0 <= value <= MAX_US:
            raise UserError(f"{option} {value} must be 0 to {MAX_US}")
    return QueueTuning(
        data_path=DataPath(args.data_path),
        poll_us=args.poll_us,
        publish_us=args.publish_us,
        **more,
    )


def check_data_path(data_path: DataPath, device: VirtioDevice, packed: bool) -> None:
    """--data-path native for a device the native loop cannot serve is a user error; with
    auto, say (in the log) why the Python engine serves it."""
    why_not = native.why_not(device, packed)
    if data_path is DataPath.NATIVE and why_not is not None:
        raise UserError(f"--data-path native: {why_not}; or use --data-path python")
    if data_path is DataPath.AUTO and why_not is not None:
        log.info("queues served by the Python engine: %s", why_not)


def run(args: argparse.Namespace) -> int:
    check_name(args.name)
    bounce = parse_bounce_size(args.bounce_size)
    msg_timeout = parse_msg_timeout(args.msg_timeout)
    ops = ops_options(args)
    if not 1 <= args.io_threads <= 1024:
        raise UserError(f"--io-threads {args.io_threads} must be 1 to 1024")
    tuning = loop_tuning(
        args, workers_on_irq_cpus=args.worker_cpus == "irq", aio=Aio(args.aio), io_threads=args.io_threads
    )
    irq_placement = parse_irq_cpus(args.irq_cpus)
    check_bind(args.bind, args.bounce_memory == "daemon")

    def kernel_ready() -> None:
        check_kernel(args.bind)

    backend = make_backend(args, kernel_ready)
    try:
        device = build_device(args, backend, kernel_ready)
        check_data_path(tuning.data_path, device, args.packed)
        check_kernel(args.bind)
        daemon = Daemon(
            device,
            args.name,
            state_dir=args.state_dir,
            resume=True if args.reconnect else None,
            tuning=tuning,
            ops=ops,
            msg_timeout=msg_timeout,
            bounce_size=bounce,
            irq_placement=irq_placement,
            user_bounce=args.bounce_memory == "daemon",
            bind=args.bind,
        )
        return serve(daemon)
    finally:
        if backend is not None:
            backend.close()


def serve(daemon: Daemon) -> int:
    """Run ``daemon`` as the command does: READY on stdout once the node exists, until
    SIGINT or SIGTERM (or ``ctl NAME quit``)."""
    daemon.on_ready = announce
    daemon.run(signals=True)
    if daemon.left_attached:
        log.warning(
            "the same command serves %s again; 'pyvduse destroy %s' removes it once the VM has closed it",
            daemon.name,
            daemon.name,
        )
    return 0


def announce(daemon: Daemon) -> None:
    """The one line scripts wait for (flushed: they read it through a pipe)."""
    sys.stdout.write(f"READY name={daemon.name} dev={daemon.node}\n")
    sys.stdout.flush()


def parse_bounce_size(text: str | None) -> int | None:
    """--bounce-size in bytes (None: the kernel's default), within what the kernel takes."""
    if text is None:
        return None
    try:
        size = parse_size(text)
    except ValueError as e:
        raise UserError(f"--bounce-size: {e}") from None
    if not MIN_BOUNCE_SIZE <= size <= MAX_BOUNCE_SIZE:
        raise UserError(f"--bounce-size {text} must be 1M to 1G")
    return size


def parse_msg_timeout(text: str | None) -> int | None:
    """--msg-timeout in whole seconds (None: the kernel's default of 30)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--msg-timeout {text} is not a number of seconds") from None
    if not value.is_integer():
        raise UserError(
            f"--msg-timeout {text}: the kernel counts whole seconds; use {max(int(value) + 1, 1)}"
        )
    if not 0 <= value <= MAX_MSG_TIMEOUT:
        raise UserError(f"--msg-timeout {text} must be 0 (forever) to {MAX_MSG_TIMEOUT}")
    return int(value)


def parse_irq_cpus(text: str) -> IrqPlacement:
    try:
        return IrqPlacement.parse(text, parse_cpu_list(sysfs.online_cpus_text()))
    except ValueError as e:
        raise UserError(f"--irq-cpus {text}: {e}") from None
