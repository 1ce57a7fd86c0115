"""sd_notify(3) in a few lines: tell systemd (``Type=notify``) how the daemon is doing.

systemd passes ``$NOTIFY_SOCKET``, a unix datagram socket: a path, or an abstract name
written with a leading '@'. Each message is newline-separated ``KEY=VALUE`` lines
(``READY=1``, ``STOPPING=1``, ``STATUS=...``). Without ``$NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` to the service manager; True if it was sent."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    elif addr[0] != "/":
        log.warning("NOTIFY_SOCKET=%s is not a unix socket path: not notifying", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify the service manager (%s): %s", state.split("\n")[0], e)
        return False
    return True
