"""The passthrough filesystem through the FUSE session, on a temporary host directory:
each operation shows up in the directory, and nothing reaches outside it."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvduse.abi import fuse
from pyvduse.fs import ROOT, Context
from pyvduse.fs.passthrough import Passthrough
from pyvduse.fs.session import FuseSession
from pyvduse.testing.fuse_client import Driver, FuseError

CTX = Context()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    (tmp_path / "secret").write_text("outside")
    return d


@pytest.fixture
def pt(shared: Path) -> Iterator[Passthrough]:
    fs = Passthrough(shared)
    yield fs
    fs.close()


@pytest.fixture
def drv(pt: Passthrough) -> Driver:
    d = Driver(FuseSession(pt))
    d.init()
    return d


def test_create_write_read_rename_unlink(drv: Driver, shared: Path) -> None:
    ino, fh = drv.create(ROOT, b"a.txt")
    assert drv.write(ino, fh, 0, b"hello world") == 11
    assert drv.write(ino, fh, 6, b"there") == 5
    assert drv.read(ino, fh, 0, 100) == b"hello there"
    drv.release(ino, fh)
    assert (shared / "a.txt").read_bytes() == b"hello there"
    d = drv.mkdir(ROOT, b"sub")
    assert (shared / "sub").is_dir()
    drv.rename(ROOT, b"a.txt", d, b"b.txt")
    assert (shared / "sub" / "b.txt").read_bytes() == b"hello there"
    assert drv.lookup(d, b"b.txt")[0] == ino  # the same inode under its new name
    assert sorted(n for n, _, _ in drv.readdir(d)) == [b".", b"..", b"b.txt"]
    drv.unlink(d, b"b.txt")
    assert not (shared / "sub" / "b.txt").exists()


def test_data_split_across_buffers(drv: Driver, shared: Path) -> None:
    ino, fh = drv.create(ROOT, b"split")
    payload = bytes(range(256)) * 64
    body = fuse.WRITE_IN.pack(fh, 0, len(payload), 0, 0, 0, 0) + payload
    error, data = drv.raw(fuse.Opcode.WRITE, ino, body, cuts=[40, 60, 80, 81, 5000])
    assert error == 0 and fuse.WRITE_OUT.unpack(data)[0] == len(payload)
    assert (shared / "split").read_bytes() == payload


def test_setattr_truncate_chmod_and_times(drv: Driver, shared: Path) -> None:
    ino, fh = drv.create(ROOT, b"f")
    drv.write(ino, fh, 0, b"x" * 100)
    valid = fuse.FATTR_SIZE | fuse.FATTR_MODE | fuse.FATTR_MTIME
    body = fuse.SETATTR_IN.pack(valid, 0, 0, 10, 0, 0, 1_000_000, 0, 0, 5, 0, 0o100600, 0, 0, 0, 0)
    attr = fuse.ATTR_OUT.unpack(drv.call(fuse.Opcode.SETATTR, ino, body))
    st = os.stat(shared / "f")
    assert st.st_size == 10 and stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 1_000_000_000_000_005
    assert attr[3 + 1] == 10  # attr.size


def test_lookup_counts_and_forget(drv: Driver, pt: Passthrough, shared: Path) -> None:
    (shared / "f").write_text("x")
    a = drv.lookup(ROOT, b"f")[0]
    assert drv.lookup(ROOT, b"f")[0] == a
    assert pt.inode_count() == 2
    drv.forget(a, 1)
    assert pt.inode_count() == 2
    drv.forget(a, 1)
    assert pt.inode_count() == 1
    with pytest.raises(FuseError) as e:
        drv.getattr(a)
    assert e.value.errno == errno.ESTALE


def test_symlink_link_readlink_statfs(drv: Driver, shared: Path) -> None:
    (shared / "t").write_text("target")
    data = drv.call(fuse.Opcode.SYMLINK, ROOT, b"ln\0t\0")
    ln = fuse.ENTRY_OUT.unpack(data)[0]
    assert os.readlink(shared / "ln") == "t"
    assert drv.call(fuse.Opcode.READLINK, ln) == b"t"
    t = drv.lookup(ROOT, b"t")[0]
    drv.call(fuse.Opcode.LINK, ROOT, fuse.LINK_IN.pack(t) + b"hard\0")
    assert os.stat(shared / "hard").st_ino == os.stat(shared / "t").st_ino
    kst = fuse.KSTATFS.unpack(drv.call(fuse.Opcode.STATFS, ROOT))
    assert kst[0] == os.statvfs(shared).f_blocks


# -- confinement --------------------------------------------------------------------------


def test_dotdot_is_refused(drv: Driver, pt: Passthrough) -> None:
    sub = drv.mkdir(ROOT, b"sub")
    with pytest.raises(FuseError):
        drv.lookup(sub, b"..")
    # Called directly (a filesystem API user, no session checks): openat2 refuses.
    for parent in (ROOT, sub):
        with pytest.raises(OSError) as e:
            pt.lookup(parent, b"..", CTX)
        assert e.value.errno == errno.EXDEV
    with pytest.raises(OSError):
        pt.lookup(ROOT, b"../secret", CTX)
    with pytest.raises(OSError):
        pt.create(ROOT, b"../evil", 0o644, os.O_WRONLY | os.O_CREAT, CTX)


def test_symlinks_out_lead_nowhere(drv: Driver, pt: Passthrough, shared: Path, tmp_path: Path) -> None:
    os.symlink("/", shared / "root")
    os.symlink("../secret", shared / "up")
    os.symlink(str(tmp_path), shared / "abs")
    for name in (b"root", b"up", b"abs"):
        ino = drv.lookup(ROOT, name)[0]
        attr = dict(zip(fuse.ATTR_OUT.fields, drv.getattr(ino), strict=True))
        assert stat.S_ISLNK(attr["attr.mode"])  # the link itself, not what it points at
        with pytest.raises(FuseError):
            drv.open(ino)  # never followed
        with pytest.raises(FuseError):
            drv.lookup(ino, b"secret")  # a symlink is no directory to look in
        with pytest.raises(FuseError):
            drv.create(ino, b"x")
        with pytest.raises(FuseError):
            drv.mkdir(ino, b"x")
    with pytest.raises(FuseError):  # O_CREAT through a symlink is refused, not followed
        drv.create(ROOT, b"up", flags=os.O_WRONLY | os.O_CREAT)
    assert (tmp_path / "secret").read_text() == "outside"
    assert not (tmp_path / "x").exists()


def test_directory_moved_out_by_the_host(drv: Driver, shared: Path, tmp_path: Path) -> None:
    """The host renames a directory the kernel holds out of the shared tree: names below it
    still resolve only below that directory, never through '..' to the host's tree."""
    sub = drv.mkdir(ROOT, b"sub")
    os.rename(shared / "sub", tmp_path / "moved")
    with pytest.raises(FuseError):
        drv.lookup(sub, b"..")
    with pytest.raises(FuseError):
        drv.lookup(sub, b"secret")


