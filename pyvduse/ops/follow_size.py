"""Following storage that someone else resizes (``rbd resize`` of a served RBD image).

A backend that can tell when its storage's size changed offers ``watch_storage_size``
(``Backend``); ``SizeFollower`` then runs what ``ctl resize`` with no size runs, on a thread
of its own (the backend's callback must not wait), once per burst of changes: changes that
arrive while a resize runs are taken by the next one, so the device ends at the last size.
A smaller size is followed too: the data past the new end is already gone.
"""

from __future__ import annotations

import logging
import threading
import time

from pyvduse.ops.protocol import BUSY, OpsError
from pyvduse.ops.resize import resize
from pyvduse.ops.target import Target

log = logging.getLogger(__name__)

#: How long a follow waits before trying again when another resize holds the lock.
RETRY_SECONDS = 0.2


class SizeFollower:
    """Resizes ``target``'s device whenever ``changed()`` is called."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow size {target.name}", daemon=True)
        #: Resizes done (for tests and logs).
        self.followed = 0

    def start(self) -> bool:
        """Watch the device's backend; False when it cannot tell of resizes."""
        backend = getattr(self.target.server.device, "backend", None)
        watch = getattr(backend, "watch_storage_size", None)
        if watch is None or not watch(self.changed):
            return False
        self._thread.start()
        return True

    def changed(self) -> None:
        self._changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            self._changed.wait()
            if self._stop.is_set():
                return
            self._changed.clear()
            try:
                result = resize(self.target, None, shrink=True)
            except OpsError as e:
                if e.code == BUSY:
                    time.sleep(RETRY_SECONDS)
                    self._changed.set()
                    continue
                log.warning("%s: its storage changed, but the device cannot follow: %s", self.target.name, e)
                continue
            except Exception:
                log.exception("%s: following its storage's new size", self.target.name)
                continue
            if result["changed"]:
                self.followed += 1
                log.info(
                    "%s: its storage was resized to %d bytes: so is the device",
                    self.target.name,
                    result["size"],
                )
