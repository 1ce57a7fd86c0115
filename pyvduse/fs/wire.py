"""FUSE requests out of a chain's readable buffers, replies into its writable ones (sans I/O).

A virtio-fs request is one descriptor chain: the driver-written part holds the
``fuse_in_header`` and the opcode's arguments (a WRITE's data after them), the part the
device writes takes the ``fuse_out_header`` and the reply's arguments. The driver may be a
VM through vhost-vdpa, so nothing it wrote is trusted: every length is checked against the
buffers before anything is read, the request's fixed part is copied once (driver memory may
change under us), and what cannot be parsed is a ``FuseProtocolError``, which the session
answers with an error reply (or, without a whole header, no reply at all).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from pyvduse.abi import fuse
from pyvduse.ring.iovec import gather, scatter, slice_segments, total

#: The most argument bytes a request other than WRITE may carry: a SETXATTR of the largest
#: value Linux allows (64 KiB) with its name, and some room.
MAX_BODY = 64 * 1024 + 4096
#: The largest name component (NAME_MAX).
NAME_MAX = 255


class FuseProtocolError(ValueError):
    """A request that does not parse; ``errno`` is what its reply says."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


@dataclass
class FuseRequest:
    """One parsed request: the header's fields, the arguments copied, WRITE's data as views
    of the driver's buffers (valid until the request completes)."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes
    data: list[memoryview] = field(default_factory=list)

    def args(self, layout: fuse.Layout) -> tuple[int, ...]:
        """The opcode's fixed arguments, at the start of the body."""
        if len(self.body) < layout.size:
            raise FuseProtocolError(
                f"{layout.name} needs {layout.size} bytes, the request has {len(self.body)}"
            )
        return layout.unpack(self.body)

    def rest(self, layout: fuse.Layout | int) -> bytes:
        """The body after the fixed arguments (names, a value)."""
        size = layout if isinstance(layout, int) else layout.size
        return self.body[size:]


def parse_header(readable: list[memoryview]) -> tuple[int, ...] | None:
    """The ``fuse_in_header`` fields, or None when the buffers are too short for one."""
    if total(readable) < fuse.IN_HEADER.size:
        return None
    return fuse.IN_HEADER.unpack(gather(readable, 0, fuse.IN_HEADER.size))


def parse_request(readable: list[memoryview], max_write: int) -> FuseRequest:
    """The request in ``readable``; ``FuseProtocolError`` when it is malformed."""
    size = total(readable)
    hdr = parse_header(readable)
    if hdr is None:
        raise FuseProtocolError(f"{size} bytes cannot hold a fuse_in_header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = hdr
    hsize = fuse.IN_HEADER.size
    if not hsize <= length <= size:
        raise FuseProtocolError(f"header length {length} outside {hsize}..{size} (the buffers)")
    extbytes = extlen * 8
    if extbytes > length - hsize:
        raise FuseProtocolError(f"extensions of {extbytes} bytes in a request of {length}")
    if opcode == fuse.Opcode.WRITE:
        wsize = fuse.WRITE_IN.size
        if length - hsize < wsize:
            raise FuseProtocolError("WRITE without its fuse_write_in")
        body = gather(readable, hsize, wsize)
        count = fuse.WRITE_IN.unpack(body)[2]
        if count > max_write:
            raise FuseProtocolError(f"WRITE of {count} bytes, more than max_write {max_write}")
        start = hsize + wsize
        if start + count > length - extbytes:
            raise FuseProtocolError(f"WRITE of {count} bytes in a request of {length}")
        data = slice_segments(readable, start, start + count)
        return FuseRequest(opcode, unique, nodeid, uid, gid, pid, body, data)
    nbody = length - hsize - extbytes
    if nbody > MAX_BODY:
        raise FuseProtocolError(f"{nbody} argument bytes, more than {MAX_BODY}", errno.E2BIG)
    body = gather(readable, hsize, nbody) if nbody else b""
    return FuseRequest(opcode, unique, nodeid, uid, gid, pid, body)


def check_name(name: bytes) -> bytes:
    """A name component as the session accepts it: 1..255 bytes, no ``/``, not . or ..
    (the kernel resolves those itself and never asks)."""
    if not name or name in (b".", b".."):
        raise FuseProtocolError(f"name {name!r} is not a component")
    if len(name) > NAME_MAX:
        raise FuseProtocolError("name longer than NAME_MAX", errno.ENAMETOOLONG)
    if b"/" in name:
        raise FuseProtocolError(f"name {name!r} has a '/'")
    return name


def split_strings(data: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings at the start of ``data`` (without their NULs)."""
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        end = data.find(b"\0", pos)
        if end < 0:
            raise FuseProtocolError("a string argument without its terminating NUL")
        out.append(data[pos:end])
        pos = end + 1
    return out


def names(data: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated name components, each checked."""
    return [check_name(n) for n in split_strings(data, count)]


def write_reply(writable: list[memoryview], unique: int, parts: list[bytes | memoryview]) -> int:
    """A successful reply of ``parts`` after the header; returns the bytes written. A reply
    that does not fit the driver's buffers is an EOVERFLOW error instead."""
    length = fuse.OUT_HEADER.size + sum(len(p) for p in parts)
    if length > total(writable):
        return write_error(writable, unique, errno.EOVERFLOW)
    pos = scatter(writable, fuse.OUT_HEADER.pack(length, 0, unique))
    for p in parts:
        if p:
            pos += scatter(slice_segments(writable, pos, pos + len(p)), p)
    return pos


def write_error(writable: list[memoryview], unique: int, code: int) -> int:
    """An error reply (``-code`` in the header); 0 when not even a header fits."""
    size = fuse.OUT_HEADER.size
    if total(writable) < size:
        return 0
    return scatter(writable, fuse.OUT_HEADER.pack(size, -abs(code), unique))


def write_header(writable: list[memoryview], unique: int, payload: int) -> int:
    """The header of a reply whose ``payload`` bytes the caller stored after it already
    (a read straight into the driver's buffers); returns the reply's whole length."""
    length = fuse.OUT_HEADER.size + payload
    scatter(writable, fuse.OUT_HEADER.pack(length, 0, unique))
    return length
