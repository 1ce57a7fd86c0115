"""The operations side of a daemon, in the order a daemon needs it.

``Operations`` starts the management socket (and metrics, if asked), announces readiness to
systemd, and on shutdown tells systemd, lets requests in flight finish (bounded), then
removes the socket. It takes a ``DeviceServer`` and whatever transport serves it, so the
same code runs under ``pyvduse blk`` on the real kernel and on the in-process model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvduse.errors import ConfigError
from pyvduse.ops import sdnotify
from pyvduse.ops.drain import drain
from pyvduse.ops.protocol import default_control_path
from pyvduse.ops.server import OpsServer
from pyvduse.ops.target import DRAINING, SERVING, STOPPING, Target
from pyvduse.runtime.server import DeviceServer
from pyvduse.transport.base import Transport

if TYPE_CHECKING:  # imported where used: a daemon without --metrics never needs it
    from pyvduse.ops.metrics import MetricsServer

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 10.0


@dataclass
class OpsOptions:
    """What a user chooses about operations (``--control``, ``--metrics``,
    ``--drain-timeout``)."""

    control: str | None = None  # None: /run/pyvduse/NAME.sock
    metrics: str | None = None  # ADDR:PORT, or None for no metrics endpoint
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT

    def validate(self) -> None:
        """ConfigError for a bad choice, before any device exists."""
        if self.drain_timeout < 0:
            raise ConfigError("must be zero or more seconds", option="drain_timeout")
        if self.control is not None and not self.control:
            raise ConfigError("needs a path", option="control")
        if self.metrics is not None:
            from pyvduse.ops.metrics import parse_address, require_client

            parse_address(self.metrics)
            require_client()


class Operations:
    """Management socket, metrics, systemd notifications and draining for one device."""

    def __init__(
        self,
        name: str,
        server: DeviceServer,
        transport: Transport | None,
        options: OpsOptions | None = None,
        on_quit: Callable[[], None] | None = None,
        on_resize: Callable[[int], None] | None = None,
    ) -> None:
        self.options = options or OpsOptions()
        self.target = Target(name, server, transport, on_quit=on_quit, on_resize=on_resize)
        self.socket: OpsServer | None = None
        self.metrics: MetricsServer | None = None

    @property
    def control_path(self) -> str:
        return self.options.control or default_control_path(self.target.name)

    def start(self) -> None:
        """Open the management socket and the metrics endpoint (ConfigError if impossible)."""
        try:
            if self.options.metrics is not None:
                from pyvduse.ops.metrics import MetricsServer

                self.metrics = MetricsServer(self.target, self.options.metrics)
                self.metrics.start()
            self.socket = OpsServer(self.target, self.control_path)
            self.socket.start()
        except BaseException:
            self.close()
            raise

    def ready(self, node: str) -> None:
        """The device node exists: tell systemd."""
        self.target.node = node
        self.target.state = SERVING
        sdnotify.notify(f"READY=1\nSTATUS=serving {self.target.name} on {node}")

    def shutdown(self, *, drain_requests: bool = True, abort: threading.Event | None = None) -> int:
        """Tell systemd we stop, then wait (at most ``drain_timeout``) for requests in flight.
        Returns how many did not finish."""
        t = self.target
        sdnotify.notify(f"STOPPING=1\nSTATUS=stopping {t.name}")
        left = 0
        if drain_requests and t.server.workers:
            t.state = DRAINING
            timeout = self.options.drain_timeout
            left = drain(t.server, timeout, abort)
            if left:
                log.warning("%d request(s) still in flight after %g s: detaching anyway", left, timeout)
            else:
                log.info("no request in flight: detaching")
        t.state = STOPPING
        return left

    def close(self) -> None:
        """Remove the socket and stop the metrics endpoint."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
