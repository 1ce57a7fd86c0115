"""A FUSE session: requests in, replies out, a ``Filesystem`` answering them (sans I/O).

``FuseSession.serve(readable, writable)`` takes one request's buffers and returns the bytes
it wrote, or a coroutine that returns them when the filesystem's method is ``async def``.
INIT is answered here (protocol 7.38 or the driver's lower minor); every other opcode
becomes one ``Filesystem`` call. Whatever the driver sent, ``serve`` does not raise: a
malformed request gets an error reply (EINVAL and the like), an ``OSError`` of the
filesystem its errno, any other exception EIO (logged, rate-limited). FORGET and
BATCH_FORGET have no reply (0 bytes written).
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pyvduse.abi import fuse
from pyvduse.abi.fuse import Opcode
from pyvduse.fs import encode
from pyvduse.fs.api import NOW, Context, Created, Filesystem, Opened, SetAttr
from pyvduse.fs.wire import (
    FuseProtocolError,
    FuseRequest,
    names,
    parse_header,
    parse_request,
    split_strings,
    write_error,
    write_header,
    write_reply,
)
from pyvduse.ratelimit import RateLimitedLogger
from pyvduse.ring.iovec import slice_segments, total

log = RateLimitedLogger(logging.getLogger(__name__))

#: The INIT flags the session accepts when the driver offers them.
OFFERED_FLAGS = fuse.ASYNC_READ | fuse.BIG_WRITES | fuse.PARALLEL_DIROPS | fuse.AUTO_INVAL_DATA
#: The largest WRITE (and READ) the driver is told to send: 32 pages, FUSE's default.
MAX_WRITE = 128 * 1024
#: Opcodes a read-only session refuses with EROFS.
MUTATING = frozenset(
    {
        Opcode.SETATTR,
        Opcode.SYMLINK,
        Opcode.MKNOD,
        Opcode.MKDIR,
        Opcode.UNLINK,
        Opcode.RMDIR,
        Opcode.RENAME,
        Opcode.RENAME2,
        Opcode.LINK,
        Opcode.WRITE,
        Opcode.CREATE,
        Opcode.SETXATTR,
        Opcode.REMOVEXATTR,
        Opcode.FALLOCATE,
    }
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND

#: What an operation's result becomes: reply parts, an int (bytes of payload already
#: stored after the header), or None (no reply).
Encoder = Callable[[Any], "list[bytes | memoryview] | int | None"]
Step = tuple[Any, Encoder]


class FuseSession:
    """One mount's protocol state over ``fs``; shared by every queue of the device."""

    def __init__(self, fs: Filesystem, *, readonly: bool = False, max_write: int = MAX_WRITE) -> None:
        self.fs = fs
        self.readonly = readonly
        self.max_write = max_write
        self.initialized = False
        self.minor = 0
        self.flags = 0
        self._lock = threading.Lock()
        #: Requests answered, by opcode name (``ctl stats``).
        self.counts: dict[str, int] = {}
        self._read_into = _overrides(fs, "read_into")
        self._write_from = _overrides(fs, "write_from")

    # -- the one entry point --------------------------------------------------------------

    def serve(self, readable: list[memoryview], writable: list[memoryview]) -> int | Coroutine[Any, Any, int]:
        """Answer the request in ``readable`` into ``writable``: bytes written, or a
        coroutine returning them."""
        try:
            req = parse_request(readable, self.max_write)
        except FuseProtocolError as e:
            hdr = parse_header(readable)
            log.warning("malformed FUSE request: %s", e)
            if hdr is None or hdr[1] in (Opcode.FORGET, Opcode.BATCH_FORGET):
                return 0
            return write_error(writable, hdr[2], e.errno)
        self._count(req.opcode)
        try:
            value, encoder = self._dispatch(req, writable)
        except OSError as e:
            return write_error(writable, req.unique, e.errno or errno.EIO)
        except FuseProtocolError as e:
            log.warning("malformed FUSE %s: %s", _opname(req.opcode), e)
            return write_error(writable, req.unique, e.errno)
        except Exception as e:
            log.failure("FUSE %s failed", _opname(req.opcode), error=e)
            return write_error(writable, req.unique, errno.EIO)
        if inspect.isawaitable(value):
            return self._finish_async(value, encoder, req, writable)
        return self._encode(value, encoder, req, writable)

    async def _finish_async(
        self, value: Awaitable[Any], encoder: Encoder, req: FuseRequest, writable: list[memoryview]
    ) -> int:
        try:
            result = await value
        except OSError as e:
            return write_error(writable, req.unique, e.errno or errno.EIO)
        except Exception as e:
            log.failure("FUSE %s failed", _opname(req.opcode), error=e)
            return write_error(writable, req.unique, errno.EIO)
        return self._encode(result, encoder, req, writable)

    def _encode(self, value: Any, encoder: Encoder, req: FuseRequest, writable: list[memoryview]) -> int:
        try:
            parts = encoder(value)
        except OSError as e:
            return write_error(writable, req.unique, e.errno or errno.EIO)
        except Exception as e:
            log.failure("FUSE %s: the filesystem returned %r", _opname(req.opcode), value, error=e)
            return write_error(writable, req.unique, errno.EIO)
        if parts is None:
            return 0
        if isinstance(parts, int):
            return write_header(writable, req.unique, parts)
        return write_reply(writable, req.unique, parts)

    def _count(self, opcode: int) -> None:
        name = _opname(opcode)
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, req: FuseRequest, writable: list[memoryview]) -> Step:
        op = req.opcode
        if op == Opcode.INIT:
            return self._init(req), _parts
        if not self.initialized:
            raise OSError(errno.EIO, "request before INIT")
        if self.readonly and op in MUTATING:
            raise OSError(errno.EROFS, "read-only")
        handler = _HANDLERS.get(op)
        if handler is None:
            raise OSError(errno.ENOSYS, "opcode not implemented")
        return handler(self, req, writable)

    def _init(self, req: FuseRequest) -> list[bytes | memoryview]:
        if len(req.body) < fuse.INIT_IN_SIZE_COMPAT:
            raise FuseProtocolError("INIT without its fuse_init_in")
        major, minor, max_readahead, flags = fuse.INIT_IN.st.unpack_from(
            req.body.ljust(fuse.INIT_IN.size, b"\0")
        )[:4]
        if major != fuse.KERNEL_VERSION:
            # A newer major: the driver retries with ours (the FUSE rule); an older one fails.
            return [fuse.INIT_OUT.pack(fuse.KERNEL_VERSION, fuse.KERNEL_MINOR_VERSION, *([0] * 16))]
        self.minor = min(minor, fuse.KERNEL_MINOR_VERSION)
        self.flags = flags & OFFERED_FLAGS
        self.initialized = True
        init = getattr(self.fs, "init", None)
        if init is not None:
            result = init()
            if inspect.iscoroutine(result):
                result.close()  # an async init cannot hold INIT's reply; it is skipped
                log.warning("an async Filesystem.init() is not run")
        return [
            fuse.INIT_OUT.pack(
                fuse.KERNEL_VERSION,
                self.minor,
                max_readahead,
                self.flags,
                64,  # max_background
                48,  # congestion_threshold
                self.max_write,
                1,  # time_gran: nanoseconds
                0,  # max_pages (not negotiated: the default, 32)
                0,
                0,  # flags2
                *([0] * 7),
            )
        ]

    def ctx(self, req: FuseRequest, umask: int = 0) -> Context:
        return Context(req.uid, req.gid, req.pid, umask)


