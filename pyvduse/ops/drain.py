"""Letting requests in flight finish before the device is detached (SIGTERM, ``quit``)."""

from __future__ import annotations

import logging
import threading
import time

from pyvduse.runtime.server import DeviceServer

log = logging.getLogger(__name__)


def drain(server: DeviceServer, timeout: float, abort: threading.Event | None = None) -> int:
    """Wait until every request in flight now has completed, for at most ``timeout`` seconds
    (or until ``abort`` is set). Queues keep serving meanwhile; requests that arrive after the
    call are not waited for. Returns how many of the waited-for requests had not finished."""
    marks = [(w, w.drain_mark()) for w in list(server.workers.values())]
    deadline = time.monotonic() + max(timeout, 0.0)
    return sum(not w.wait_done(mark, max(deadline - time.monotonic(), 0.0), abort) for w, mark in marks)
