"""A filesystem serving a host directory, confined to it (what ``pyvduse fs --dir`` serves).

Every inode the kernel holds is an ``O_PATH`` fd of ours, and every name the driver sends is
one component resolved below its parent's fd with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``, or used as the single-component name of an
``*at`` call (mkdirat, unlinkat, renameat, symlinkat, linkat), which never follows a
symlink in it: no ``..``, absolute path or symlink the driver (or the host, racing it)
puts in the tree reaches outside the directory. Symlinks are served as symlinks: the
driver's kernel follows them in its own namespace. Only regular files and directories are
opened (a FIFO or device node would block or reach the host's devices), and device nodes
cannot be made. Files are opened again through ``/proc/self/fd`` (needs /proc).

The daemon's own credentials do every operation: a root daemon creates files owned by root
whatever the driver's caller is (the driver's kernel checks permissions on the attributes
it is given).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyvduse.fs.api import (
    NOW,
    ROOT,
    Attr,
    Context,
    Created,
    DirEntry,
    Entry,
    Filesystem,
    SetAttr,
    StatFs,
)
from pyvduse.fs.openat2 import openat2, renameat2

#: The lookup count of the root, which the kernel never forgets.
ROOT_LOOKUPS = 1 << 62


@dataclass
class _Inode:
    fd: int  # O_PATH | O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    nlookup: int


class _Borrowed:
    """The fds of one operation: duplicates of the inode and handle tables' fds, closed when
    the operation ends. A FORGET or RELEASE that a hostile driver races with the operation
    closes the table's fd only, so no fd number the operation uses can meanwhile be reused
    for another of the daemon's files (its device fd, an eventfd, a mapped region)."""

    __slots__ = ("_fs", "_open")

    def __init__(self, fs: Passthrough) -> None:
        self._fs = fs
        self._open: list[int] = []

    def inode(self, ino: int) -> int:
        fd = self._fs._dup_inode(ino)
        self._open.append(fd)
        return fd

    def handle(self, fh: int) -> int:
        fd = self._fs._dup_handle(fh)
        self._open.append(fd)
        return fd

    def __enter__(self) -> _Borrowed:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._open:
            os.close(fd)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class Passthrough(Filesystem):
    """Serves directory ``root``; ``timeout``: seconds the kernel may cache names and
    attributes (the host changing the tree is seen after that long)."""

    def __init__(self, root: str | Path, *, timeout: float = 1.0) -> None:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.timeout = timeout
        self._lock = threading.Lock()
        key = (st.st_dev, st.st_ino)
        self._inodes: dict[int, _Inode] = {ROOT: _Inode(fd, key, ROOT_LOOKUPS)}
        self._by_key: dict[tuple[int, int], int] = {key: ROOT}
        self._next_ino = ROOT + 1
        self._files: dict[int, int] = {}  # fh -> fd
        self._dirs: dict[int, list[DirEntry]] = {}
        self._next_fh = 1

    def init(self) -> None:
        """A new mount (FUSE_INIT): the kernel holds none of the previous mount's inodes or
        handles (a remount after a driver reset), so they are dropped, the root kept."""
        with self._lock:
            stale = [i.fd for n, i in self._inodes.items() if n != ROOT] + list(self._files.values())
            root = self._inodes[ROOT]
            self._inodes = {ROOT: root}
            self._by_key = {root.key: ROOT}
            self._files.clear()
            self._dirs.clear()
        for fd in stale:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in [i.fd for i in self._inodes.values()] + list(self._files.values()):
                os.close(fd)
            self._inodes.clear()
            self._files.clear()

    # -- inodes -----------------------------------------------------------------------------

    def _fds(self) -> _Borrowed:
        """The fds one operation uses, duplicated from the tables and closed when it ends
        (see ``_Borrowed``)."""
        return _Borrowed(self)

    def _dup_inode(self, ino: int) -> int:
        with self._lock:
            inode = self._inodes.get(ino)
            if inode is None:
                raise OSError(errno.ESTALE, "no such inode")
            return os.dup(inode.fd)

    def _dup_handle(self, fh: int) -> int:
        with self._lock:
            fd = self._files.get(fh)
            if fd is None:
                raise OSError(errno.EBADF, "no such handle")
            return os.dup(fd)

    def _entry_from_fd(self, fd: int) -> Entry:
        """The inode of O_PATH ``fd`` (taken over: kept or closed), one more lookup of it."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        with self._lock:
            ino = self._by_key.get(key)
            if ino is not None:
                self._inodes[ino].nlookup += 1
                os.close(fd)
            else:
                ino = self._next_ino
                self._next_ino += 1
                self._inodes[ino] = _Inode(fd, key, 1)
                self._by_key[key] = ino
        return Entry(Attr.from_stat(st, ino), entry_timeout=self.timeout, attr_timeout=self.timeout)

    def _lookup_fd(self, parent: int, name: bytes) -> int:
        with self._fds() as f:
            return openat2(f.inode(parent), name, os.O_PATH | os.O_NOFOLLOW)

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        return self._entry_from_fd(self._lookup_fd(parent, name))

    def forget(self, ino: int, nlookup: int) -> None:
        with self._lock:
            inode = self._inodes.get(ino)
            if inode is None or ino == ROOT:
                return
            inode.nlookup -= nlookup
            if inode.nlookup > 0:
                return
            del self._inodes[ino]
            del self._by_key[inode.key]
        os.close(inode.fd)

    def inode_count(self) -> int:
        """Inodes the kernel holds (the root included)."""
        return len(self._inodes)

    # -- attributes -------------------------------------------------------------------------

    def getattr(self, ino: int, fh: int | None, ctx: Context) -> Attr:
        with self._fds() as f:
            return Attr.from_stat(os.stat(f.inode(ino)), ino)

    def setattr(self, ino: int, changes: SetAttr, ctx: Context) -> Attr:
        with self._fds() as f:
            fd = f.inode(ino)
            st = os.fstat(fd)
            is_link = stat.S_ISLNK(st.st_mode)
            if changes.mode is not None and not is_link:
                os.chmod(_proc(fd), stat.S_IMODE(changes.mode))
            if (changes.uid is not None or changes.gid is not None) and not is_link:
                uid = -1 if changes.uid is None else changes.uid
                gid = -1 if changes.gid is None else changes.gid
                os.chown(_proc(fd), uid, gid)
            if changes.size is not None:
                handle = self._files.get(changes.fh) if changes.fh is not None else None
                if handle is not None:
                    os.ftruncate(handle, changes.size)
                elif stat.S_ISREG(st.st_mode):
                    os.truncate(_proc(fd), changes.size)
                else:
                    raise OSError(errno.EINVAL, "not a regular file")
            if (changes.atime_ns is not None or changes.mtime_ns is not None) and not is_link:
                now = time.time_ns()

                def pick(value: int | None, current: int) -> int:
                    return current if value is None else now if value == NOW else value

                os.utime(
                    _proc(fd),
                    ns=(pick(changes.atime_ns, st.st_atime_ns), pick(changes.mtime_ns, st.st_mtime_ns)),
                )
            return self.getattr(ino, None, ctx)

    def readlink(self, ino: int, ctx: Context) -> bytes:
        with self._fds() as f:
            return os.fsencode(os.readlink("", dir_fd=f.inode(ino)))

    def statfs(self, ino: int) -> StatFs:
        with self._fds() as f:
            v = os.fstatvfs(f.inode(ino))
            return StatFs(
                v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_bsize, v.f_namemax, v.f_frsize
            )

        # -- names ------------------------------------------------------------------------------

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        with self._fds() as f:
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise OSError(errno.EPERM, "device nodes cannot be made in a shared directory")
            os.mknod(name, mode, 0, dir_fd=f.inode(parent))
            return self.lookup(parent, name, ctx)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        with self._fds() as f:
            os.mkdir(name, mode, dir_fd=f.inode(parent))
            return self.lookup(parent, name, ctx)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        with self._fds() as f:
            os.symlink(target, name, dir_fd=f.inode(parent))
            return self.lookup(parent, name, ctx)

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        with self._fds() as f:
            os.unlink(name, dir_fd=f.inode(parent))

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        with self._fds() as f:
            os.rmdir(name, dir_fd=f.inode(parent))

    def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int, ctx: Context
    ) -> None:
        with self._fds() as f:
            src, dst = f.inode(parent), f.inode(new_parent)
            if flags:
                renameat2(src, name, dst, new_name, flags)
            else:
                os.rename(name, new_name, src_dir_fd=src, dst_dir_fd=dst)

    def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Context) -> Entry:
        with self._fds() as f:
            os.link(_proc(f.inode(ino)), new_name, dst_dir_fd=f.inode(new_parent), follow_symlinks=True)
            return self.lookup(new_parent, new_name, ctx)

        # -- files ------------------------------------------------------------------------------

    def _new_fh(self, fd: int) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = fd
        return fh

    def open(self, ino: int, flags: int, ctx: Context) -> int:
        with self._fds() as f:
            fd = f.inode(ino)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EPERM, "only regular files are opened")
            flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW)
            return self._new_fh(os.open(_proc(fd), flags | os.O_CLOEXEC))

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Context) -> Created:
        with self._fds() as f:
            flags = (flags | os.O_CREAT | os.O_NOFOLLOW) & ~os.O_NOCTTY
            fd = openat2(f.inode(parent), name, flags, stat.S_IMODE(mode))
            try:
                entry = self._entry_from_fd(os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC))
            except BaseException:
                os.close(fd)
                raise
            return Created(entry, self._new_fh(fd))

    def read_into(self, ino: int, fh: int, offset: int, buffers: list[memoryview]) -> int:
        with self._fds() as f:
            if not buffers:
                return 0
            return os.preadv(f.handle(fh), buffers, offset)

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        with self._fds() as f:
            return os.pread(f.handle(fh), size, offset)

    def write_from(self, ino: int, fh: int, offset: int, buffers: list[memoryview]) -> int:
        with self._fds() as f:
            if not buffers:
                return 0
            return os.pwritev(f.handle(fh), buffers, offset)

    def write(self, ino: int, fh: int, offset: int, data: memoryview) -> int:
        with self._fds() as f:
            return os.pwrite(f.handle(fh), data, offset)

    def flush(self, ino: int, fh: int) -> None:
        with self._fds() as f:
            f.handle(fh)

    def release(self, ino: int, fh: int) -> None:
        with self._lock:
            fd = self._files.pop(fh, None)
        if fd is not None:
            os.close(fd)

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        with self._fds() as f:
            fd = f.handle(fh)
            (os.fdatasync if datasync else os.fsync)(fd)

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        with self._fds() as f:
            if mode:
                raise OSError(errno.EOPNOTSUPP, "only plain fallocate")
            os.posix_fallocate(f.handle(fh), offset, length)

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        with self._fds() as f:
            return os.lseek(f.handle(fh), offset, whence)

        # -- directories ------------------------------------------------------------------------

    def opendir(self, ino: int, ctx: Context) -> int:
        with self._fds() as f:
            fd = os.open(_proc(f.inode(ino)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                entries = [DirEntry(b".", ino, stat.S_IFDIR, 1), DirEntry(b"..", ino, stat.S_IFDIR, 2)]
                with os.scandir(fd) as it:
                    for d in it:
                        try:
                            mode = d.stat(follow_symlinks=False).st_mode
                        except OSError:
                            continue  # gone meanwhile
                        entries.append(DirEntry(os.fsencode(d.name), d.inode(), mode, len(entries) + 1))
            finally:
                os.close(fd)
            with self._lock:
                fh = self._next_fh
                self._next_fh += 1
                self._dirs[fh] = entries
            return fh

    def readdir(self, ino: int, fh: int, offset: int) -> Iterable[DirEntry]:
        entries = self._dirs.get(fh)
        if entries is None:
            raise OSError(errno.EBADF, "no such directory handle")
        return entries[offset:] if offset >= 0 else []

    def releasedir(self, ino: int, fh: int) -> None:
        with self._lock:
            self._dirs.pop(fh, None)

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        with self._fds() as f:
            fd = os.open(_proc(f.inode(ino)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
