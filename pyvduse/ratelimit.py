"""Rate-limited logging: a driver can send bad requests in a loop; the log must not follow.

Each device has its own limiter (``VirtioDevice.request_log``), so one device's flood does
not silence another's first message. A failure logged with its exception carries the
traceback the first time that exception is raised from that place, and one line afterwards.
"""

from __future__ import annotations

import logging
import threading
import time


def _site(error: BaseException) -> tuple[type[BaseException], str, int]:
    """Where an exception was raised: its type, and the innermost frame's file and line."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(error), "", 0
    return type(error), tb.tb_frame.f_code.co_filename, tb.tb_lineno


class RateLimitedLogger:
    """Logs at most ``burst`` messages per ``period`` seconds, then says how many it dropped."""

    def __init__(self, log: logging.Logger, burst: int = 10, period: float = 60.0) -> None:
        self.log = log
        self.burst = burst
        self.period = period
        self._window = 0.0
        self._count = 0
        self._dropped = 0
        self._lock = threading.Lock()
        self._traced: set[tuple[type[BaseException], str, int]] = set()

    def _admit(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._window >= self.period:
                if self._dropped:
                    self.log.warning("%d similar messages suppressed", self._dropped)
                self._window, self._count, self._dropped = now, 0, 0
            if self._count >= self.burst:
                self._dropped += 1
                return False
            self._count += 1
            return True

    def warning(self, msg: str, *args: object) -> None:
        if self._admit():
            self.log.warning(msg, *args)

    def failure(self, msg: str, *args: object, error: BaseException) -> None:
        """``msg``, then ``: Type: error``; with the traceback the first time ``error``'s
        kind of exception comes from where it was raised."""
        if not self._admit():
            return
        site = _site(error)
        with self._lock:
            first = site not in self._traced
            if first and len(self._traced) < 1000:
                self._traced.add(site)
        text = msg + ": %s: %s"
        if first:
            self.log.error(text, *args, type(error).__name__, error, exc_info=error)
        else:
            self.log.error(text + " (traceback logged before)", *args, type(error).__name__, error)
