"""The filesystem API: what a user implements to serve a filesystem over virtio-fs.

Subclass ``Filesystem`` and override the operations the filesystem has; the rest answer
ENOSYS (the kernel then stops asking, where FUSE allows that). Inodes are the numbers the
filesystem chooses: ``lookup`` returns an ``Entry`` whose ``attr.ino`` is the inode the
kernel uses from then on (``ROOT`` is the root directory's), and every ``Entry`` returned
(lookup, create, mkdir, mknod, symlink, link) is one lookup the kernel holds until ``forget``
gives it back. Handles (``open``, ``opendir``, ``create``) are numbers of the filesystem's
choice too. An operation fails by raising ``OSError`` (its errno goes to the driver);
any other exception is EIO. Every method may instead be ``async def``: the device then runs
it on the runtime's event loop, and a queue has many requests in flight.

Names are bytes as the driver sent them, one path component (the session has refused
empty names and names with ``/`` or NUL before any method sees them).

Two optional methods spare a copy of the data: ``read_into(ino, fh, offset, buffers) ->
int`` stores a READ straight into the driver's buffers (a list of memoryviews) and returns
the bytes stored, instead of ``read``; ``write_from(ino, fh, offset, buffers) -> int``
takes a WRITE's data as the driver's buffers, instead of ``write``. Define them only if
the filesystem has them (the session looks for them on the class).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

ROOT = 1

T = TypeVar("T")
#: What an operation returns: the value, or an awaitable of it (``async def``).
Result: TypeAlias = T | Awaitable[T]


@dataclass
class Attr:
    """An inode's attributes (``struct fuse_attr``); times in nanoseconds since the epoch."""

    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blocks: int = 0
    blksize: int = 4096
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int) -> Attr:
        """From a stat result, under the inode number the kernel knows it by."""
        return cls(
            ino=ino,
            mode=st.st_mode,
            size=st.st_size,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev & 0xFFFFFFFF,
            blocks=st.st_blocks,
            blksize=st.st_blksize,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )


@dataclass
class Entry:
    """A name's inode as ``lookup`` (and every creating operation) gives it to the kernel;
    ``*_timeout``: how long the kernel may keep the name and the attributes without asking."""

    attr: Attr
    generation: int = 0
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0


@dataclass
class StatFs:
    """``statfs`` (``struct fuse_kstatfs``)."""

    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


@dataclass
class DirEntry:
    """One name of a directory listing: ``offset`` is where the listing goes on after it
    (what the next ``readdir`` call gets to resume from, never 0)."""

    name: bytes
    ino: int
    mode: int  # only the type bits count (S_IFREG, S_IFDIR, ...)
    offset: int


@dataclass
class SetAttr:
    """What ``setattr`` changes: the fields that are not None (times: nanoseconds since the
    epoch, or ``NOW``)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    fh: int | None = None


#: ``SetAttr`` times: the current time.
NOW = -1


@dataclass
class Context:
    """Who asks: the calling process in the driver's system."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


@dataclass
class Created:
    """``create``'s result: the new file's entry and its open handle."""

    entry: Entry
    fh: int
    direct_io: bool = False


@dataclass
class Opened:
    """``open``'s result when a plain handle number is not enough."""

    fh: int
    direct_io: bool = False
    keep_cache: bool = False


def _nosys() -> OSError:
    return OSError(errno.ENOSYS, "not implemented")


class Filesystem:
    """Base class of filesystems served over virtio-fs: override the operations you have."""

    def init(self) -> Result[None]:
        """The driver mounted the filesystem (FUSE_INIT)."""
        return None

    def destroy(self) -> Result[None]:
        """The driver unmounted it (FUSE_DESTROY)."""
        return None

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Result[Entry]:
        raise OSError(errno.ENOENT, "no such entry")

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel drops ``nlookup`` of its lookups of ``ino`` (never fails; no reply)."""

    def getattr(self, ino: int, fh: int | None, ctx: Context) -> Result[Attr]:
        raise _nosys()

    def setattr(self, ino: int, changes: SetAttr, ctx: Context) -> Result[Attr]:
        raise _nosys()

    def readlink(self, ino: int, ctx: Context) -> Result[bytes]:
        raise _nosys()

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Result[Entry]:
        raise _nosys()

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Result[Entry]:
        raise _nosys()

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Result[Entry]:
        raise _nosys()

    def unlink(self, parent: int, name: bytes, ctx: Context) -> Result[None]:
        raise _nosys()

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> Result[None]:
        raise _nosys()

    def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int, ctx: Context
    ) -> Result[None]:
        raise _nosys()

    def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Context) -> Result[Entry]:
        raise _nosys()

    def open(self, ino: int, flags: int, ctx: Context) -> Result[int | Opened]:
        raise _nosys()

    def read(self, ino: int, fh: int, offset: int, size: int) -> Result[bytes]:
        raise _nosys()

    def write(self, ino: int, fh: int, offset: int, data: memoryview) -> Result[int]:
        raise _nosys()

    def flush(self, ino: int, fh: int) -> Result[None]:
        return None

    def release(self, ino: int, fh: int) -> Result[None]:
        return None

    def fsync(self, ino: int, fh: int, datasync: bool) -> Result[None]:
        return None

    def opendir(self, ino: int, ctx: Context) -> Result[int]:
        return 0

    def readdir(self, ino: int, fh: int, offset: int) -> Result[Iterable[DirEntry]]:
        """The directory's entries after ``offset`` (0: from the start), in a stable
        order; the session takes as many as fit the driver's buffer."""
        raise _nosys()

    def releasedir(self, ino: int, fh: int) -> Result[None]:
        return None

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> Result[None]:
        return None

    def statfs(self, ino: int) -> Result[StatFs]:
        return StatFs()

    def access(self, ino: int, mask: int, ctx: Context) -> Result[None]:
        raise _nosys()

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Context) -> Result[Created]:
        raise _nosys()

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> Result[None]:
        raise _nosys()

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> Result[int]:
        raise _nosys()

    def getxattr(self, ino: int, name: bytes) -> Result[bytes]:
        raise _nosys()

    def listxattr(self, ino: int) -> Result[list[bytes]]:
        raise _nosys()

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> Result[None]:
        raise _nosys()

    def removexattr(self, ino: int, name: bytes) -> Result[None]:
        raise _nosys()


def file_type(mode: int) -> int:
    """The dirent type (DT_REG, DT_DIR, ...) of a mode: its S_IFMT bits shifted."""
    return stat.S_IFMT(mode) >> 12
