"""A queue worker: the thread that serves one virtqueue.

It sleeps on the queue's kick eventfd, then drains the ring in rounds (at most one queue's
worth of requests per round, so a flood cannot starve the stop check), publishes the used
index once per round, interrupts the driver only when it asked, and re-enables kicks with
the re-check the spec requires before sleeping again. Nothing a ring contains can make it
raise: a corrupt ring stops this queue and is reported, the process carries on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

from pyvduse.device.base import VirtioDevice
from pyvduse.ring.chain import Chain
from pyvduse.ring.errors import RingError
from pyvduse.ring.queue import VirtQueue

log = logging.getLogger(__name__)


class QueueWorker:
    """Serves one queue on its own thread until ``stop``."""

    def __init__(
        self,
        device: VirtioDevice,
        index: int,
        queue: VirtQueue,
        kick_fd: int,
        notify: Callable[[int], None],
        resubmit: list[Chain] | None = None,
    ) -> None:
        self.device = device
        self.index = index
        self.queue = queue
        self.kick_fd = kick_fd
        self._notify = notify
        self._resubmit = resubmit or []  # requests in flight when the last daemon died
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self.broken: str | None = None
        self.completed = 0
        self._thread = threading.Thread(target=self._run, name=f"vq{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait: after this returns the worker touches no driver memory."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._stop_fd)
        self._stop_fd = -1

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            if self._resubmit:
                self._replay()
            self._drain()  # requests may be waiting from before we started
            while not self._stopping:
                events = poller.poll()
                if self._stopping:
                    break
                for fd, _ in events:
                    if fd == self.kick_fd:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self.kick_fd)
                if self.broken is None:
                    self._drain()
        except Exception as e:  # never let a ring take the process down
            self.broken = f"{type(e).__name__}: {e}"
            log.exception("queue %d stopped", self.index)

    def _replay(self) -> None:
        """Serve again, in their original order, the requests a dead daemon left in flight."""
        q, dev, idx = self.queue, self.device, self.index
        for chain in self._resubmit:
            q.push(chain.head, dev.handle(idx, chain), chain.ndesc)
        self.completed += len(self._resubmit)
        log.info("queue %d: repeated %d request(s) left in flight", idx, len(self._resubmit))
        self._resubmit = []
        q.publish()
        self._notify(idx)  # whatever the driver asked: it may have missed one while we were down

    def _drain(self) -> None:
        q, dev, idx = self.queue, self.device, self.index
        pop, push = q.pop, q.push
        try:
            while not self._stopping:
                q.disable_kicks()
                n = 0
                while n < q.num and not self._stopping:
                    chain = pop()
                    if chain is None:
                        break
                    push(chain.head, dev.handle(idx, chain), chain.ndesc)
                    n += 1
                self.completed += n
                if q.publish():
                    self._notify(idx)
                if n < q.num and not q.enable_kicks():
                    return
        except RingError as e:
            self.broken = str(e)
            log.error("queue %d: the ring is corrupt, stopping it until reset: %s", idx, e)
