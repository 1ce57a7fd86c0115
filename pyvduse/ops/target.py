"""What the operations layer serves: one running device and what the daemon knows about it.

A ``Target`` needs a ``DeviceServer`` (queues, negotiated features) and, optionally, its
transport (for the device status byte); it works the same on the real kernel and on the
in-process model. Everything here is read without taking the runtime's locks, so a stalled
backend or a busy control thread never holds up a status request.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvduse.device.base import DeviceSpec
from pyvduse.runtime.server import DeviceServer
from pyvduse.transport.base import Transport

#: Daemon states as ``status`` reports them.
STARTING, SERVING, DRAINING, STOPPING = "starting", "serving", "draining", "stopping"


@dataclass
class Target:
    name: str
    server: DeviceServer
    transport: Transport | None = None
    #: Called (from the management thread) by the ``quit`` command.
    on_quit: Callable[[], None] | None = None
    #: Called with the new size in bytes after a resize changed the device.
    on_resize: Callable[[int], None] | None = None
    state: str = STARTING
    node: str | None = None
    control_path: str | None = None
    metrics_address: str | None = None
    started: float = field(default_factory=time.monotonic)
    pid: int = field(default_factory=os.getpid)
    #: Held while a resize runs (one at a time).
    resize_lock: threading.Lock = field(default_factory=threading.Lock)
    spec: DeviceSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = self.server.device.spec()

    @property
    def status_byte(self) -> int | None:
        machine = getattr(self.transport, "status_machine", None)
        status = getattr(machine, "status", None)
        return status if isinstance(status, int) else None