def test_no_device_nodes(drv: Driver) -> None:
    body = fuse.MKNOD_IN.pack(stat.S_IFBLK | 0o600, os.makedev(8, 0), 0, 0) + b"sda\0"
    error, _ = drv.raw(fuse.Opcode.MKNOD, ROOT, body)
    assert error == -errno.EPERM


def test_no_fd_is_left_behind(shared: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    fs = Passthrough(shared)
    d = Driver(FuseSession(fs))
    d.init()
    ino, fh = d.create(ROOT, b"f")
    d.write(ino, fh, 0, b"abc")
    d.read(ino, fh, 0, 3)
    d.release(ino, fh)
    d.readdir(ROOT)
    sub = d.mkdir(ROOT, b"sub")
    d.forget(sub, 1)
    d.forget(ino, 1)
    assert fs.inode_count() == 1
    fs.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_new_mount_drops_the_old_ones_inodes(drv: Driver, pt: Passthrough, shared: Path) -> None:
    (shared / "f").write_text("x")
    ino = drv.lookup(ROOT, b"f")[0]
    drv.create(ROOT, b"g")
    assert pt.inode_count() == 3
    drv.init()  # the driver was reset and mounts again
    assert pt.inode_count() == 1
    with pytest.raises(FuseError):
        drv.getattr(ino)
    assert drv.lookup(ROOT, b"f")[0] != 0
