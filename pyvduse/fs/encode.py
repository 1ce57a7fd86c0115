"""The API's values as FUSE reply arguments (attributes, entries, statfs, dirents)."""

from __future__ import annotations

from collections.abc import Iterable

from pyvduse.abi import fuse
from pyvduse.fs.api import Attr, DirEntry, Entry, StatFs, file_type

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


def _split(seconds: float) -> tuple[int, int]:
    """A timeout as (seconds, nanoseconds), never negative."""
    ns = max(int(seconds * 1e9), 0)
    return ns // 1_000_000_000, ns % 1_000_000_000


def attr_values(a: Attr) -> tuple[int, ...]:
    """``struct fuse_attr``'s fields in order."""
    at, atn = divmod(a.atime_ns, 1_000_000_000)
    mt, mtn = divmod(a.mtime_ns, 1_000_000_000)
    ct, ctn = divmod(a.ctime_ns, 1_000_000_000)
    return (
        a.ino & U64,
        a.size & U64,
        a.blocks & U64,
        at & U64,
        mt & U64,
        ct & U64,
        atn,
        mtn,
        ctn,
        a.mode & U32,
        a.nlink & U32,
        a.uid & U32,
        a.gid & U32,
        a.rdev & U32,
        a.blksize & U32,
        0,
    )


def attr_out(a: Attr, timeout: float = 1.0) -> bytes:
    s, ns = _split(timeout)
    return fuse.ATTR_OUT.pack(s, ns, 0, *attr_values(a))


def entry_out(e: Entry) -> bytes:
    es, ens = _split(e.entry_timeout)
    as_, ans = _split(e.attr_timeout)
    return fuse.ENTRY_OUT.pack(e.attr.ino & U64, e.generation & U64, es, as_, ens, ans, *attr_values(e.attr))


def open_out(fh: int, open_flags: int = 0) -> bytes:
    return fuse.OPEN_OUT.pack(fh & U64, open_flags, 0)


def statfs_out(s: StatFs) -> bytes:
    return fuse.KSTATFS.pack(
        s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize, 0, *([0] * 6)
    )


def dirents(entries: Iterable[DirEntry], limit: int) -> bytes:
    """As many ``fuse_dirent`` records as fit ``limit`` bytes."""
    out = bytearray()
    for d in entries:
        size = fuse.dirent_size(len(d.name))
        if len(out) + size > limit:
            break
        out += fuse.DIRENT.pack(d.ino & U64, d.offset & U64, len(d.name), file_type(d.mode))
        out += d.name
        out += bytes(size - fuse.NAME_OFFSET - len(d.name))
    return bytes(out)
