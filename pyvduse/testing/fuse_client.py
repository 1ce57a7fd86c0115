"""A FUSE client for tests and guides: requests laid out as a virtio-fs driver lays them
out in a chain, sent to a ``FuseSession`` directly (no kernel, no rings), replies decoded."""

from __future__ import annotations

import asyncio
import inspect
import struct

from pyvduse.abi import fuse
from pyvduse.fs.session import FuseSession


class FuseError(OSError):
    pass


def split(data: bytes | bytearray, cuts: list[int]) -> list[memoryview]:
    """``data`` as segments cut at ``cuts`` (sorted offsets), like a chain's buffers."""
    mv = memoryview(data)
    out, pos = [], 0
    for c in sorted(set(c for c in cuts if 0 < c < len(data))):
        out.append(mv[pos:c])
        pos = c
    out.append(mv[pos:])
    return [s for s in out if len(s)]


def serve(session: FuseSession, readable: list[memoryview], writable: list[memoryview]) -> int:
    result = session.serve(readable, writable)
    if inspect.iscoroutine(result):
        return int(asyncio.run(result))
    assert isinstance(result, int)
    return result


class Driver:
    """Sends requests to ``session`` and decodes replies (FuseError on an error reply)."""

    def __init__(self, session: FuseSession) -> None:
        self.session = session
        self.unique = 0

    def raw(
        self, opcode: int, nodeid: int, body: bytes, reply: int = 4096, cuts: list[int] | None = None
    ) -> tuple[int, bytes]:
        self.unique += 2
        hdr = fuse.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0)
        out = bytearray(16 + reply)
        readable = split(hdr + body, cuts or [40])
        n = serve(self.session, readable, [memoryview(out)])
        if n == 0:
            return 0, b""
        length, error, unique = fuse.OUT_HEADER.unpack(out)
        assert unique == self.unique and length == n
        return error, bytes(out[16:n])

    def call(self, opcode: int, nodeid: int, body: bytes = b"", reply: int = 4096) -> bytes:
        error, data = self.raw(opcode, nodeid, body, reply)
        if error:
            raise FuseError(-error, f"{fuse.Opcode(opcode).name}: errno {-error}")
        return data

    def init(self) -> tuple[int, ...]:
        body = fuse.INIT_IN.pack(
            7, 41, 65536, fuse.ASYNC_READ | fuse.INIT_EXT | fuse.BIG_WRITES, 0, *[0] * 11
        )
        return fuse.INIT_OUT.unpack(self.call(fuse.Opcode.INIT, 0, body))

    def lookup(self, parent: int, name: bytes) -> tuple[int, ...]:
        return fuse.ENTRY_OUT.unpack(self.call(fuse.Opcode.LOOKUP, parent, name + b"\0"))

    def getattr(self, ino: int) -> tuple[int, ...]:
        return fuse.ATTR_OUT.unpack(self.call(fuse.Opcode.GETATTR, ino, fuse.GETATTR_IN.pack(0, 0, 0)))

    def open(self, ino: int, flags: int = 0) -> int:
        return int(fuse.OPEN_OUT.unpack(self.call(fuse.Opcode.OPEN, ino, fuse.OPEN_IN.pack(flags, 0)))[0])

    def create(self, parent: int, name: bytes, mode: int = 0o100644, flags: int = 0o102) -> tuple[int, int]:
        body = fuse.CREATE_IN.pack(flags, mode, 0o022, 0) + name + b"\0"
        data = self.call(fuse.Opcode.CREATE, parent, body)
        entry = fuse.ENTRY_OUT.unpack(data[: fuse.ENTRY_OUT.size])
        (fh, _, _) = fuse.OPEN_OUT.unpack(data[fuse.ENTRY_OUT.size :])
        return int(entry[0]), int(fh)

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        body = fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        return self.call(fuse.Opcode.READ, ino, body, reply=size)

    def write(self, ino: int, fh: int, offset: int, data: bytes) -> int:
        body = fuse.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data
        return int(fuse.WRITE_OUT.unpack(self.call(fuse.Opcode.WRITE, ino, body))[0])

    def release(self, ino: int, fh: int) -> None:
        self.call(fuse.Opcode.RELEASE, ino, fuse.RELEASE_IN.pack(fh, 0, 0, 0))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> int:
        data = self.call(fuse.Opcode.MKDIR, parent, fuse.MKDIR_IN.pack(mode, 0o022) + name + b"\0")
        return int(fuse.ENTRY_OUT.unpack(data)[0])

    def readdir(self, ino: int, size: int = 4096) -> list[tuple[bytes, int, int]]:
        fh = fuse.OPEN_OUT.unpack(self.call(fuse.Opcode.OPENDIR, ino, fuse.OPEN_IN.pack(0, 0)))[0]
        out: list[tuple[bytes, int, int]] = []
        offset = 0
        while True:
            data = self.call(fuse.Opcode.READDIR, ino, fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), size)
            if not data:
                break
            pos = 0
            while pos < len(data):
                _ino, off, namelen, dtype = fuse.DIRENT.unpack(data, pos)
                name = data[pos + 24 : pos + 24 + namelen]
                out.append((name, dtype, off))
                offset = off
                pos += fuse.dirent_size(namelen)
        self.call(fuse.Opcode.RELEASEDIR, ino, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
        return out

    def rename(self, parent: int, old: bytes, newdir: int, new: bytes) -> None:
        self.call(fuse.Opcode.RENAME, parent, fuse.RENAME_IN.pack(newdir) + old + b"\0" + new + b"\0")

    def unlink(self, parent: int, name: bytes) -> None:
        self.call(fuse.Opcode.UNLINK, parent, name + b"\0")

    def forget(self, ino: int, n: int) -> None:
        error, data = self.raw(fuse.Opcode.FORGET, ino, struct.pack("<Q", n))
        assert (error, data) == (0, b"")