# -- the handlers: (session, request, writable) -> (value or awaitable, encoder) ------------


def _parts(value: Any) -> list[bytes | memoryview]:
    return value  # type: ignore[no-any-return]


def _empty(_: Any) -> list[bytes | memoryview]:
    return []


def _no_reply(_: Any) -> None:
    return None


def _entry(value: Any) -> list[bytes | memoryview]:
    return [encode.entry_out(value)]


def _attr(value: Any) -> list[bytes | memoryview]:
    return [encode.attr_out(value)]


def _lookup(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    (name,) = names(req.body, 1)
    return s.fs.lookup(req.nodeid, name, s.ctx(req)), _entry


def _forget(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    (nlookup,) = req.args(fuse.FORGET_IN)
    s.fs.forget(req.nodeid, nlookup)
    return None, _no_reply


def _batch_forget(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    count, _ = req.args(fuse.BATCH_FORGET_IN)
    base = fuse.BATCH_FORGET_IN.size
    one = fuse.FORGET_ONE.size
    if base + count * one > len(req.body):
        raise FuseProtocolError(f"BATCH_FORGET of {count} in {len(req.body)} bytes")
    for i in range(count):
        nodeid, nlookup = fuse.FORGET_ONE.unpack(req.body, base + i * one)
        s.fs.forget(nodeid, nlookup)
    return None, _no_reply


def _getattr(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    flags, _, fh = req.args(fuse.GETATTR_IN) if req.body else (0, 0, 0)
    return s.fs.getattr(req.nodeid, fh if flags & fuse.GETATTR_FH else None, s.ctx(req)), _attr


def _setattr(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    a = dict(zip(fuse.SETATTR_IN.fields, req.args(fuse.SETATTR_IN), strict=True))
    valid = a["valid"]
    ch = SetAttr()
    if valid & fuse.FATTR_MODE:
        ch.mode = a["mode"]
    if valid & fuse.FATTR_UID:
        ch.uid = a["uid"]
    if valid & fuse.FATTR_GID:
        ch.gid = a["gid"]
    if valid & fuse.FATTR_SIZE:
        ch.size = a["size"]
    if valid & fuse.FATTR_FH:
        ch.fh = a["fh"]
    if valid & fuse.FATTR_ATIME_NOW:
        ch.atime_ns = NOW
    elif valid & fuse.FATTR_ATIME:
        ch.atime_ns = _signed(a["atime"]) * 1_000_000_000 + a["atimensec"]
    if valid & fuse.FATTR_MTIME_NOW:
        ch.mtime_ns = NOW
    elif valid & fuse.FATTR_MTIME:
        ch.mtime_ns = _signed(a["mtime"]) * 1_000_000_000 + a["mtimensec"]
    return s.fs.setattr(req.nodeid, ch, s.ctx(req)), _attr


def _readlink(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    return s.fs.readlink(req.nodeid, s.ctx(req)), lambda target: [bytes(target)]


def _mknod(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    mode, rdev, umask, _ = req.args(fuse.MKNOD_IN)
    (name,) = names(req.rest(fuse.MKNOD_IN), 1)
    return s.fs.mknod(req.nodeid, name, mode, rdev, s.ctx(req, umask)), _entry


def _mkdir(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    mode, umask = req.args(fuse.MKDIR_IN)
    (name,) = names(req.rest(fuse.MKDIR_IN), 1)
    return s.fs.mkdir(req.nodeid, name, mode, s.ctx(req, umask)), _entry


def _symlink(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    name, target = split_strings(req.body, 2)
    names(name + b"\0", 1)
    if not target:
        raise FuseProtocolError("an empty symlink target", errno.ENOENT)
    return s.fs.symlink(req.nodeid, name, target, s.ctx(req)), _entry


def _unlink(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    (name,) = names(req.body, 1)
    return s.fs.unlink(req.nodeid, name, s.ctx(req)), _empty


def _rmdir(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    (name,) = names(req.body, 1)
    return s.fs.rmdir(req.nodeid, name, s.ctx(req)), _empty


def _rename(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    if req.opcode == Opcode.RENAME2:
        newdir, flags, _ = req.args(fuse.RENAME2_IN)
        rest = req.rest(fuse.RENAME2_IN)
    else:
        (newdir,) = req.args(fuse.RENAME_IN)
        flags, rest = 0, req.rest(fuse.RENAME_IN)
    old, new = names(rest, 2)
    return s.fs.rename(req.nodeid, old, newdir, new, flags, s.ctx(req)), _empty


def _link(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    (oldnodeid,) = req.args(fuse.LINK_IN)
    (name,) = names(req.rest(fuse.LINK_IN), 1)
    return s.fs.link(oldnodeid, req.nodeid, name, s.ctx(req)), _entry


def _open(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    flags, _ = req.args(fuse.OPEN_IN)
    if s.readonly and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
        raise OSError(errno.EROFS, "read-only")
    return s.fs.open(req.nodeid, flags, s.ctx(req)), _opened


def _opened(value: Any) -> list[bytes | memoryview]:
    if isinstance(value, Opened):
        flags = (fuse.FOPEN_DIRECT_IO if value.direct_io else 0) | (
            fuse.FOPEN_KEEP_CACHE if value.keep_cache else 0
        )
        return [encode.open_out(value.fh, flags)]
    return [encode.open_out(int(value))]


def _read(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, offset, size, *_ = req.args(fuse.READ_IN)
    size = min(size, s.max_write, max(total(w) - fuse.OUT_HEADER.size, 0))
    if s._read_into:
        bufs = slice_segments(w, fuse.OUT_HEADER.size, fuse.OUT_HEADER.size + size)
        return s.fs.read_into(req.nodeid, fh, offset, bufs), lambda n: _bounded(int(n), size)  # type: ignore[attr-defined]
    return s.fs.read(req.nodeid, fh, offset, size), lambda data: _read_parts(data, size)


def _bounded(n: int, size: int) -> int:
    if not 0 <= n <= size:
        raise ValueError(f"read_into returned {n}, not 0..{size}")
    return n


def _read_parts(data: Any, size: int) -> list[bytes | memoryview]:
    data = memoryview(data).cast("B")
    if len(data) > size:
        raise ValueError(f"read returned {len(data)} bytes, more than the {size} asked for")
    return [data]


def _write(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, offset, size, *_ = req.args(fuse.WRITE_IN)
    if s._write_from:
        result = s.fs.write_from(req.nodeid, fh, offset, req.data)  # type: ignore[attr-defined]
    else:
        data = req.data[0] if len(req.data) == 1 else memoryview(b"".join(req.data))
        result = s.fs.write(req.nodeid, fh, offset, data if req.data else memoryview(b""))
    return result, lambda n: _written(int(n), size)


def _written(n: int, size: int) -> list[bytes | memoryview]:
    if not 0 <= n <= size:
        raise ValueError(f"write returned {n}, not 0..{size}")
    return [fuse.WRITE_OUT.pack(n, 0)]


def _statfs(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    return s.fs.statfs(req.nodeid), lambda st: [encode.statfs_out(st)]


def _release(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, *_ = req.args(fuse.RELEASE_IN)
    if req.opcode == Opcode.RELEASEDIR:
        return s.fs.releasedir(req.nodeid, fh), _empty
    return s.fs.release(req.nodeid, fh), _empty


def _flush(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, *_ = req.args(fuse.FLUSH_IN)
    return s.fs.flush(req.nodeid, fh), _empty


def _fsync(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, flags, _ = req.args(fuse.FSYNC_IN)
    datasync = bool(flags & fuse.FSYNC_FDATASYNC)
    if req.opcode == Opcode.FSYNCDIR:
        return s.fs.fsyncdir(req.nodeid, fh, datasync), _empty
    return s.fs.fsync(req.nodeid, fh, datasync), _empty


def _opendir(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    req.args(fuse.OPEN_IN)
    return s.fs.opendir(req.nodeid, s.ctx(req)), lambda fh: [encode.open_out(int(fh))]


def _readdir(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, offset, size, *_ = req.args(fuse.READ_IN)
    limit = min(size, max(total(w) - fuse.OUT_HEADER.size, 0))
    return s.fs.readdir(req.nodeid, fh, offset), lambda entries: [encode.dirents(entries, limit)]


def _access(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    mask, _ = req.args(fuse.ACCESS_IN)
    if s.readonly and mask & os.W_OK:
        raise OSError(errno.EROFS, "read-only")
    return s.fs.access(req.nodeid, mask, s.ctx(req)), _empty


def _create(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    flags, mode, umask, _ = req.args(fuse.CREATE_IN)
    (name,) = names(req.rest(fuse.CREATE_IN), 1)
    return s.fs.create(req.nodeid, name, mode, flags, s.ctx(req, umask)), _created


def _created(value: Any) -> list[bytes | memoryview]:
    if not isinstance(value, Created):
        raise TypeError(f"create returned {type(value).__name__}, not Created")
    flags = fuse.FOPEN_DIRECT_IO if value.direct_io else 0
    return [encode.entry_out(value.entry), encode.open_out(value.fh, flags)]


def _fallocate(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, offset, length, mode, _ = req.args(fuse.FALLOCATE_IN)
    return s.fs.fallocate(req.nodeid, fh, offset, length, mode), _empty


def _lseek(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    fh, offset, whence, _ = req.args(fuse.LSEEK_IN)
    return s.fs.lseek(req.nodeid, fh, offset, whence), lambda off: [fuse.LSEEK_OUT.pack(int(off))]


def _getxattr(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    size, _ = req.args(fuse.GETXATTR_IN)
    (name,) = split_strings(req.rest(fuse.GETXATTR_IN), 1)
    return s.fs.getxattr(req.nodeid, name), lambda value: _xattr_reply(bytes(value), size)


def _listxattr(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    size, _ = req.args(fuse.GETXATTR_IN)
    return s.fs.listxattr(req.nodeid), lambda found: _xattr_reply(b"".join(n + b"\0" for n in found), size)


def _xattr_reply(value: bytes, size: int) -> list[bytes | memoryview]:
    if size == 0:
        return [fuse.GETXATTR_OUT.pack(len(value), 0)]
    if len(value) > size:
        raise OSError(errno.ERANGE, "the value does not fit")
    return [value]


def _setxattr(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    ext = bool(s.flags & fuse.SETXATTR_EXT)
    fixed = fuse.SETXATTR_IN.size if ext else fuse.SETXATTR_IN_SIZE_COMPAT
    if len(req.body) < fixed:
        raise FuseProtocolError("SETXATTR without its fuse_setxattr_in")
    size, flags = fuse.SETXATTR_IN.st.unpack_from(req.body.ljust(fuse.SETXATTR_IN.size, b"\0"))[:2]
    rest = req.body[fixed:]
    (name,) = split_strings(rest, 1)
    value = rest[len(name) + 1 :]
    if len(value) != size:
        raise FuseProtocolError(f"SETXATTR value of {len(value)} bytes, header says {size}")
    return s.fs.setxattr(req.nodeid, name, value, flags), _empty


def _removexattr(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    (name,) = split_strings(req.body, 1)
    return s.fs.removexattr(req.nodeid, name), _empty


def _destroy(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    s.initialized = False
    return s.fs.destroy(), _empty


def _ok(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    return None, _empty


def _interrupt(s: FuseSession, req: FuseRequest, w: list[memoryview]) -> Step:
    return None, _no_reply  # requests are not interrupted: each finishes


_HANDLERS: dict[int, Callable[[FuseSession, FuseRequest, list[memoryview]], Step]] = {
    Opcode.LOOKUP: _lookup,
    Opcode.FORGET: _forget,
    Opcode.BATCH_FORGET: _batch_forget,
    Opcode.GETATTR: _getattr,
    Opcode.SETATTR: _setattr,
    Opcode.READLINK: _readlink,
    Opcode.MKNOD: _mknod,
    Opcode.MKDIR: _mkdir,
    Opcode.SYMLINK: _symlink,
    Opcode.UNLINK: _unlink,
    Opcode.RMDIR: _rmdir,
    Opcode.RENAME: _rename,
    Opcode.RENAME2: _rename,
    Opcode.LINK: _link,
    Opcode.OPEN: _open,
    Opcode.READ: _read,
    Opcode.WRITE: _write,
    Opcode.STATFS: _statfs,
    Opcode.RELEASE: _release,
    Opcode.RELEASEDIR: _release,
    Opcode.FLUSH: _flush,
    Opcode.FSYNC: _fsync,
    Opcode.FSYNCDIR: _fsync,
    Opcode.OPENDIR: _opendir,
    Opcode.READDIR: _readdir,
    Opcode.ACCESS: _access,
    Opcode.CREATE: _create,
    Opcode.FALLOCATE: _fallocate,
    Opcode.LSEEK: _lseek,
    Opcode.GETXATTR: _getxattr,
    Opcode.LISTXATTR: _listxattr,
    Opcode.SETXATTR: _setxattr,
    Opcode.REMOVEXATTR: _removexattr,
    Opcode.DESTROY: _destroy,
    Opcode.SYNCFS: _ok,
    Opcode.INTERRUPT: _interrupt,
}


def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name.lower()
    except ValueError:
        return f"opcode_{opcode}"


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _overrides(fs: Filesystem, name: str) -> bool:
    return callable(getattr(type(fs), name, None))
