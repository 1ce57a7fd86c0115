"""A client of the management socket: one request, one reply."""

from __future__ import annotations

import errno
import json
import socket
import time

from pyvduse.ops.protocol import MAX_LINE, Json, encode

#: Replies can be long (``stats`` of 64 queues); refuse anything absurd.
MAX_REPLY = 16 << 20


class NoDaemon(Exception):
    """Nobody serves the socket (missing file, or a stale socket left by a dead daemon)."""


class ClientError(Exception):
    """The socket exists but the exchange failed (permission, timeout, garbled reply)."""


def request(path: str, req: Json, timeout: float = 10.0) -> Json:
    """Send ``req`` to the daemon at ``path`` and return its decoded reply."""
    line = encode(req)
    if len(line) > MAX_LINE:
        raise ClientError("the request is too long")
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, deadline)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(path) from None
        except PermissionError:
            raise ClientError(f"no permission to use {path}: run as root (or as the daemon's user)") from None
        except TimeoutError:
            raise ClientError(f"the daemon did not accept the connection within {timeout:g} s") from None
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise NoDaemon(path) from None
            raise ClientError(f"cannot connect to {path}: {e.strerror}") from None
        buf = bytearray()
        try:
            sock.sendall(line)
            while b"\n" not in buf:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    raise ClientError("the daemon closed the connection without answering")
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise ClientError("the reply is too long")
        except TimeoutError:
            raise ClientError(f"no answer within {timeout:g} s") from None
        except OSError as e:
            raise ClientError(f"talking to {path} failed: {e.strerror}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(buf[: buf.index(b"\n")])
    except ValueError as e:
        raise ClientError(f"the daemon's reply is not JSON: {e}") from None
    if not isinstance(reply, dict) or not ("result" in reply or "error" in reply):
        raise ClientError("the daemon's reply is neither a result nor an error")
    return reply


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """Connect, retrying while the server's backlog is full (a unix socket then says EAGAIN
    instead of making the caller wait)."""
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(0.01)
