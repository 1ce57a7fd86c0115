"""Serving a network device: a ``Daemon`` whose node is the interface virtio_net makes.

``NetDaemon`` is the daemon of ``pyvduse net`` (TAP) and of a network device of one's own;
``serve_device`` serves such a device until SIGINT or SIGTERM, printing ``READY name=NAME
ifname=IF`` once the interface exists. ``NetState`` keeps what a restarted daemon must know
besides the in-flight logs.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from pyvduse.daemon import Daemon, check_kernel
from pyvduse.device.net import NetDevice
from pyvduse.errors import UserError
from pyvduse.transport.kernel import sysfs

CAP_NET_ADMIN = 12


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (VDUSE net devices and TAPs need it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: let the kernel say


class NetState:
    """What a restarted daemon must know besides the in-flight logs: whether a daemon of
    ours created the TAP (so it is removed at the end), the link state, the interface name.
    Kept as JSON next to the state file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: kept in memory only
        self.data: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError, TypeError):
            loaded = json.loads(path.read_text()) if path is not None else None
            if isinstance(loaded, dict):
                self.data = loaded

    def save(self, **changes: object) -> None:
        self.data.update(changes)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)  # a kill leaves the old or the new file, never half of one

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class NetDaemon(Daemon):
    """A ``Daemon`` whose device is a network interface: ready once virtio_net has made the
    interface (``node`` is its name). After a restart the interface may live in another
    network namespace, where this one cannot see it: then the name it had."""

    def __init__(
        self, device: NetDevice, name: str, state: NetState | None = None, **options: object
    ) -> None:
        super().__init__(device, name, **options)  # type: ignore[arg-type]
        self.net_state = state or NetState(None)

    def _wait_for_node(self) -> str:
        deadline = time.monotonic() + (2.0 if self.resumed else self.node_timeout)
        while not self._stop_requested.is_set():
            found = sysfs.net_interfaces(self.name)
            if found:
                self.net_state.save(ifname=found[0])
                return found[0]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        known = self.net_state.data.get("ifname")
        if self.resumed and isinstance(known, str):
            return known
        return super()._wait_for_node()  # says why there is none


def announce(daemon: Daemon) -> None:
    """The one line scripts wait for (flushed: they read it through a pipe)."""
    sys.stdout.write(f"READY name={daemon.name} ifname={daemon.node}\n")
    sys.stdout.flush()


def preflight() -> None:
    if not has_net_admin():
        raise UserError("a VDUSE network device and its TAP need CAP_NET_ADMIN: run as root")
    check_kernel()


def serve_device(name: str, device: NetDevice) -> int:
    """Serve a network device of one's own (a backend written in Python) until SIGINT or
    SIGTERM, like ``pyvduse net`` does with a TAP: prints ``READY name=NAME ifname=IF``."""
    preflight()
    daemon = NetDaemon(device, name, state_dir=None)
    daemon.on_ready = announce
    daemon.run(signals=True)
    return 0
