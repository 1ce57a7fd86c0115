"""The FUSE session over the API: INIT, the guide's hello filesystem, async methods, errors."""

from __future__ import annotations

import errno
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from hello_fs import HELLO, TEXT, Hello

from pyvduse.abi import fuse
from pyvduse.device.fs import FsConfigError, FsDevice
from pyvduse.fs import ROOT, Attr, Context, Entry, Filesystem
from pyvduse.fs.session import MAX_WRITE, FuseSession
from pyvduse.testing.fuse_client import Driver, FuseError


def test_init_negotiates_our_minor_and_flags() -> None:
    d = Driver(FuseSession(Hello()))
    out = dict(zip(fuse.INIT_OUT.fields, d.init(), strict=True))
    assert (out["major"], out["minor"]) == (7, 38)
    assert out["max_write"] == MAX_WRITE and out["max_readahead"] == 65536
    assert out["flags"] == fuse.ASYNC_READ | fuse.BIG_WRITES  # only what both offered


def test_requests_before_init_fail() -> None:
    d = Driver(FuseSession(Hello()))
    with pytest.raises(FuseError) as e:
        d.getattr(ROOT)
    assert e.value.errno == errno.EIO


def test_hello_filesystem() -> None:
    d = Driver(FuseSession(Hello()))
    d.init()
    entry = d.lookup(ROOT, b"hello")
    assert entry[0] == HELLO
    attr = dict(zip(fuse.ATTR_OUT.fields, d.getattr(HELLO), strict=True))
    assert attr["attr.size"] == len(TEXT) and stat.S_ISREG(attr["attr.mode"])
    fh = d.open(HELLO)
    assert d.read(HELLO, fh, 0, 4096) == TEXT
    assert d.read(HELLO, fh, 6, 4) == TEXT[6:10]
    assert [name for name, _, _ in d.readdir(ROOT)] == [b".", b"hello"]
    with pytest.raises(FuseError) as e:
        d.lookup(ROOT, b"nothing")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FuseError) as e:  # not implemented: ENOSYS
        d.mkdir(ROOT, b"dir")
    assert e.value.errno == errno.ENOSYS


def test_readdir_stops_where_the_buffer_ends() -> None:
    d = Driver(FuseSession(Hello()))
    d.init()
    # 40 bytes hold one dirent ("." is 32): the listing goes on from its offset.
    assert [name for name, _, _ in d.readdir(ROOT, size=40)] == [b".", b"hello"]


class AsyncFs(Filesystem):
    async def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        if name == b"boom":
            raise RuntimeError("a bug")
        if name == b"gone":
            raise OSError(errno.ENOENT, "gone")
        return Entry(Attr(5, stat.S_IFREG | 0o644))


def test_async_methods_and_exceptions() -> None:
    d = Driver(FuseSession(AsyncFs()))
    d.init()
    assert d.lookup(ROOT, b"x")[0] == 5
    for name, code in ((b"gone", errno.ENOENT), (b"boom", errno.EIO)):
        with pytest.raises(FuseError) as e:
            d.lookup(ROOT, name)
        assert e.value.errno == code


def test_readonly_refuses_changes() -> None:
    d = Driver(FuseSession(Hello(), readonly=True))
    d.init()
    for call in (lambda: d.mkdir(ROOT, b"x"), lambda: d.unlink(ROOT, b"hello"), lambda: d.open(HELLO, 1)):
        with pytest.raises(FuseError) as e:
            call()
        assert e.value.errno == errno.EROFS


def test_bad_names_are_einval() -> None:
    d = Driver(FuseSession(Hello()))
    d.init()
    for name in (b"..", b".", b"a/b", b""):
        with pytest.raises(FuseError) as e:
            d.lookup(ROOT, name)
        assert e.value.errno == errno.EINVAL, name
    error, _ = d.raw(fuse.Opcode.LOOKUP, ROOT, b"no-nul")
    assert error == -errno.EINVAL


def test_fs_device_spec() -> None:
    dev = FsDevice(Hello(), "myfs", request_queues=2, queue_size=64)
    spec = dev.spec()
    assert spec.device_id == 26 and spec.num_queues == 3 and spec.queue_size == 64
    assert spec.config == fuse.fs_config("myfs", 2)
    for bad in ({"tag": "x" * 37}, {"tag": "t", "request_queues": 0}, {"tag": "t", "queue_size": 100}):
        with pytest.raises(FsConfigError):
            FsDevice(Hello(), **bad)
