"""A read-only filesystem of one file, /hello: the guide's first filesystem."""

from __future__ import annotations

import errno
import stat

from pyvduse.fs import ROOT, Attr, Context, DirEntry, Entry, Filesystem

TEXT = b"Hello from Python!\n"
HELLO = 2  # the inode number of /hello


class Hello(Filesystem):
    def getattr(self, ino: int, fh: int | None, ctx: Context) -> Attr:
        if ino == ROOT:
            return Attr(ino, stat.S_IFDIR | 0o555, nlink=2)
        if ino == HELLO:
            return Attr(ino, stat.S_IFREG | 0o444, size=len(TEXT))
        raise OSError(errno.ENOENT, "no such inode")

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        if parent != ROOT or name != b"hello":
            raise OSError(errno.ENOENT, "no such file")
        return Entry(self.getattr(HELLO, None, ctx))

    def readdir(self, ino: int, fh: int, offset: int) -> list[DirEntry]:
        entries = [DirEntry(b".", ROOT, stat.S_IFDIR, 1), DirEntry(b"hello", HELLO, stat.S_IFREG, 2)]
        return entries[offset:]

    def open(self, ino: int, flags: int, ctx: Context) -> int:
        return 0

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        return TEXT[offset : offset + size]
