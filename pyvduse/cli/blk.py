"""``pyvduse blk``: serve a disk image (or RAM, or nothing) as a virtio-blk device."""

from __future__ import annotations

import argparse
import errno
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyvduse.backend.base import Backend
from pyvduse.backend.file import FileBackend
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.cli.stop_signals import StopSignals
from pyvduse.device.base import VirtioDevice
from pyvduse.device.blk import BlkConfigError, BlkDevice, BlkOptions
from pyvduse.errors import UserError
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.engine import DataPath
from pyvduse.ops.service import DEFAULT_DRAIN_TIMEOUT, Operations, OpsOptions
from pyvduse.runtime.executors import DEFAULT_IO_THREADS, Aio
from pyvduse.runtime.server import DeviceServer
from pyvduse.runtime.state_file import DEFAULT_STATE_DIR, IdentityMismatch, StateFile
from pyvduse.runtime.tuning import HOLD_MAX_US, MAX_US, PUBLISH_AFTER_US, QueueTuning
from pyvduse.sizes import parse_size
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.control import missing_module_hint
from pyvduse.transport.kernel.device_fd import device_in_use
from pyvduse.transport.kernel.irq_affinity import FOLLOW, IrqPlacement, parse_cpu_list
from pyvduse.transport.kernel.transport import KernelTransport

log = logging.getLogger("pyvduse")

