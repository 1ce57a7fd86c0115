"""``--cache none``: the file backend's direct I/O and the ways it falls back.

Direct I/O straight into the driver's buffers when they allow it; through aligned buffers of
our own when they are not aligned, or cannot be pinned at all (VDUSE's bounce pages give
EFAULT); through the page cache when the request itself is not aligned. Every path must
return the same bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from pyvduse.backend import file as file_backend
from pyvduse.backend.file import FileBackend

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(MiB))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip("this filesystem cannot do O_DIRECT")
        raise
    return path


def aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n))


def test_aligned_buffers_go_straight_to_the_device(image: Path) -> None:
    b = FileBackend(str(image), direct=True)
    try:
        want = image.read_bytes()
        buf = aligned(8192)
        b.readv(4096, [buf])
        assert bytes(buf) == want[4096 : 4096 + 8192]
        data = os.urandom(4096)
        src = aligned(4096)
        src[:] = data
        b.writev(0, [src])
        assert image.read_bytes()[:4096] == data
        assert b.bounced == 0 and b.buffered == 0 and b.pin_ok
    finally:
        b.close()


def test_unaligned_buffers_are_copied_through_aligned_ones(image: Path) -> None:
    b = FileBackend(str(image), direct=True)
    try:
        want = image.read_bytes()
        raw = bytearray(4096 + 1024 + 1)
        parts = [memoryview(raw)[1 : 1 + 1536], memoryview(raw)[1537 : 1537 + 2560]]
        b.readv(8192, parts)
        assert bytes(parts[0]) + bytes(parts[1]) == want[8192 : 8192 + 4096]
        data = bytearray(os.urandom(4096 + 3))
        b.writev(4096, [memoryview(data)[3:]])
        assert image.read_bytes()[4096:8192] == bytes(data[3:])
        assert b.bounced == 2 and b.pin_ok
    finally:
        b.close()


def test_an_unaligned_request_goes_through_the_page_cache(image: Path) -> None:
    b = FileBackend(str(image), direct=True)
    try:
        want = image.read_bytes()
        buf = bytearray(100)
        b.readv(7, [memoryview(buf)])
        assert bytes(buf) == want[7:107]
        assert b.buffered == 1
    finally:
        b.close()


def test_efault_switches_to_our_buffers_for_good(image: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """VDUSE's bounce pages cannot be pinned: direct I/O into them fails with EFAULT (seen
    in the test VM). Simulated here: direct transfers into the driver's views fault."""
    real = file_backend._transfer
    ours: set[int] = set()

    def transfer(fd: int, bufs: list[memoryview], offset: int, write: bool) -> None:
        if fd == b.direct_fd and not all(id(v.obj) in ours for v in bufs):
            raise OSError(errno.EFAULT, "Bad address")
        real(fd, bufs, offset, write)

    b = FileBackend(str(image), direct=True)
    get = b._buffers.get

    def tracked_get(size: int) -> mmap.mmap:
        buf = get(size)
        ours.add(id(buf))
        return buf

    monkeypatch.setattr(b._buffers, "get", tracked_get)
    monkeypatch.setattr(file_backend, "_transfer", transfer)
    try:
        want = image.read_bytes()
        driver = aligned(4096)
        b.readv(0, [driver])
        assert bytes(driver) == want[:4096] and not b.pin_ok and b.bounced == 1
        b.readv(4096, [driver])  # no second attempt straight into driver memory
        assert bytes(driver) == want[4096:8192] and b.bounced == 2
    finally:
        b.close()


def test_without_o_direct_support_the_open_fails_with_einval(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(bytes(4096))
    real_open = os.open

    def fake_open(p: object, flags: int, *a: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(OSError) as info:
        FileBackend(str(path), direct=True)
    assert info.value.errno == errno.EINVAL


def test_the_native_engine_gets_the_o_direct_descriptor(image: Path) -> None:
    """--cache none on the native path: its reads and writes bypass the page cache (given the
    buffered descriptor, io_uring pushed every write to a kernel worker thread)."""
    import fcntl

    from pyvduse.device.blk import BlkDevice
    from pyvduse.fastpath import engine

    if not engine.available():
        pytest.skip("no native data path")
    for direct in (True, False):
        b = FileBackend(str(image), direct=direct)
        try:
            fd = engine.require_plan(BlkDevice(b)).storage.fd
            assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) is direct
        finally:
            b.close()
