"""SIGINT/SIGTERM as stop requests for a serving daemon.

The handlers only set events and remember the signal: a handler runs between two bytecodes
of the main thread, which may be in the middle of writing a log line, and logging from it
raises "reentrant call" inside the handler before the stop request is recorded, so the
daemon would ignore that SIGTERM. The main thread logs what arrived once it sees the stop.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Once installed: the first stop signal sets ``stop``, a further one sets ``hurry``."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.hurry = threading.Event()  # stop waiting for requests in flight
        self.received: list[str] = []
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)  # no I/O here, see the module doc
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()

    def describe(self) -> str:
        """What stopped us, for the log: 'received SIGTERM', or 'asked to stop'."""
        return f"received {self.received[0]}" if self.received else "asked to stop"

    def install(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
