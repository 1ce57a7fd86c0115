"""The management socket: JSON lines on a unix socket, served on its own thread.

One thread multiplexes every client with ``selectors``; quick commands (``status``,
``stats``, ``quit``) are answered on it directly, from lock-free snapshots. A command that
may wait (``resize`` waits for in-flight requests when it shrinks) runs on a helper thread
and its reply is queued back, so neither a stalled backend nor a slow command ever stops the
socket from answering others. Replies to one client keep the order of its requests.

The socket is created with mode 0600 under a temporary name and renamed into place, so it
is never reachable with looser permissions; it is removed on close, unless another process
has replaced it meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvduse.errors import ConfigError
from pyvduse.ops import inspect
from pyvduse.ops.protocol import (
    BAD_REQUEST,
    FAILED,
    INVALID_ARGUMENT,
    MAX_LINE,
    UNKNOWN_COMMAND,
    UNSUPPORTED,
    Json,
    OpsError,
    decode_request,
    encode,
    error_reply,
    ok_reply,
)
from pyvduse.ops.resize import parse_size_argument, resize
from pyvduse.ops.target import STOPPING, Target

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
MAX_OUTPUT = 4 << 20  # a client that does not read its replies is dropped past this

Handler = Callable[[Target, Json], Json]


@dataclass(frozen=True)
class Command:
    handler: Handler
    args: frozenset[str] = frozenset()
    slow: bool = False  # runs on a helper thread
    help: str = ""


def _status(target: Target, req: Json) -> Json:
    return inspect.status(target)


def _stats(target: Target, req: Json) -> Json:
    return inspect.stats(target)


def _resize(target: Target, req: Json) -> Json:
    shrink = req.get("shrink", False)
    if not isinstance(shrink, bool):
        raise OpsError(INVALID_ARGUMENT, "shrink must be true or false")
    return resize(target, parse_size_argument(req.get("size")), shrink)


def _link(target: Target, req: Json) -> Json:
    from pyvduse.device.net import NetDevice

    device = target.server.device
    if not isinstance(device, NetDevice):
        raise OpsError(UNSUPPORTED, "only a network device has a link")
    state = req.get("state")
    if state not in ("up", "down"):
        raise OpsError(INVALID_ARGUMENT, "state must be 'up' or 'down'")
    before = device.link_up
    try:
        device.set_link(state == "up")
    except OSError as e:
        raise OpsError(FAILED, f"the kernel refused the config change: {e.strerror or e}") from e
    return {"link": state, "changed": before != device.link_up}


def _quit(target: Target, req: Json) -> Json:
    if target.on_quit is None:
        raise OpsError(FAILED, "this daemon cannot be stopped from its socket")
    return {"stopping": True}  # the server calls on_quit before sending this reply


def _help(target: Target, req: Json) -> Json:
    return {"commands": {name: c.help for name, c in COMMANDS.items()}}


COMMANDS: dict[str, Command] = {
    "status": Command(_status, help="features, device status, queues, backend"),
    "stats": Command(_stats, help="per-queue requests, bytes, errors, in flight, latency"),
    "resize": Command(
        _resize,
        frozenset({"size", "shrink"}),
        slow=True,
        help="resize the device: size (bytes or like 2G; none re-reads the "
        "backing file), shrink (true to allow a smaller size)",
    ),
    "link": Command(
        _link,
        frozenset({"state"}),
        help="network devices: set the link 'up' or 'down' (config space and a "
        "config interrupt: the driver's carrier follows)",
    ),
    "quit": Command(_quit, help="stop the daemon, like SIGTERM"),
    "help": Command(_help, help="list the commands"),
}


def answer(target: Target, req: Json) -> Json:
    """The reply to one decoded request (for the socket and for in-process callers)."""
    rid = req.get("id")
    name = req["cmd"]
    cmd = COMMANDS.get(name)
    if cmd is None:
        return error_reply(
            UNKNOWN_COMMAND, f"unknown command '{name}' (commands: {', '.join(COMMANDS)})", rid
        )
    extra = sorted(set(req) - {"cmd", "id"} - cmd.args)
    if extra:
        return error_reply(INVALID_ARGUMENT, f"{name} takes no argument '{extra[0]}'", rid)
    try:
        return ok_reply(cmd.handler(target, req), rid)
    except OpsError as e:
        return error_reply(e.code, e.message, rid)
    except Exception as e:  # a bug must cost one reply, not the socket
        log.exception("management command %s failed", name)
        return error_reply(FAILED, f"{type(e).__name__}: {e}", rid)


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    busy: bool = False  # a slow command of this client is running
    eof: bool = False  # the client will send nothing more
    closing: bool = False  # close once outbuf is sent


class OpsServer:
    """Serves ``target`` on the unix socket ``path`` until ``close``."""

    def __init__(self, target: Target, path: str) -> None:
        self.target = target
        self.path = path
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._done: queue.SimpleQueue[tuple[_Client, Json]] = queue.SimpleQueue()
        self._clients: set[_Client] = set()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._listener = self._bind()
        self.target.control_path = self.path
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="ops-socket", daemon=True)
        self._thread.start()
        log.info("management socket %s", self.path)

    def close(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake()
            self._thread.join(timeout=10)
            self._thread = None
        for c in list(self._clients):
            self._drop(c)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_if_ours()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bind(self) -> socket.socket:
        path = self.path
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"cannot create {parent} for the management socket: "
                f"{e.strerror}: choose another place for it",
                option="control",
            ) from None
        self._check_existing(path)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(64)
            os.rename(tmp, path)  # atomic: never reachable with looser permissions
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ConfigError(
                f"cannot create the management socket {path}: {e.strerror}: choose another place for it",
                option="control",
            ) from None
        st = os.stat(path)
        self._inode = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        return sock

    @staticmethod
    def _check_existing(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                f"{path} exists and is not a socket: remove it or choose "
                "another place for the management socket",
                option="control",
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return  # left by a daemon that died: ours replaces it
            raise ConfigError(
                f"cannot check the existing socket {path}: {e.strerror}", option="control"
            ) from None
        finally:
            probe.close()
        raise ConfigError(
            f"{path} is the management socket of another running daemon: choose another place for ours",
            option="control",
        )

    def _unlink_if_ours(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            try:
                events = self._sel.select()
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                log.error("management socket stopped: %s", e)
                return
            for key, mask in events:
                try:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        self._collect_slow()
                    else:
                        client: _Client = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(client)
                        if mask & selectors.EVENT_WRITE and client in self._clients:
                            self._flush(client)
                except Exception:  # never let one client take the socket down
                    log.exception("management socket error")
                    if isinstance(key.data, _Client):
                        self._drop(key.data)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again on the next event
                log.warning("management socket: accept failed: %s", e)
                return
            sock.setblocking(False)
            client = _Client(sock)
            if len(self._clients) >= MAX_CLIENTS:
                with contextlib.suppress(OSError):
                    sock.send(encode(error_reply(FAILED, "too many clients: try again later")))
                sock.close()
                continue
            self._clients.add(client)
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if not data:
            c.eof = True
        else:
            c.inbuf += data
            if len(c.inbuf) > 16 * MAX_LINE:  # piling up requests behind a slow one
                self._drop(c)
                return
        self._process(c)

    def _process(self, c: _Client) -> None:
        """Answer the complete lines of ``c`` (stopping at a slow command), then update
        what we wait for on its socket."""
        while not c.busy and not c.closing:
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                if len(c.inbuf) > MAX_LINE:
                    self._reply(c, error_reply(BAD_REQUEST, f"request line longer than {MAX_LINE} bytes"))
                    c.closing = True
                    break
                if not c.eof or not c.inbuf.strip():
                    break
                nl = len(c.inbuf)  # a last line without newline at end of input
            line = bytes(c.inbuf[:nl])
            del c.inbuf[: nl + 1]
            if not line.strip():
                continue
            self._serve_line(c, line)
        if c.eof and not c.busy and not c.inbuf.strip():
            c.closing = True
        self._update(c)

    def _serve_line(self, c: _Client, line: bytes) -> None:
        try:
            req = decode_request(line)
        except OpsError as e:
            self._reply(c, error_reply(e.code, e.message))
            return
        cmd = COMMANDS.get(req["cmd"])
        if cmd is not None and cmd.slow:
            c.busy = True
            threading.Thread(
                target=self._run_slow, args=(c, req), daemon=True, name=f"ops-{req['cmd']}"
            ).start()
            return
        reply = answer(self.target, req)
        if req["cmd"] == "quit" and "result" in reply:
            self._quit()  # first: once the client has the reply, the shutdown has begun
        self._reply(c, reply)

    def _run_slow(self, c: _Client, req: Json) -> None:
        reply = answer(self.target, req)
        self._done.put((c, reply))
        self._wake()

    def _collect_slow(self) -> None:
        while True:
            try:
                c, reply = self._done.get_nowait()
            except queue.Empty:
                return
            c.busy = False
            if c not in self._clients:
                continue
            self._reply(c, reply)
            self._process(c)

    def _quit(self) -> None:
        log.info("quit requested on the management socket")
        self.target.state = STOPPING
        on_quit = self.target.on_quit
        if on_quit is not None:
            on_quit()

    def _reply(self, c: _Client, reply: Json) -> None:
        c.outbuf += encode(reply)
        if len(c.outbuf) > MAX_OUTPUT:
            log.warning("management socket: dropping a client that does not read its replies")
            self._drop(c)
            return
        self._flush(c)

    def _flush(self, c: _Client) -> None:
        if c not in self._clients:
            return
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(c)
                return
            del c.outbuf[:n]
        self._update(c)

    def _update(self, c: _Client) -> None:
        if c not in self._clients:
            return
        if c.closing and not c.outbuf:
            self._drop(c)
            return
        mask = 0
        if not c.eof and not c.closing:
            mask |= selectors.EVENT_READ
        if c.outbuf:
            mask |= selectors.EVENT_WRITE
        if mask == 0:  # waiting for a slow command: nothing to watch on the socket
            with contextlib.suppress(KeyError):
                self._sel.unregister(c.sock)
            return
        try:
            self._sel.modify(c.sock, mask, c)
        except KeyError:
            self._sel.register(c.sock, mask, c)

    def _drop(self, c: _Client) -> None:
        self._clients.discard(c)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(c.sock)
        c.sock.close()


def serve_socket(target: Target, path: str) -> OpsServer:
    """Start a management socket for ``target`` at ``path``."""
    server = OpsServer(target, path)
    server.start()
    return server
