"""Rate-limited logging: a driver can send bad requests in a loop; the log must not follow."""

from __future__ import annotations

import logging
import threading
import time


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

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window >= self.period:
                if self._dropped:
                    self.log.warning("%d similar messages suppressed", self._dropped)
                self._window, self._count, self._dropped = now, 0, 0
            if self._count >= self.burst:
                self._dropped += 1
                return
            self._count += 1
        self.log.warning(msg, *args)
