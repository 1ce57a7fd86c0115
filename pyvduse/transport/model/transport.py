"""The device-facing side of the model: a ``Transport`` over a ``ModelKernel``.

It behaves like the real kernel transport: a control thread answers the kernel's messages
through the same ``StatusMachine``, queues start after DRIVER_OK is answered, interrupts
and config changes go through the kernel's checks. Fault injection hooks let tests make the
device slow or deaf to control messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading

from pyvduse.ring.memory import GuestMemory, RegionMap
from pyvduse.transport.base import DeviceEvents, Transport
from pyvduse.transport.model.kernel import (
    GET_VQ_STATE,
    SET_STATUS,
    UPDATE_IOTLB,
    Message,
    ModelKernel,
)
from pyvduse.transport.status import StatusMachine

log = logging.getLogger(__name__)


class ModelTransport(Transport):
    """Serves ``events`` (the runtime) on a modelled kernel."""

    def __init__(self, kernel: ModelKernel, events: DeviceEvents) -> None:
        self.kernel = kernel
        self.events = events
        self.regions = RegionMap(kernel.iotlb_lookup)
        self.status_machine = StatusMachine(
            events,
            read_features=kernel.dev_get_features,
            start_queues=self._start_queues,
            forget=self._forget,
        )
        self._kick_fds: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Fault injection: while set, control messages are read but not answered.
        self.deaf = threading.Event()

    # -- Transport ------------------------------------------------------------------------

    @property
    def memory(self) -> GuestMemory:
        return self.regions

    def kick_fd(self, index: int) -> int:
        return self._kick_fds[index]

    def reply_timeout(self) -> float | None:
        return self.kernel.msg_timeout

    def notify(self, index: int) -> None:
        try:
            self.kernel.vq_inject_irq(index)
        except OSError as e:
            log.debug("interrupt for queue %d not sent: %s", index, e)

    def set_config(self, offset: int, data: bytes) -> None:
        self.kernel.dev_set_config(offset, data)
        with contextlib.suppress(OSError):  # before DRIVER_OK there is nobody to tell
            self.kernel.inject_config_irq()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._control_loop, name="model-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.events.reset()
        self._forget()

    def __enter__(self) -> ModelTransport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control thread -------------------------------------------------------------------

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.kernel.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            if self.deaf.is_set():
                continue  # the kernel will time out and mark the device broken
            try:
                self._handle(msg)
            except Exception:
                log.exception("control message %s failed", msg.kind)
                self.kernel.answer(msg, False)

    def _handle(self, msg: Message) -> None:
        if msg.kind == SET_STATUS:
            after = self.status_machine.write(msg.arg)
            self.kernel.answer(msg, after is not None)
            if after is not None:
                after()
        elif msg.kind == GET_VQ_STATE:
            self.kernel.answer(msg, True, self.events.queue_state(msg.arg))
        elif msg.kind == UPDATE_IOTLB:
            start, last = msg.arg, msg.last
            remap = getattr(self.events, "remap", None)
            if remap is not None:
                remap(lambda: self._invalidate(start, last), start, last)
            else:
                self._invalidate(start, last)
            self.kernel.answer(msg, True)
        else:
            self.kernel.answer(msg, False)

    def _start_queues(self) -> None:
        k = self.kernel
        queues = []
        for i in range(len(k.vqs)):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._kick_fds[i] = fd
            k.vq_setup_kickfd(i, fd)
            queues.append(k.vq_get_info(i))
        self.events.driver_ok(k.dev_get_features(), queues, False)

    def _invalidate(self, start: int, last: int) -> None:
        for r in self.regions.remove_overlapping(start, last):
            with contextlib.suppress(BufferError):  # the native engine still holds views
                r.mem.release()

    def _forget(self) -> None:
        for i, fd in self._kick_fds.items():
            with contextlib.suppress(OSError):
                self.kernel.vq_setup_kickfd(i, -1)
            os.close(fd)
        self._kick_fds.clear()
        self.regions.clear()