NODE_WAIT_SECONDS = 30.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("blk", help="serve a virtio-blk device",
                       description="Create a VDUSE virtio-blk device, attach it to the vdpa "
                       "bus and serve it until SIGINT or SIGTERM.")
    p.add_argument("--name", required=True, help="device name (/dev/vduse/NAME, vdpa NAME)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", metavar="PATH", help="raw image file or block device to serve")
    src.add_argument("--memory", metavar="SIZE", help="serve SIZE bytes of RAM (e.g. 1G)")
    src.add_argument("--null", metavar="SIZE", help="discard writes, read zeroes, SIZE bytes")
    p.add_argument("--readonly", action="store_true", help="offer the device read-only")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="virtqueues (default 1)")
    p.add_argument("--queue-size", type=int, default=256, metavar="N",
                   help="descriptors per virtqueue, a power of two (default 256)")
    p.add_argument("--block-size", type=int, default=512, choices=(512, 4096),
                   help="logical block size (default 512)")
    p.add_argument("--serial", default="", help="serial number, up to 20 bytes")
    add_device_arguments(p)
    p.add_argument("--data-path", choices=[d.value for d in DataPath], default="auto",
                   help="who serves the queues: 'native' (the C loop of pyvduse.fastpath), "
                   "'python' (the reference engine) or 'auto' (native where it can; "
                   "the default)")
    p.add_argument("--poll-us", type=int, default=0, metavar="US",
                   help="native data path: when a queue runs empty, keep watching it this "
                   "many microseconds with notifications off before sleeping (fewer kicks "
                   "and wake-ups under load, at the price of CPU; default 0)")
    p.add_argument("--publish-us", type=int, default=PUBLISH_AFTER_US, metavar="US",
                   help="while a queue serves a run of requests, hand the finished ones to "
                   "the driver (and interrupt it) as soon as one took this many "
                   "microseconds, instead of at the end of the run (default "
                   f"{PUBLISH_AFTER_US}; short requests are held at most "
                   f"{HOLD_MAX_US} us or this, whichever is more; larger: fewer interrupts, "
                   "later completions)")
    p.add_argument("--irq-cpus", default=FOLLOW, metavar="follow|first|driver|LIST",
                   help="where the kernel runs each queue's interrupt callback "
                   "(vqN/irq_cb_affinity): 'follow' (the default: the CPU of the driver's "
                   "mask that the queue's native worker runs on, the first one until then), "
                   "'first' CPU of the driver's mask (one CPU per queue, like a hardware "
                   "interrupt), 'driver' (its whole mask, rotating over it), or a CPU list "
                   "like 0,2-3 (queue i on the i-th CPU of the list)")
    p.add_argument("--aio", choices=[a.value for a in Aio], default=Aio.IO_URING.value,
                   help="how a file backend's reads, writes and flushes run, many per queue "
                   "at once: 'io_uring' (the native data path submits them to an io_uring; "
                   "queues on the Python engine use a thread pool; the default), 'threads' "
                   "(a thread pool, Python engine) or 'sync' (one at a time, inline)")
    p.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                   help="'writeback' (the default: through the host's page cache) or 'none' "
                   "(O_DIRECT: no page cache; requests the device cannot take directly are "
                   "copied through aligned buffers)")
    p.add_argument("--bounce-memory", choices=("kernel", "daemon"), default="kernel",
                   help="whose pages VDUSE's bounce buffer (where the kernel copies every "
                   "request's data) is: the kernel's (the default) or the daemon's own "
                   "(VDUSE_IOTLB_REG_UMEM), which direct I/O (--cache none) can reach with "
                   "no copy of ours")
    p.add_argument("--io-threads", type=int, default=DEFAULT_IO_THREADS, metavar="N",
                   help=f"threads of the pool for --aio threads (default {DEFAULT_IO_THREADS})")
    p.add_argument("--worker-cpus", choices=("any", "irq"), default="any",
                   help="where each queue's worker thread runs: 'any' (wherever the "
                   "scheduler puts it; the default) or 'irq', on the CPUs its interrupts "
                   "are handled on (the daemon and the completion work share them and leave "
                   "the other CPUs to the application: more IOPS at depth when the "
                   "application runs elsewhere, less at iodepth 1 when it does not)")
    add_ops_arguments(p)
    p.set_defaults(func=run)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """What every device daemon takes about the VDUSE device and its crash recovery."""
    p.add_argument("--msg-timeout", type=int, metavar="SECONDS",
                   help="kernel's per-message timeout (sysfs msg_timeout)")
    p.add_argument("--bounce-size", metavar="SIZE",
                   help="kernel bounce buffer size, 1M to 1G (sysfs bounce_size)")
    p.add_argument("--packed", action="store_true",
                   help="offer the packed virtqueue layout (VIRTIO_F_RING_PACKED)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help="where the crash-recovery state lives (default /run/pyvduse)")
    p.add_argument("--reconnect", action="store_true",
                   help="require an existing device left by a dead daemon, and resume it "
                   "(the default when /dev/vduse/NAME exists)")


def bounce_size(args: argparse.Namespace) -> int | None:
    """``--bounce-size`` in bytes (None: the kernel's default)."""
    if args.bounce_size is None:
        return None
    try:
        return parse_size(args.bounce_size)
    except ValueError as e:
        raise UserError(str(e)) from None


def resuming(args: argparse.Namespace) -> bool:
    """Whether ``--name`` is a device a dead daemon left (then we resume it), checking that
    no daemon serves it and that ``--reconnect`` finds one."""
    name = args.name
    reconnect = name in sysfs.vduse_devices()
    if reconnect and device_in_use(str(sysfs.device_node(name))):
        raise UserError(f"a VDUSE device named '{name}' already exists and a running daemon "
                        "serves it: choose another --name")
    if args.reconnect and not reconnect:
        raise UserError(f"there is no device '{name}' to reconnect to")
    return reconnect


def add_ops_arguments(p: argparse.ArgumentParser) -> None:
    """Operations: management socket, metrics endpoint, shutdown drain."""
    p.add_argument("--control", metavar="PATH",
                   help="management socket for 'pyvduse ctl' (default /run/pyvduse/NAME.sock)")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics "
                   "(needs prometheus_client)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT,
                   metavar="SECONDS", help="on SIGTERM, wait this long for requests in "
                   f"flight before detaching (default {DEFAULT_DRAIN_TIMEOUT:g})")


def keep_identity(state: StateFile | None, device: BlkDevice) -> Callable[[int], None] | None:
    """After a live resize the state file must give the new size, or a restart after a crash
    would refuse to resume the device."""
    if state is None:
        return None

    def on_resize(size: int) -> None:
        state.identity = device_identity(device)
        state.write_identity()

    return on_resize


