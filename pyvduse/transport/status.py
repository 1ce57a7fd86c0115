"""The device side of status writes, as the virtio spec and VDUSE define them.

Shared by every transport, so the real kernel and the model apply the same rules:

- status 0 is a reset: every queue stops and all driver state is forgotten before answering;
- FEATURES_OK can be refused (the driver sees the bit missing when it re-reads status);
- DRIVER_OK starts the queues, but only after the answer has been sent, because VDUSE records
  DRIVER_OK (and accepts interrupts) only once it has our OK;
- DRIVER_OK is refused when features were never accepted, or changed after FEATURES_OK;
- any other status (for instance FAILED, or ACKNOWLEDGE after a reset) is stored and is not a
  reset.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvduse.abi.virtio import Status
from pyvduse.transport.base import DeviceEvents

Step = Callable[[], None]


def _nothing() -> None:
    pass


class StatusMachine:
    """Tracks the status byte and tells the transport what to do on each write."""

    def __init__(
        self,
        events: DeviceEvents,
        *,
        read_features: Callable[[], int],
        start_queues: Step,
        forget: Step,
    ) -> None:
        self.events = events
        self._read_features = read_features
        self._start_queues = start_queues
        self._forget = forget
        self.status = 0
        self.features = 0

    def write(self, status: int) -> Step | None:
        """Apply a status write. None means refuse it; else a step to run after answering OK."""
        if status == 0:
            self.events.reset()
            self._forget()
            self.status = 0
            self.features = 0
            return _nothing
        prev = self.status
        if status & Status.FEATURES_OK and not prev & Status.FEATURES_OK:
            self.features = self._read_features()
            if not self.events.features_ok(self.features):
                return None
        if status & Status.DRIVER_OK and not prev & Status.DRIVER_OK:
            if not prev & Status.FEATURES_OK and not status & Status.FEATURES_OK:
                return None  # DRIVER_OK without negotiated features
            if self._read_features() != self.features:
                return None  # the driver changed its features after FEATURES_OK
            self.status = status
            return self._start_queues
        self.status = status
        return _nothing
