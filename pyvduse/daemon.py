"""An embeddable daemon: serve one device from any program, on the real kernel or the model.

``Daemon`` is what ``pyvduse blk`` runs, as an object: it creates (or resumes) the VDUSE
device, attaches it, keeps the crash-recovery state file, opens the management socket and
metrics when asked, and tears everything down on ``stop()``. It prints nothing and installs
no signal handler unless asked (``run(signals=True)``), so any thread of any program can
start and stop it::

    from pyvduse import BlkDevice, Daemon, MemoryBackend

    with Daemon(BlkDevice(MemoryBackend(64 << 20)), "ram0") as d:
        print("serving", d.node)     # /dev/vdX on the real kernel
        ...                          # the device is served until the block ends

With ``model=True`` the kernel half is pyvduse's in-process model instead of VDUSE: no root,
no kernel module, and ``daemon.kernel`` is what a model driver (``pyvduse.testing``) probes.
Errors are ``pyvduse.errors`` types worded for the API; the command line words them for a
terminal.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from pyvduse.device.base import VirtioDevice
from pyvduse.errors import (
    ConfigError,
    DeviceBroken,
    DeviceBusy,
    DeviceError,
    KernelMissing,
    NameTaken,
    NoSuchDevice,
    StateMismatch,
)
from pyvduse.ops.follow_size import SizeFollower
from pyvduse.ops.service import Operations, OpsOptions
from pyvduse.ops.stop_signals import StopSignals
from pyvduse.ops.target import Target
from pyvduse.runtime.server import DeviceServer
from pyvduse.runtime.state_file import DEFAULT_STATE_DIR, IdentityMismatch, StateFile
from pyvduse.runtime.tuning import QueueTuning
from pyvduse.transport.base import Transport
from pyvduse.transport.kernel.vdpa_bind import DRIVERS as BIND_DRIVERS
from pyvduse.transport.kernel.vdpa_bind import MODULE_HINT

log = logging.getLogger(__name__)

#: How long ``start`` waits for the kernel's driver to make the device node.
NODE_WAIT_SECONDS = 30.0


def check_kernel(bind: str = "virtio") -> None:
    """KernelMissing, saying what to load, when the kernel side of VDUSE is not there, or
    the vdpa bus driver ``bind`` names (see ``Daemon``)."""
    from pyvduse.transport.kernel import sysfs
    from pyvduse.transport.kernel.control import missing_module_hint

    if not sysfs.CONTROL.exists():
        raise KernelMissing(missing_module_hint())
    driver = BIND_DRIVERS[bind]
    if driver not in sysfs.vdpa_drivers():
        raise KernelMissing(
            f"the {driver} module is not loaded: run 'modprobe {driver}' "
            f"(it gives the device to {MODULE_HINT[driver]})"
        )


def check_bind(bind: str, user_bounce: bool = False) -> None:
    """ConfigError unless the device can be given to ``bind`` with these options."""
    if bind not in BIND_DRIVERS:
        raise ConfigError(
            f"'{bind}' is not a vdpa driver pyvduse binds to: use one of {', '.join(sorted(BIND_DRIVERS))}",
            option="bind",
        )
    if bind == "vhost" and user_bounce:
        raise ConfigError(
            "a bounce buffer in the daemon's memory is virtio_vdpa's; bound to "
            "vhost_vdpa the device uses the VM's own memory: leave it out",
            option="user_bounce",
        )


class Stopped(DeviceError):
    """``stop()`` came while ``start()`` was still waiting for the device node."""


def check_name(name: str) -> None:
    """ConfigError unless ``name`` can name a VDUSE device (and its vdpa device)."""
    if not name or "/" in name or name in (".", "..", "control") or len(name.encode()) > 255:
        raise ConfigError(f"'{name}' cannot be a device name: use 1 to 255 characters, no '/'", option="name")


class Daemon:
    """Serves ``device`` as VDUSE device ``name`` until ``stop()``.

    Kernel options (ignored on the model): ``msg_timeout`` (whole seconds the kernel waits
    for each answer; None: its default), ``bounce_size`` (bytes), ``irq_placement``
    (``pyvduse.transport.kernel.irq_affinity.IrqPlacement``), ``user_bounce`` (the bounce
    buffer in the daemon's own memory). ``state_dir``: where the crash-recovery state lives
    (None: no state file, no resuming; on the model, none unless one is given: a model run
    needs no root and writes nothing under /run/pyvduse). ``resume``: None resumes a device a dead daemon left
    (its node exists), True insists on one, False refuses to. ``ops``: the management socket
    and metrics (None: neither). ``bind``: the vdpa bus driver the device is given to
    (``virtio``: virtio_vdpa, a local device; ``vhost``: vhost_vdpa, /dev/vhost-vdpa-N for
    a VM), and to no other (``transport.kernel.vdpa_bind``).
    """

    def __init__(
        self,
        device: VirtioDevice,
        name: str,
        *,
        model: bool = False,
        state_dir: Path | None = DEFAULT_STATE_DIR,
        resume: bool | None = None,
        tuning: QueueTuning | None = None,
        ops: OpsOptions | None = None,
        msg_timeout: int | None = None,
        bounce_size: int | None = None,
        irq_placement: Any = None,
        user_bounce: bool = False,
        node_timeout: float = NODE_WAIT_SECONDS,
        bind: str = "virtio",
    ) -> None:
        check_name(name)
        check_bind(bind, user_bounce)
        if ops is not None:
            ops.validate()
        self.device = device
        self.name = name
        self.model = model
        if model and state_dir is DEFAULT_STATE_DIR:  # the default: a model keeps no state
            state_dir = None
        self.state_dir = state_dir
        self.resume = resume
        self.ops_options = ops
        self.node_timeout = node_timeout
        self.bind = bind
        self._kernel_options = {
            "msg_timeout": msg_timeout,
            "bounce_size": bounce_size,
            "irq_placement": irq_placement,
            "user_bounce": user_bounce,
            "driver": BIND_DRIVERS[bind],
        }
        self.server = DeviceServer(device, None, tuning)
        #: The device node once started: /dev/vdX (virtio_vdpa), /dev/vhost-vdpa-N; None on
        #: the model.
        self.node: str | None = None
        #: The model's kernel half (``model=True``), for a model driver to probe.
        self.kernel: Any = None
        self.transport: Transport | None = None
        self.resumed = False
        #: ``stop()`` left the device attached: a VM still held it (see ``stop``).
        self.left_attached = False
        #: Why the kernel gave up on the device, once it did (the daemon then stops).
        self.broken: str | None = None
        self._operations: Operations | None = None
        #: Follows a backend's storage that someone else resizes (an RBD image).
        self.size_follower: SizeFollower | None = None
        self._state: StateFile | None = None
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()  # a start still waiting gives up
        self._stop_lock = threading.Lock()
        self._started = False
        #: Called (on the starting thread) once the device is served and its node exists.
        self.on_ready: Callable[[Daemon], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Daemon:
        """Create (or resume) the device, attach it and serve it; returns once the device
        node exists (``node``). Raises a ``pyvduse.errors`` type, leaving nothing behind."""
        if self._started:
            raise RuntimeError("a Daemon starts once; make a new one")
        self._started = True
        try:
            if self.model:
                self._start_model()
            else:
                self._start_kernel()
        except BaseException:
            self._teardown(drain=False)
            raise
        return self

    def stop(self, *, drain: bool = True, abort: threading.Event | None = None) -> None:
        """Stop serving (any thread; idempotent): let the requests in flight finish (up to
        the ops drain timeout, unless ``drain`` is False or ``abort`` gets set), detach and
        destroy the device, remove the state file.

        Bound to vhost_vdpa, the kernel's detach waits (beyond any signal) until whoever
        opened the node closes it: while a process (a VM) holds it, the device is served on
        and detached once it is closed; if ``abort`` gets set first, the device is left
        attached (``left_attached``), to be resumed by a later daemon, as after a crash."""
        self._stop_requested.set()
        leave = self._wait_for_release(abort)
        self._teardown(drain=drain, abort=abort, leave=leave)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until something asks the daemon to stop (``request_stop()``, the ``quit``
        command of the management socket, the kernel marking the device broken) or it has
        stopped; False after ``timeout`` seconds. Then call ``stop()``."""
        return self._stop_requested.wait(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stats(self) -> dict[str, Any]:
        """What ``pyvduse ctl NAME stats`` shows, read in-process (no socket needed): each
        queue's requests, bytes, errors, in flight, latency and depth, and their totals."""
        from pyvduse.ops.inspect import stats
        from pyvduse.ops.target import Target

        return stats(Target(self.name, self.server, self.transport))

    def run(self, *, signals: bool = False) -> None:
        """Start, serve until stopped, stop. With ``signals`` (main thread only), SIGINT and
        SIGTERM stop it (a second one stops waiting for requests in flight) and SIGUSR1
        dumps every thread's stack."""
        if signals and threading.current_thread() is not threading.main_thread():
            raise ConfigError("signal handlers can only be installed from the main thread", option="signals")
        stop = self._stop_requested
        trap = StopSignals(stop).install() if signals else None
        if signals:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        try:
            self.start()
            while not stop.wait(0.5):
                pass
            if trap is not None and stop.is_set():
                log.info("%s, shutting down", trap.describe())
            self.stop(abort=trap.hurry if trap is not None else None)
        finally:
            if trap is not None:
                trap.restore()
                faulthandler.unregister(signal.SIGUSR1)
        if self.broken is not None:
            raise DeviceBroken(self.name, f"device '{self.name}' broke: {self.broken}; it was removed")

    def request_stop(self) -> None:
        """Ask ``run()`` (or a ``start()`` still waiting for the node) to stop, without
        waiting: safe from a signal handler or any thread."""
        self._stop_requested.set()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(drain=t is None)

    # -- starting -------------------------------------------------------------------------

    def _start_model(self) -> None:
        from pyvduse.transport.model.kernel import ModelKernel
        from pyvduse.transport.model.transport import ModelTransport

        timeout = self._kernel_options["msg_timeout"]
        self.kernel = ModelKernel(self.device.spec(), msg_timeout=5.0 if timeout is None else float(timeout))
        transport = ModelTransport(self.kernel, self.server)
        self.transport = transport
        self.server.bind(transport)
        self._state = self._open_state(resume=False)
        self.server.state = self._state
        self._start_operations()
        transport.start()
        self._ready(None)

    def _start_kernel(self) -> None:
        from pyvduse.transport.kernel import sysfs
        from pyvduse.transport.kernel.device_fd import device_in_use
        from pyvduse.transport.kernel.irq_affinity import IrqPlacement
        from pyvduse.transport.kernel.transport import KernelTransport

        exists = self.name in sysfs.vduse_devices()
        if self.resume is True and not exists:
            raise NoSuchDevice(self.name, f"there is no device '{self.name}' to resume", option="name")
        if exists and self.resume is False:
            raise NameTaken(
                self.name,
                f"a VDUSE device named '{self.name}' already exists: "
                "choose another name, or destroy the old one",
                option="name",
            )
        if exists and device_in_use(str(sysfs.device_node(self.name))):
            raise DeviceBusy(
                self.name,
                f"a VDUSE device named '{self.name}' already exists "
                "and a running daemon serves it: choose another name",
                option="name",
            )
        bound = sysfs.bound_driver(self.name) if exists else None
        if bound is not None and bound != self._kernel_options["driver"]:
            other = next((k for k, d in BIND_DRIVERS.items() if d == bound), bound)
            raise ConfigError(
                f"device '{self.name}' is attached to {bound}: resume it bound to '{other}', or destroy it",
                option="bind",
            )
        self._state = self._open_state(resume=exists)
        self.server.state = self._state
        opts = dict(self._kernel_options)
        if opts["irq_placement"] is None:
            opts["irq_placement"] = IrqPlacement.parse("follow", [])
        transport = KernelTransport(self.name, self.device.spec(), self.server, **opts)
        transport.on_broken = self._on_broken
        transport.irq_mask_store = self._state
        self.transport = transport
        self.server.bind(transport)
        if exists:
            transport.reconnect()
            self.resumed = True
            log.info("resumed %s after its previous daemon stopped", self.name)
        else:
            transport.create()
            transport.attach()
        self._start_operations()
        self._ready(self._wait_for_node())

    def _start_operations(self) -> None:
        if self.ops_options is None:
            return
        assert self.transport is not None
        self._operations = Operations(
            self.name,
            self.server,
            self.transport,
            self.ops_options,
            on_quit=self._quit,
            on_resize=self._on_resize,
        )
        self._operations.start()

    def _follow_storage_size(self) -> None:
        assert self.transport is not None
        if self._operations is not None:
            target = self._operations.target
        else:
            target = Target(self.name, self.server, self.transport, on_resize=self._on_resize)
        follower = SizeFollower(target)
        if follower.start():
            self.size_follower = follower

    def _ready(self, node: str | None) -> None:
        self._follow_storage_size()
        self.node = node
        if self._operations is not None:
            self._operations.ready(node or f"model:{self.name}")
        log.info("serving %s on %s", self.name, node or "the model")
        if self.on_ready is not None:
            self.on_ready(self)

    def _wait_for_node(self) -> str:
        from pyvduse.transport.kernel import sysfs

        deadline = time.monotonic() + self.node_timeout
        while time.monotonic() < deadline and not self._stop_requested.is_set():
            if sysfs.bound_driver(self.name) == "vhost_vdpa":
                nodes = [f"/dev/{n}" for n in sysfs.vhost_devices(self.name)]
            else:
                nodes = [f"/dev/{n}" for n in sysfs.block_devices(self.name)]
            for node in nodes:
                if Path(node).exists():
                    return node
            time.sleep(0.05)
        if self.broken is not None:
            raise DeviceBroken(self.name, f"device '{self.name}' broke while attaching: {self.broken}")
        if self._stop_requested.is_set():
            raise Stopped(self.name, f"asked to stop before '{self.name}' had a device node")
        raise NoSuchDevice(
            self.name,
            f"no device node appeared for '{self.name}' within "
            f"{self.node_timeout:.0f} s: check 'dmesg' for driver errors",
        )

    # -- state file -----------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return self.device.identity()

    def _open_state(self, resume: bool) -> StateFile | None:
        """The device's state file: new for a new device, checked for a resume."""
        if self.state_dir is None:
            if resume:
                raise StateMismatch(
                    self.name,
                    f"device '{self.name}' was left by a dead "
                    "daemon, and without a state directory it cannot be "
                    "resumed: give the one it used",
                    option="state_dir",
                )
            return None
        path = self.state_dir / self.name / "state"
        if resume and not path.exists():
            raise NameTaken(
                self.name,
                f"a VDUSE device named '{self.name}' already exists but "
                f"has no pyvduse state in {path.parent}: choose another name, or "
                "destroy the old one",
                option="name",
            )
        spec = self.device.spec()
        try:
            state = StateFile.for_device(
                self.name, self.state_dir, self._identity(), spec.num_queues, spec.queue_size
            )
        except OSError as e:
            raise ConfigError(
                f"cannot use state directory {self.state_dir}: {e.strerror}; choose another",
                option="state_dir",
            ) from None
        if resume:
            try:
                state.check_identity()
            except IdentityMismatch as e:
                state.close()
                raise StateMismatch(self.name, f"its configuration differs ({e})") from None
        else:
            state.write_identity()
        return state

    def _on_resize(self, size: int) -> None:
        """After a live resize the state file must give the new size, or a restart after a
        crash would refuse to resume the device."""
        if self._state is not None:
            self._state.identity = self._identity()
            self._state.write_identity()

    # -- stopping -------------------------------------------------------------------------

    def _on_broken(self, why: str) -> None:
        self.broken = why
        self._stop_requested.set()

    def _quit(self) -> None:
        """The management socket's ``quit``: whoever waits in ``run()``/``wait()`` stops."""
        self._stop_requested.set()

    def _wait_for_release(self, abort: threading.Event | None) -> bool:
        """While a process holds our /dev/vhost-vdpa-N, serve on and wait for it to close
        it; True: ``abort`` came first, leave the device attached."""
        if self.model or self.node is None or self.broken is not None or self.stopped:
            return False
        from pyvduse.transport.kernel import sysfs

        if sysfs.bound_driver(self.name) != "vhost_vdpa":
            return False
        holders = sysfs.node_holders(self.node)
        if not holders:
            return False
        log.warning(
            "%s is open by process %s (a VM?): serving it until it closes it, then "
            "detaching (stop again to leave the device attached instead)",
            self.node,
            ",".join(map(str, holders)),
        )
        while holders:
            if abort is not None and abort.wait(0.5):
                log.warning("left %s attached, for a later daemon to resume", self.name)
                return True
            if abort is None:
                time.sleep(0.5)
            holders = sysfs.node_holders(self.node)
        log.info("%s was closed: detaching", self.node)
        return False

    def _teardown(self, *, drain: bool, abort: threading.Event | None = None, leave: bool = False) -> None:
        with self._stop_lock:
            if self.size_follower is not None:
                self.size_follower.stop()
                self.size_follower = None
            try:
                if self._operations is not None:
                    self._operations.shutdown(drain_requests=drain and self.broken is None, abort=abort)
            finally:
                try:
                    if self.transport is not None:
                        if leave:
                            from pyvduse.transport.kernel.transport import KernelTransport

                            assert isinstance(self.transport, KernelTransport)
                            self.transport.close(leave=True)
                            self.left_attached = True
                        else:
                            self.transport.close()
                        self.transport = None
                finally:
                    if self._operations is not None:
                        self._operations.close()
                        self._operations = None
                    self._close_state()
                    self._stopped.set()

    def _close_state(self) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        if self.model:
            state.remove()
            return
        from pyvduse.transport.kernel import sysfs

        # nothing to recover once the device is gone; a device still there (we could not
        # destroy it) keeps its state for the next daemon
        state.remove() if self.name not in sysfs.vduse_devices() else state.close()