def ops_options(args: argparse.Namespace) -> OpsOptions:
    """The operations options, checked (one-line UserError) before any device exists."""
    ops = OpsOptions(control=args.control, metrics=args.metrics,
                     drain_timeout=args.drain_timeout)
    ops.validate()
    return ops


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..", "control") or len(name.encode()) > 255:
        raise UserError(f"'{name}' cannot be a device name: use 1 to 255 characters, no '/'")


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend the arguments ask for; UserError on a missing file or bad size."""
    if args.file is not None:
        path = args.file
        if not os.path.exists(path):
            raise UserError(f"image file {path} does not exist: create it first, for example "
                            f"'truncate -s 1G {path}'")
        try:
            return FileBackend(path, readonly=args.readonly, direct=args.cache == "none")
        except PermissionError:
            mode = "reading" if args.readonly else "reading and writing"
            raise UserError(f"no permission to open {path} for {mode}: fix its permissions "
                            "or use --readonly") from None
        except OSError as e:
            if e.errno == errno.EINVAL and args.cache == "none":
                raise UserError(f"{path} cannot be opened for direct I/O (--cache none): its "
                                "filesystem does not support O_DIRECT; use --cache "
                                "writeback") from None
            raise UserError(f"cannot open {path}: {e.strerror}") from None
    text = args.memory if args.memory is not None else args.null
    try:
        size = parse_size(text)
    except ValueError as e:
        raise UserError(str(e)) from None
    if size <= 0:
        raise UserError("the size must be larger than zero")
    return MemoryBackend(size) if args.memory is not None else NullBackend(size)


def preflight() -> None:
    """Fail early, with what to do, when the kernel side is missing."""
    if not sysfs.CONTROL.exists():
        raise UserError(missing_module_hint())
    if not sysfs.vdpa_drivers():
        raise UserError("no vdpa bus driver is loaded: run 'modprobe virtio_vdpa' for a "
                        "host block device (or 'modprobe vhost_vdpa' to give it to a VM)")


def wait_for_node(name: str, stop: threading.Event, timeout: float = NODE_WAIT_SECONDS) -> str:
    """The device node the bound vdpa driver created for ``name``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        driver = sysfs.bound_driver(name)
        if driver == "vhost_vdpa":
            nodes = [f"/dev/{n}" for n in sysfs.vhost_devices(name)]
        else:
            nodes = [f"/dev/{n}" for n in sysfs.block_devices(name)]
        for node in nodes:
            if Path(node).exists():
                return node
        time.sleep(0.05)
    raise UserError(f"no device node appeared for '{name}' within {timeout:.0f} s: check "
                    "'dmesg' for virtio_blk errors")


def build_device(args: argparse.Namespace, backend: Backend) -> BlkDevice:
    options = BlkOptions(
        readonly=args.readonly, block_size=args.block_size, serial=args.serial,
        num_queues=args.queues, queue_size=args.queue_size, packed=args.packed,
    )
    try:
        return BlkDevice(backend, options)
    except BlkConfigError as e:
        raise UserError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    _check_name(args.name)
    bounce = bounce_size(args)
    ops = ops_options(args)
    data_path = DataPath(args.data_path)
    for option, value in (("--poll-us", args.poll_us), ("--publish-us", args.publish_us)):
        if not 0 <= value <= MAX_US:
            raise UserError(f"{option} {value} must be 0 to {MAX_US}")
    if not 1 <= args.io_threads <= 1024:
        raise UserError(f"--io-threads {args.io_threads} must be 1 to 1024")
    tuning = QueueTuning(data_path=data_path, poll_us=args.poll_us, publish_us=args.publish_us,
                         workers_on_irq_cpus=args.worker_cpus == "irq", aio=Aio(args.aio),
                         io_threads=args.io_threads)
    irq_placement = parse_irq_cpus(args.irq_cpus)
    backend = make_backend(args)
    try:
        device = build_device(args, backend)
        why_not = native.why_not(device, args.packed)
        if data_path is DataPath.NATIVE and why_not is not None:
            raise UserError(f"--data-path native: {why_not}; or use --data-path python")
        preflight()
        reconnect = resuming(args)
        state = open_state(args.name, args.state_dir, device, reconnect)
        if data_path is DataPath.AUTO and why_not is not None:
            log.info("queues served by the Python engine: %s", why_not)
        return serve(args.name, device, msg_timeout=args.msg_timeout, bounce_size=bounce,
                     state=state, reconnect=reconnect, ops=ops, tuning=tuning,
                     irq_placement=irq_placement,
                     user_bounce=args.bounce_memory == "daemon")
    finally:
        backend.close()


def parse_irq_cpus(text: str) -> IrqPlacement:
    try:
        return IrqPlacement.parse(text, parse_cpu_list(sysfs.online_cpus_text()))
    except ValueError as e:
        raise UserError(f"--irq-cpus {text}: {e}") from None


