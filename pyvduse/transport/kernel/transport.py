"""The real-kernel transport: a VDUSE device under ``/dev/vduse`` attached to the vdpa bus.

Lifecycle (see docs of VDUSE): create the device, set up its queues, start the control
thread, then attach over vdpa netlink. The control thread answers every kernel message
(SET_STATUS, GET_VQ_STATE, UPDATE_IOTLB) and is never blocked by the data path: queue
workers run on their own threads. Attach and detach block in the kernel until the driver has
probed or removed the device, which needs the control thread's answers, hence the thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
from collections.abc import Callable
from types import TracebackType

from pyvduse.abi import vduse as v
from pyvduse.abi.virtio import Status
from pyvduse.device.base import DeviceSpec
from pyvduse.errors import (
    AccessDenied,
    DeviceBroken,
    DeviceBusy,
    KernelMissing,
    KernelRefused,
    NoSuchDevice,
)
from pyvduse.ring.memory import GuestMemory
from pyvduse.transport.base import DeviceEvents, QueueSetup, Transport
from pyvduse.transport.kernel import sysfs, vdpa_bind
from pyvduse.transport.kernel.control import Control
from pyvduse.transport.kernel.device_fd import DeviceFd
from pyvduse.transport.kernel.iotlb import IotlbMapper
from pyvduse.transport.kernel.irq_affinity import (
    DRIVER,
    FOLLOW,
    IrqMaskStore,
    IrqPlacement,
    drivers_mask,
    format_cpu_list,
    format_cpumask,
    parse_cpumask,
)
from pyvduse.transport.status import StatusMachine

log = logging.getLogger(__name__)

VQ_ALIGN = 4096


class KernelTransport(Transport):
    """One VDUSE device: its creation, its control thread and its vdpa attachment."""

    def __init__(
        self,
        name: str,
        spec: DeviceSpec,
        events: DeviceEvents,
        *,
        msg_timeout: int | None = None,
        bounce_size: int | None = None,
        irq_placement: IrqPlacement | None = None,
        user_bounce: bool = False,
        driver: str = "virtio_vdpa",
    ) -> None:
        self.name = name
        self.driver = driver  # the vdpa bus driver attach() gives the device to
        self.user_bounce = user_bounce  # --bounce-memory daemon: see iotlb
        self.spec = spec
        self.events = events
        self.msg_timeout = msg_timeout
        self.bounce_size = bounce_size
        self.irq_placement = irq_placement or IrqPlacement()
        self._place_irqs = False  # the kernel has vqN/irq_cb_affinity and we may change it
        self._driver_masks: dict[int, list[int]] = {}  # each queue's, as the driver set it
        #: Where the driver's masks outlive this daemon (the state file), so a daemon that
        #: resumes the device knows them: by then the kernel shows the CPU we narrowed to.
        self.irq_mask_store: IrqMaskStore | None = None
        self.status_machine = StatusMachine(
            events,
            read_features=self._get_features,
            start_queues=self._start_queues,
            forget=self._forget_driver_state,
        )
        self.negotiated = 0
        #: The VDUSE API version the device speaks (chosen at create(), asked of the kernel
        #: at reconnect()) and the VDUSE control features the kernel offers (none set yet).
        self.vduse_api = v.VDUSE_API_VERSION
        self.vduse_features = 0
        self.broken: str | None = None
        self.on_broken: Callable[[str], None] | None = None
        self._created = False
        self._attached = False
        self._dev: DeviceFd | None = None
        self._iotlb: IotlbMapper | None = None
        self._kick_fds: dict[int, int] = {}
        self._late: dict[int, int] = {}  # kick fds of queues not ready at DRIVER_OK
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None

    # -- Transport ----------------------------------------------------------------------

    @property
    def memory(self) -> GuestMemory:
        assert self._iotlb is not None
        return self._iotlb.regions

    def kick_fd(self, index: int) -> int:
        return self._kick_fds[index]

    @property
    def bounce_memory(self) -> str:
        """Whose pages the bounce buffer is: ``daemon`` or ``kernel`` (see iotlb)."""
        return self._iotlb.bounce_memory if self._iotlb is not None else "kernel"

    def reply_timeout(self) -> float | None:
        """The device's msg_timeout as the kernel has it (sysfs; 30 s unless set)."""
        try:
            return float(sysfs.vduse_attr(self.name, "msg_timeout").read_text())
        except (OSError, ValueError):
            return None if self.msg_timeout is None else float(self.msg_timeout)

    def interrupt_cpus(self, index: int) -> list[int] | None:
        """vqN/irq_cb_affinity as it is now (absent on older kernels, gone after destroy)."""
        try:
            return parse_cpumask(sysfs.vq_attr(self.name, index, "irq_cb_affinity").read_text())
        except (OSError, ValueError):
            return None

    def irq_follow(self, index: int) -> tuple[str, list[int]] | None:
        mask = self._driver_masks.get(index, [])
        if self.irq_placement.mode != FOLLOW or len(mask) < 2:
            return None  # a queue the driver gave one CPU keeps it
        return str(sysfs.vq_attr(self.name, index, "irq_cb_affinity")), mask

    def irq_ioctl(self, index: int) -> tuple[int, int] | None:
        return None if self._dev is None else (self._dev.fd, v.VDUSE_VQ_INJECT_IRQ)

    def notify(self, index: int) -> None:
        assert self._dev is not None
        try:
            self._dev.vq_inject_irq(index)
        except OSError as e:
            # EINVAL: DRIVER_OK not recorded yet or being reset; EPERM: device broken.
            log.debug("interrupt for queue %d not sent: %s", index, e)

    def set_config(self, offset: int, data: bytes) -> None:
        assert self._dev is not None
        self._dev.set_config(offset, data)
        if self.status_machine.status & Status.DRIVER_OK:
            self._dev.inject_config_irq()

    # -- lifecycle ----------------------------------------------------------------------

    def create(self) -> None:
        """Create the device, open it, set up queues and start answering the kernel."""
        spec = self.spec
        with Control() as ctl:
            # API 1: one virtqueue group (every queue in group 0) in one address space.
            groups = 1 if ctl.api_version >= v.VDUSE_API_VERSION_1 else 0
            config = v.DevConfig(
                self.name,
                spec.vendor_id,
                spec.device_id,
                spec.features,
                spec.num_queues,
                VQ_ALIGN,
                spec.config,
                ngroups=groups,
                nas=groups,
            )
            ctl.create(config)
            self.vduse_api, self.vduse_features = ctl.api_version, ctl.vduse_features
        self._created = True
        log.info(
            "VDUSE API version %d, kernel features 0x%x %s",
            self.vduse_api,
            self.vduse_features,
            " ".join(v.vduse_feature_names(self.vduse_features)),
        )
        try:
            self._dev = DeviceFd.open(str(sysfs.device_node(self.name)), self.vduse_api)
            for i in range(spec.num_queues):
                self._dev.vq_setup(i, spec.queue_size)
            if self.msg_timeout is not None:
                sysfs.write_attr(sysfs.vduse_attr(self.name, "msg_timeout"), str(self.msg_timeout))
            if self.bounce_size is not None:
                sysfs.write_attr(sysfs.vduse_attr(self.name, "bounce_size"), str(self.bounce_size))
            self._check_irq_placement()
            self._iotlb = IotlbMapper(self._dev, self.user_bounce)
            self._thread = threading.Thread(target=self._control_loop, name="vduse-control", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def reconnect(self) -> None:
        """Take over an existing device whose daemon died, and resume serving it.

        The kernel kept the device attached and the driver running; it keeps no ring state, so
        the runtime's state file says where to resume. Messages the dead daemon read but never
        answered are delivered again to us.
        """
        path = str(sysfs.device_node(self.name))
        try:
            self._dev = DeviceFd.open(path)
        except FileNotFoundError:
            raise NoSuchDevice(
                self.name, f"there is no device '{self.name}' to resume", option="name"
            ) from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceBusy(
                    self.name, f"'{self.name}' is already served by a running daemon", option="name"
                ) from None
            raise
        self._created = True
        self._attached = sysfs.bound_driver(self.name) is not None or bool(sysfs.block_devices(self.name))
        try:
            with contextlib.suppress(PermissionError):  # broken: said below
                self._dev.api_version = self.vduse_api = self._dev.probe_api_version()
            with Control() as ctl:
                self.vduse_features = ctl.vduse_features
            if self.msg_timeout is not None:
                sysfs.write_attr(sysfs.vduse_attr(self.name, "msg_timeout"), str(self.msg_timeout))
            self._check_irq_placement()
            self._iotlb = IotlbMapper(self._dev, self.user_bounce)
            try:
                features = self._dev.get_features()
                infos = [self._dev.vq_get_info(i) for i in range(self.spec.num_queues)]
            except PermissionError:
                raise DeviceBroken(
                    self.name,
                    f"device '{self.name}' is broken: the kernel timed out waiting "
                    "for a daemon (msg_timeout); destroy it and create it again",
                ) from None
            if features and any(i.ready for i in infos):
                sm = self.status_machine
                sm.features = features
                sm.status = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
                self._start_queues(resume=True)
            self._thread = threading.Thread(target=self._control_loop, name="vduse-control", daemon=True)
            self._thread.start()
        except BaseException:
            # Leave the device as we found it: neither detach nor destroy it on failure.
            self._created = self._attached = False
            self.close()
            raise

    def remove_orphan(self) -> None:
        """Take over an attached device whose daemon died, then detach and destroy it."""
        with contextlib.suppress(DeviceBroken):  # the kernel asks nothing more of us
            self.reconnect()
        self._created = self._attached = True
        self.close()

    def attach(self) -> None:
        """Put the device on the vdpa bus and give it to ``driver`` (see ``vdpa_bind``);
        returns once that driver has probed it."""
        # Imported here: pyroute2 is slow to import and a reconnecting daemon never needs it.
        from pyvduse.transport.kernel.vdpa_netlink import VdpaError, VdpaNetlink

        try:
            with vdpa_bind.autoprobe_off() as manual:
                with VdpaNetlink() as nl:
                    nl.dev_add(self.name)
                self._attached = True
                if manual:
                    vdpa_bind.reserve(self.name, self.driver)
            if manual:
                vdpa_bind.bind(self.name, self.driver)
        except VdpaError as e:
            if e.errno == errno.ENOENT:
                raise KernelMissing(str(e)) from None
            if e.errno == errno.EPERM:
                raise AccessDenied("attaching a vdpa device needs CAP_NET_ADMIN: run as root") from None
            raise
        except vdpa_bind.BindError as e:
            raise KernelRefused(self.name, f"{e.strerror}; see 'dmesg'") from None
        other = vdpa_bind.wrong_driver(self.name, self.driver)
        if other is not None:  # a kernel without drivers_autoprobe: the first driver won
            raise KernelRefused(
                self.name,
                f"device '{self.name}' was taken by {other}, not "
                f"{self.driver}: unload {other} ('modprobe -r {other}') or "
                f"bind the device to {other}",
                option="bind",
            )
        if self.broken:
            raise DeviceBroken(self.name, f"the kernel marked device '{self.name}' broken: {self.broken}")

    def detach(self) -> None:
        if not self._attached:
            return
        from pyvduse.transport.kernel.vdpa_netlink import VdpaNetlink

        with VdpaNetlink() as nl:
            nl.dev_del(self.name)
        self._attached = False

    def close(self, *, leave: bool = False) -> None:
        """Detach if attached, stop the control thread, close and destroy the device; with
        ``leave``, keep it attached for a later daemon (as a crash would)."""
        if leave:
            self._attached = self._created = False
        try:
            self.detach()
        except OSError as e:
            log.error("detaching %s failed: %s", self.name, e)
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
            self._thread = None
        self.events.reset()
        self._forget_driver_state()
        if self._dev is not None:
            self._dev.close()
            self._dev = None
        if self._iotlb is not None:
            self._iotlb.close()
        if self._created:
            try:
                with Control() as ctl:
                    ctl.destroy(self.name)
                self._created = False
            except OSError as e:
                log.error("destroying %s failed: %s", self.name, e)

    def __enter__(self) -> KernelTransport:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the control thread -------------------------------------------------------------

    def _control_loop(self) -> None:
        assert self._dev is not None
        dev = self._dev
        while True:
            poller = select.poll()  # afresh: the queues not enabled yet change
            poller.register(dev.fd, select.POLLIN)
            poller.register(self._stop_fd, select.POLLIN)
            for fd in self._late.values():
                poller.register(fd, select.POLLIN)
            events = dict(poller.poll())
            if self._stop_fd in events:
                return
            for index, fd in list(self._late.items()):
                if fd in events:
                    self._late_kick(dev, index, fd)
            ev = events.get(dev.fd, 0)
            if ev & select.POLLERR:
                self._mark_broken("a control message timed out (see msg_timeout)")
                return
            if not ev & select.POLLIN:
                continue
            try:
                req = dev.read_request()
            except BlockingIOError:
                continue
            except OSError as e:
                self._mark_broken(f"reading a control message failed: {e}")
                return
            try:
                self._handle(dev, req)
            except Exception as e:  # answer FAILED rather than leave the kernel waiting
                log.exception("control message %d failed", req.type)
                try:
                    dev.write_response(v.pack_response(req.request_id, v.VDUSE_REQ_RESULT_FAILED))
                except OSError:
                    self._mark_broken(f"answering a control message failed: {e}")
                    return

    def _handle(self, dev: DeviceFd, req: v.Request) -> None:
        ok, failed = v.VDUSE_REQ_RESULT_OK, v.VDUSE_REQ_RESULT_FAILED
        if req.type == v.MsgType.SET_STATUS:
            log.debug("SET_STATUS 0x%x", req.status)
            after = self.status_machine.write(req.status)
            dev.write_response(v.pack_response(req.request_id, ok if after is not None else failed))
            if after is not None:
                after()
        elif req.type == v.MsgType.GET_VQ_STATE:
            state = self.events.queue_state(req.vq_index)
            if len(state) == 4:
                packed = v.VqStatePacked(*state)
                dev.write_response(v.pack_response(req.request_id, ok, packed=packed, vq_index=req.vq_index))
            else:
                dev.write_response(
                    v.pack_response(req.request_id, ok, avail_index=state[0], vq_index=req.vq_index)
                )
        elif req.type == v.MsgType.UPDATE_IOTLB:
            assert self._iotlb is not None
            iotlb = self._iotlb
            stale = iotlb.stale(req.iova_start, req.iova_last)  # the rest did not change
            log.debug(
                "UPDATE_IOTLB [0x%x, 0x%x]: %d region(s) to drop", req.iova_start, req.iova_last, len(stale)
            )
            remap = getattr(self.events, "remap", None)
            if stale and remap is not None:
                remap(lambda: iotlb.drop(stale), req.iova_start, req.iova_last, going=stale)
            elif stale:
                iotlb.drop(stale)
            dev.write_response(v.pack_response(req.request_id, ok))
        else:
            log.warning("unknown control message type %d", req.type)
            dev.write_response(v.pack_response(req.request_id, failed))

    def _get_features(self) -> int:
        assert self._dev is not None
        return self._dev.get_features()

    def _check_irq_placement(self) -> None:
        """Before serving: can the queues' interrupt CPUs be set on this kernel (older ones
        lack the attribute)? An explicit CPU list that cannot apply is an error."""
        if self.irq_placement.mode == DRIVER:
            return
        attr = sysfs.vq_attr(self.name, 0, "irq_cb_affinity")
        self._place_irqs = attr.exists()
        if not self._place_irqs:
            if self.irq_placement.explicit:
                raise KernelMissing(
                    f"this kernel has no {attr.parent.parent}/vqN/"
                    "irq_cb_affinity, so a placement of the queues' interrupts "
                    "cannot apply: leave it out",
                    option="irq_placement",
                )
            log.info("this kernel cannot place VDUSE interrupts (no vqN/irq_cb_affinity)")

    def _place_interrupts(self) -> None:
        """Set each queue's interrupt CPUs (see irq_affinity). virtio_vdpa sets the masks
        when the driver probes, before DRIVER_OK, so this runs at every DRIVER_OK."""
        if not self._driver_masks and self.irq_mask_store is not None:
            self._driver_masks = self.irq_mask_store.load_irq_masks()  # a resumed device
        for i in range(self.spec.num_queues):
            path = sysfs.vq_attr(self.name, i, "irq_cb_affinity")
            try:
                current = parse_cpumask(path.read_text())
                driver = drivers_mask(current, self._driver_masks.get(i))
                self._driver_masks[i] = driver
                mask = self.irq_placement.choose(i, driver)
                if mask is not None and mask != current:
                    sysfs.write_attr(path, format_cpumask(mask))
                    log.info(
                        "queue %d: interrupts on CPU %s (the driver gave %s)",
                        i,
                        format_cpu_list(mask),
                        format_cpu_list(driver),
                    )
            except (OSError, ValueError) as e:
                log.warning("queue %d: interrupt CPUs left as the driver set them: %s", i, e)
        if self.irq_mask_store is not None:
            try:
                self.irq_mask_store.save_irq_masks(self._driver_masks)
            except OSError as e:
                log.warning("the queues' interrupt CPUs cannot be kept for a restart: %s", e)

    def _start_queues(self, resume: bool = False) -> None:
        assert self._dev is not None
        dev = self._dev
        if self._place_irqs:
            self._place_interrupts()
        self.negotiated = dev.get_features()
        queues = []
        for i in range(self.spec.num_queues):
            info = dev.vq_get_info(i)
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._kick_fds[i] = kick
            dev.vq_setup_kickfd(i, kick)
            queues.append(_setup(i, info))
        self.events.driver_ok(self.negotiated, queues, resume)
        if getattr(self.events, "queue_ready", None) is not None:
            self._late = {q.index: self._kick_fds[q.index] for q in queues if not q.ready}

    def _late_kick(self, dev: DeviceFd, index: int, fd: int) -> None:
        """A kick on a queue that was not ready at DRIVER_OK. vhost-vdpa lets a driver enable
        queues after DRIVER_OK (QEMU's vhost-vdpa-device did, up to 8.2) and VDUSE tells us
        nothing of it, but it drops kicks on queues that are not ready: so this one is ready
        now. Its kick stays unread, for the worker that starts serving it."""
        info = dev.vq_get_info(index)
        if not info.ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)  # from before it was disabled again: forget it
            return
        del self._late[index]
        log.info("queue %d was enabled after DRIVER_OK", index)
        self.events.queue_ready(_setup(index, info))  # type: ignore[attr-defined]

    def _forget_driver_state(self) -> None:
        """After reset: unmap every region, drop kick fds and negotiated features."""
        for i, fd in self._kick_fds.items():
            if self._dev is not None:
                with contextlib.suppress(OSError):
                    self._dev.vq_setup_kickfd(i, v.VDUSE_EVENTFD_DEASSIGN)
            os.close(fd)
        self._kick_fds.clear()
        self._late.clear()
        if self._iotlb is not None:
            self._iotlb.invalidate()
        self.negotiated = 0

    def _mark_broken(self, why: str) -> None:
        self.broken = why
        log.error("device %s is broken: %s", self.name, why)
        if self.on_broken is not None:
            self.on_broken(why)


def _setup(index: int, info: v.VqInfo) -> QueueSetup:
    """A queue as VDUSE_VQ_GET_INFO describes it."""
    p = info.packed
    return QueueSetup(
        index=index,
        num=info.num,
        desc_addr=info.desc_addr,
        driver_addr=info.driver_addr,
        device_addr=info.device_addr,
        ready=info.ready,
        avail_index=info.avail_index,
        packed_state=(p.last_avail_counter, p.last_avail_idx, p.last_used_counter, p.last_used_idx),
    )
