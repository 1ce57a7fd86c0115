"""The file backend's ways around what the driver's buffers cannot do.

``--cache none``: direct I/O straight into the driver's buffers when they allow it; through
aligned buffers of our own when they are not aligned, or cannot be pinned at all (VDUSE's
bounce pages give EFAULT); through the page cache when the request itself is not aligned.
Any cache mode: a file whose every transfer pins the buffer (a FUSE file in direct-I/O mode:
virtiofs with cache=none) fails with EFAULT too, and is then served through our buffers.
Every path must return the same bytes; the switch is made once per backend, shared with the
native engines, and logged once.
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


def test_efault_switches_to_our_buffers_for_good(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VDUSE's bounce pages cannot be pinned: direct I/O into them fails with EFAULT (seen
    in the test VM). Simulated here: transfers into the driver's views fault."""
    b = FileBackend(str(image), direct=True)
    faulting_transfer(monkeypatch, b)
    try:
        want = image.read_bytes()
        driver = aligned(4096)
        b.readv(0, [driver])
        assert bytes(driver) == want[:4096] and not b.pin_ok and b.bounced == 1
        b.readv(4096, [driver])  # no second attempt straight into driver memory
        assert bytes(driver) == want[4096:8192] and b.bounced == 2
    finally:
        b.close()


def test_without_o_direct_support_the_open_fails_with_einval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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

    from pyvduse.device.blk import BlkDevice, NativeBlk
    from pyvduse.fastpath import engine

    if not engine.available():
        pytest.skip("no native data path")
    for direct in (True, False):
        b = FileBackend(str(image), direct=direct)
        try:
            plan = engine.require_plan(BlkDevice(b))
            assert isinstance(plan, NativeBlk)
            fd = plan.storage.fd
            assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) is direct
        finally:
            b.close()


def faulting_transfer(monkeypatch: pytest.MonkeyPatch, b: FileBackend) -> list[int]:
    """Make every transfer of ``b`` fault (EFAULT) unless all its buffers are ``b``'s own
    (as the kernel does where it cannot pin the driver's); returns the faults, counted."""
    real = file_backend._transfer
    ours: set[int] = set()
    faults: list[int] = []
    get = b._buffers.get

    def tracked_get(size: int) -> mmap.mmap:
        buf = get(size)
        ours.add(id(buf))
        return buf

    def transfer(fd: int, bufs: list[memoryview], offset: int, write: bool) -> None:
        if not all(id(v.obj) in ours for v in bufs):
            faults.append(fd)
            raise OSError(errno.EFAULT, "Bad address")
        real(fd, bufs, offset, write)

    monkeypatch.setattr(b._buffers, "get", tracked_get)
    monkeypatch.setattr(file_backend, "_transfer", transfer)
    return faults


def test_efault_through_the_page_cache_switches_to_our_buffers_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--cache writeback on a FUSE file in direct-I/O mode: the buffered descriptor's reads
    and writes fault too; from the first EFAULT on, every request is copied, unaligned ones
    included, and the log says so once."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(MiB))
    b = FileBackend(str(path), direct=False)
    faults = faulting_transfer(monkeypatch, b)
    caplog.set_level("INFO", logger="pyvduse.backend.file")
    try:
        want = bytearray(path.read_bytes())
        raw = bytearray(5000)
        driver = [memoryview(raw)[1:1001], memoryview(raw)[1001:4001]]
        b.readv(7, driver)
        assert raw[1:4001] == want[7:4007] and not b.pin_ok and b.unpinnable == b"\1"
        data = os.urandom(3000)
        raw[1:3001] = data
        b.writev(12345, [memoryview(raw)[1:3001]])
        want[12345:15345] = data
        b.readv(0, [memoryview(raw)[:4096]])
        assert raw[:4096] == want[:4096]
        assert path.read_bytes() == want
        assert faults == [b.fd] and b.bounced == 3, "faulted more than once"
        said = [r for r in caplog.records if "cannot pin" in r.getMessage()]
        assert len(said) == 1 and str(path) in said[0].getMessage()
        assert "FUSE" in said[0].getMessage()
        assert b.native_storage() is not None
        assert b.native_storage().unpinnable is b.unpinnable  # type: ignore[union-attr]
    finally:
        b.close()


@pytest.mark.parametrize("aio", ["sync", "uring"])
def test_a_native_engines_efault_switches_the_whole_backend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, aio: str
) -> None:
    """An engine that meets the EFAULT (here through its test-only hook) sets the backend's
    shared byte and has the backend log it, once: the backend's own methods (requests the
    engine leaves to Python) then copy too, and so does every other engine."""
    from pyvduse.abi import virtio_blk as vb
    from pyvduse.device.blk import BlkDevice
    from pyvduse.fastpath import engine as native
    from pyvduse.fastpath.config import AioMode, EngineTuning, TestKnobs
    from pyvduse.model.arena import Arena
    from pyvduse.model.split_driver import DriverSplitRing
    from pyvduse.ring.split import SplitQueue

    if not native.available() or (aio == "uring" and not native.uring_built()):
        pytest.skip("no native data path (with io_uring)")
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(MiB))
    b = FileBackend(str(path), direct=False)
    dev = BlkDevice(b)
    arena = Arena(1 << 20)
    drv = DriverSplitRing(arena, 8)
    q = SplitQueue(arena.memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0)
    caplog.set_level("INFO", logger="pyvduse.backend.file")
    tuning = EngineTuning(AioMode.URING if aio == "uring" else AioMode.SYNC, nowait=False)
    engines = [
        native.build(
            native.require_plan(dev),
            0,
            q,
            arena.memory,
            None,
            None,
            lambda i: None,
            lambda *a: None,
            tuning=tuning,
            test=TestKnobs(efault=n),
        )
        for n in (1, 0)
    ]
    kick, stop = os.eventfd(0), os.eventfd(1)
    try:
        for k, eng in enumerate(engines):
            drv.add([vb.OUTHDR.pack(vb.ReqType.IN, 0, 8 * k)], [4096, 1])
            eng.set_position(*q.position()[:3])
            assert eng.run(kick, stop) == native.RUN_STOPPED
            assert eng.wait_idle(5 * 10**9) == 0
            (done,) = drv.collect()
            assert done.data == path.read_bytes()[4096 * k : 4096 * (k + 1)] + b"\0"
            q.set_position(*eng.position()[:3])
            c = eng.counters()
            assert (c["efaults"], c["bounce_all"], c["bounced"]) == (1 - k, 1, 1)
        assert not b.pin_ok
        said = [r for r in caplog.records if "cannot pin" in r.getMessage()]
        assert len(said) == 1
        buf = bytearray(4096)
        b.readv(0, [memoryview(buf)])  # the Python path copies now
        assert b.bounced == 1 and buf == path.read_bytes()[:4096]
    finally:
        for eng in engines:
            eng.close()
        os.close(kick)
        os.close(stop)
        b.close()