def device_identity(device: BlkDevice) -> dict[str, object]:
    """What must not change across a restart for the in-flight log to apply."""
    spec = device.spec()
    return {"backend": device.backend.description, "size": device.backend.size,
            "features": spec.features, "queues": spec.num_queues,
            "queue_size": spec.queue_size, "block_size": device.options.block_size}


def open_state(name: str, state_dir: Path, device: VirtioDevice, reconnect: bool,
               identity: dict[str, object] | None = None) -> StateFile:
    """The device's state file: new for a new device, checked for a reconnect."""
    if identity is None:
        assert isinstance(device, BlkDevice)
        identity = device_identity(device)
    path = state_dir / name / "state"
    if reconnect and not path.exists():
        raise UserError(
            f"a VDUSE device named '{name}' already exists but has no pyvduse state in "
            f"{path.parent}: choose another --name, or remove the old one with "
            f"'pyvduse destroy {name}'")
    try:
        state = StateFile.for_device(name, state_dir, identity, device.spec().num_queues,
                                     device.spec().queue_size)
    except OSError as e:
        raise UserError(f"cannot use state directory {state_dir}: {e.strerror}; choose "
                        "another with --state-dir") from None
    if reconnect:
        try:
            state.check_identity()
        except IdentityMismatch as e:
            state.close()
            raise UserError(
                f"refusing to resume '{name}': its configuration differs ({e}); start it with "
                f"the options it was created with, or 'pyvduse destroy {name}'") from None
    else:
        state.write_identity()
    return state


def block_node(name: str, stop: threading.Event) -> tuple[str, str]:
    """What READY says of a block device once its node exists: ``dev=/dev/vdX``."""
    node = wait_for_node(name, stop)
    return f"dev={node}", node


#: Waits until the device is usable from the host; returns (the READY line's field, the
#: node or interface name).
ReadyWaiter = Callable[[str, threading.Event], tuple[str, str]]


def serve(name: str, device: VirtioDevice, *, msg_timeout: int | None = None,
          bounce_size: int | None = None, state: StateFile | None = None,
          reconnect: bool = False, ops: OpsOptions | None = None,
          tuning: QueueTuning | None = None, irq_placement: IrqPlacement | None = None,
          user_bounce: bool = False, wait_ready: ReadyWaiter = block_node,
          operations_hook: Callable[[Operations], None] | None = None) -> int:
    """Create, attach, announce, serve until a signal, then tear everything down."""
    stop = threading.Event()
    broken: list[str] = []

    def on_broken(why: str) -> None:
        broken.append(why)
        stop.set()

    signals = StopSignals(stop).install()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where is it stuck? kill -USR1
    server = DeviceServer(device, state, tuning)
    transport = KernelTransport(name, device.spec(), server, msg_timeout=msg_timeout,
                                bounce_size=bounce_size, irq_placement=irq_placement,
                                user_bounce=user_bounce)
    transport.on_broken = on_broken
    server.bind(transport)
    operations = Operations(name, server, transport, ops, on_quit=stop.set,
                            on_resize=keep_identity(state, device)
                            if isinstance(device, BlkDevice) else None)
    if operations_hook is not None:
        operations_hook(operations)
    try:
        if reconnect:
            transport.reconnect()
            log.info("resumed %s after its previous daemon stopped", name)
        else:
            transport.create()
            transport.attach()
        operations.start()
        field, node = wait_ready(name, stop)
        if not stop.is_set():
            sys.stdout.write(f"READY name={name} {field}\n")
            sys.stdout.flush()
            backend = getattr(device, "backend", None)
            log.info("serving %s on %s", getattr(backend, "description", "a device"), node)
            operations.ready(node)
        while not stop.wait(1.0):
            pass
        if not broken:
            log.info("%s, shutting down", signals.describe())
        operations.shutdown(drain_requests=not broken, abort=signals.hurry)
    finally:
        try:
            transport.close()
        finally:
            operations.close()
        signals.restore()
        faulthandler.unregister(signal.SIGUSR1)
        if state is not None:  # nothing to recover once the device is gone
            state.remove() if name not in sysfs.vduse_devices() else state.close()
    if broken:
        raise UserError(f"device '{name}' broke: {broken[0]}; it was removed, start again")
    return 0
