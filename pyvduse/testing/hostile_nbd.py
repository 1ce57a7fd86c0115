"""An in-process NBD server that lies, for tests: the backend's server is not to be trusted.

It speaks the fixed-newstyle handshake (``NBD_OPT_GO``; structured replies and extended
headers refused, so every reply is a simple one) and serves an export held in memory on a
Unix socket, one thread per connection and one per reply (so replies can come in any
order). What it does with each command is up to ``policy``: a callable given the
``Command`` that returns a ``Reply`` (answer, with an error, after a stall, under another
cookie, with too little or too much data, or not at all before closing the connection).

It records what it saw, so that tests can check the client's side of the protocol:
``commands`` (every command, with its connection), ``resent_early`` (a command sent again
while the same command was still unanswered on a connection that was open), ``connections``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO, OPT_INFO, OPT_ABORT = 7, 6, 2
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
INFO_EXPORT = 0
FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_FUA = 1, 4, 8
FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES = 32, 64
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
_REQUEST = struct.Struct(">IHHQQI")


@dataclasses.dataclass(frozen=True)
class Command:
    """One command as the server received it."""

    conn: int  # the connection's number (0, 1, ... in the order they came)
    kind: int  # CMD_READ, ...
    cookie: int
    offset: int
    length: int
    seq: int  # its number among all commands


@dataclasses.dataclass(frozen=True)
class Reply:
    """What to do with one command. The default: answer it honestly, at once."""

    error: int = 0  # an errno for the reply (108: ESHUTDOWN)
    delay: float = 0.0  # answer after this long
    cookie: int | None = None  # answer under this cookie instead
    data_len: int | None = None  # a read's reply carries this many bytes (short/oversized)
    close_after: bool = False  # close the connection once the (partial) reply is sent
    silent: bool = False  # never answer (the connection stays open)


HONEST = Reply()


def honest(cmd: Command) -> Reply:
    return HONEST


class HostileNbdServer:
    """Serves ``size`` bytes on ``path`` (a Unix socket) with ``policy`` deciding each
    reply. A context manager; ``uri`` is what NbdBackend takes."""

    def __init__(self, path: Path, size: int = 4 << 20, policy: Callable[[Command], Reply] = honest) -> None:
        self.path = path
        self.data = bytearray(size)
        self.policy = policy
        self.commands: list[Command] = []
        self.resent_early: list[tuple[Command, Command]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._pending: dict[int, dict[int, Command]] = {}  # open connection -> cookie -> command
        self._socks: list[socket.socket] = []
        self._sock_of: dict[int, socket.socket] = {}  # open connection -> its socket
        self._closed = False
        path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, name="hostile-nbd", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def __enter__(self) -> HostileNbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            self._shut(s)

    def drop_connections(self) -> None:
        """Close every open connection (the server went away; it listens still)."""
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            self._shut(s)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pending)

    def _open(self, conn: int) -> bool:
        """Whether the client still has connection ``conn`` open (its thread here may not
        have seen the end yet: it has if the client's side is closed or shut down)."""
        s = self._sock_of.get(conn)
        if s is None:
            return False
        p = select.poll()  # the client's end: shut down or closed, though commands it sent
        p.register(s, select.POLLRDHUP)  # before may still wait unread here
        return not any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))

    @staticmethod
    def _shut(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._closed:
            try:
                s, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                conn = self.connections
                self.connections += 1
                self._socks.append(s)
                self._sock_of[conn] = s
            threading.Thread(target=self._serve, args=(s, conn), daemon=True).start()

    def _serve(self, s: socket.socket, conn: int) -> None:
        wlock = threading.Lock()
        try:
            if not self._handshake(s):
                return
            with self._lock:
                self._pending[conn] = {}
            while True:
                magic, _flags, kind, cookie, offset, length = _REQUEST.unpack(_recv(s, _REQUEST.size))
                if magic != REQUEST_MAGIC:
                    return
                payload = _recv(s, length) if kind == CMD_WRITE else b""
                if kind == CMD_DISC:
                    return
                with self._lock:
                    cmd = Command(conn, kind, cookie, offset, length, len(self.commands))
                    self.commands.append(cmd)
                    for other, pending in self._pending.items():
                        for old in pending.values():
                            same = (old.kind, old.offset, old.length) == (kind, offset, length)
                            if same and (other != conn or old.cookie != cookie) and self._open(other):
                                self.resent_early.append((old, cmd))
                    self._pending[conn][cookie] = cmd
                reply = self.policy(cmd)
                if reply.silent:
                    continue
                args = (s, wlock, cmd, reply, payload)
                if reply.delay:
                    threading.Thread(target=self._answer, args=args, daemon=True).start()
                elif not self._answer(*args):
                    return
        except (OSError, ConnectionError, struct.error):
            pass
        finally:
            with self._lock:
                self._pending.pop(conn, None)
                self._sock_of.pop(conn, None)
                if s in self._socks:
                    self._socks.remove(s)
            self._shut(s)
            s.close()

    def _answer(
        self, s: socket.socket, wlock: threading.Lock, cmd: Command, reply: Reply, payload: bytes
    ) -> bool:
        """Send the reply; False once the connection is to close."""
        if reply.delay:
            time.sleep(reply.delay)
        data: bytes | memoryview = b""
        if not reply.error:
            if cmd.kind == CMD_READ:  # a view, not a copy: the tests measure our memory
                data = memoryview(self.data)[cmd.offset : cmd.offset + cmd.length]
            elif cmd.kind == CMD_WRITE:
                self.data[cmd.offset : cmd.offset + len(payload)] = payload
            elif cmd.kind == CMD_WRITE_ZEROES:
                self.data[cmd.offset : cmd.offset + cmd.length] = bytes(cmd.length)
        if reply.data_len is not None:
            data = (bytes(data) + bytes(reply.data_len))[: reply.data_len]
        cookie = cmd.cookie if reply.cookie is None else reply.cookie
        with self._lock:
            pending = self._pending.get(cmd.conn)
            if pending is not None:
                pending.pop(cmd.cookie, None)
        try:
            with wlock:
                s.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, reply.error, cookie))
                s.sendall(data)
        except OSError:
            return False
        if reply.close_after:
            self._shut(s)
            return False
        return True

    def _handshake(self, s: socket.socket) -> bool:
        s.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))  # FIXED_NEWSTYLE | NO_ZEROES
        _recv(s, 4)
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(s, 16))
            body = _recv(s, length)
            if magic != IHAVEOPT or opt == OPT_ABORT:
                return False
            if opt not in (OPT_GO, OPT_INFO):
                s.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))
                continue
            del body
            flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
            info = struct.pack(">HQH", INFO_EXPORT, len(self.data), flags)
            s.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_INFO, len(info)) + info)
            s.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ACK, 0))
            if opt == OPT_GO:
                return True


def _recv(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


ESHUTDOWN = errno.ESHUTDOWN
