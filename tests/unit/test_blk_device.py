"""virtio-blk request handling over the ring engine, with RAM and file backends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvduse.backend.file import FileBackend
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkConfigError, BlkDevice, BlkOptions
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.split import SplitQueue

T = vb.ReqType
S = vb.ReqStatus
MiB = 1 << 20


class Rig:
    """A blk device fed through a real split ring."""

    def __init__(self, dev: BlkDevice) -> None:
        self.dev = dev
        self.arena = Arena(4 * MiB)
        self.drv = DriverSplitRing(self.arena, 64)
        self.q = SplitQueue(
            self.arena.memory,
            64,
            self.drv.desc_addr,
            self.drv.avail_addr,
            self.drv.used_addr,
            bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC),
        )

    def request(
        self,
        rtype: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        split: int = 1,
        indirect: bool = False,
    ) -> tuple[int, bytes, int]:
        """Returns (status, data read, used length)."""
        hdr = vb.OUTHDR.pack(rtype, 0, sector)
        readable = [hdr] + ([out] if out else [])
        chunk = -(-in_len // split) if in_len else 0
        writable = [min(chunk, in_len - i) for i in range(0, in_len, chunk)] if in_len else []
        self.drv.add(readable, [*writable, 1], indirect=indirect)
        chain = self.q.pop()
        assert chain is not None
        self.q.push(chain.head, self.dev.handle(0, chain))
        self.q.publish()
        (c,) = self.drv.collect()
        data = self.drv.read_writable(c)
        return data[-1], data[:-1], c.length


@pytest.fixture
def rig() -> Rig:
    return Rig(BlkDevice(MemoryBackend(8 * MiB), BlkOptions(serial="pyvduse-serial-01")))


@pytest.mark.parametrize("split,indirect", [(1, False), (3, False), (4, True)])
def test_write_then_read(rig: Rig, split: int, indirect: bool) -> None:
    data = os.urandom(16384)
    assert rig.request(T.OUT, 8, out=data, indirect=indirect)[0] == S.OK
    status, got, used = rig.request(T.IN, 8, in_len=16384, split=split, indirect=indirect)
    assert status == S.OK and got == data and used == 16385


def test_header_and_data_in_one_buffer(rig: Rig) -> None:
    data = os.urandom(512)
    hdr = vb.OUTHDR.pack(T.OUT, 0, 1)
    rig.drv.add([hdr + data], [1])
    chain = rig.q.pop()
    assert chain is not None
    rig.q.push(chain.head, rig.dev.handle(0, chain))
    rig.q.publish()
    rig.drv.collect()
    assert rig.request(T.IN, 1, in_len=512)[1] == data


def test_out_of_range_is_ioerr(rig: Rig) -> None:
    last = 8 * MiB // 512
    assert rig.request(T.IN, last - 1, in_len=512)[0] == S.OK
    assert rig.request(T.IN, last - 1, in_len=1024)[0] == S.IOERR
    assert rig.request(T.OUT, last, out=bytes(512))[0] == S.IOERR
    assert rig.request(T.IN, 1 << 60, in_len=512)[0] == S.IOERR


def test_unknown_type_is_unsupp(rig: Rig) -> None:
    assert rig.request(99, in_len=0)[0] == S.UNSUPP
    assert rig.request(T.SCSI_CMD)[0] == S.UNSUPP


def test_get_id(rig: Rig) -> None:
    status, got, used = rig.request(T.GET_ID, in_len=20)
    assert status == S.OK and got == b"pyvduse-serial-01\0\0\0" and used == 21
    status, got, _ = rig.request(T.GET_ID, in_len=4)  # short buffer: truncated, no overflow
    assert got == b"pyvd"


def test_flush(rig: Rig) -> None:
    assert rig.request(T.FLUSH)[0] == S.OK


def _segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(vb.DISCARD_SEGMENT.pack(*s) for s in segs)


def test_discard_and_write_zeroes(rig: Rig) -> None:
    rig.request(T.OUT, 0, out=b"\xff" * 8192)
    assert rig.request(T.DISCARD, out=_segments((0, 8, 0)))[0] == S.OK
    assert rig.request(T.IN, 0, in_len=4096)[1] == bytes(4096)
    assert rig.request(T.WRITE_ZEROES, out=_segments((8, 8, 0)))[0] == S.OK
    assert rig.request(T.IN, 0, in_len=8192)[1] == bytes(8192)


def test_discard_validation(rig: Rig) -> None:
    assert rig.request(T.DISCARD, out=b"\0" * 15)[0] == S.IOERR  # not whole segments
    assert rig.request(T.DISCARD, out=_segments((1 << 40, 8, 0)))[0] == S.IOERR
    assert rig.request(T.DISCARD, out=_segments((0, 8, 1)))[0] == S.UNSUPP
    assert rig.request(T.WRITE_ZEROES, out=_segments((0, 8, 2)))[0] == S.UNSUPP
    too_many = _segments(*[(i * 8, 8, 0) for i in range(33)])
    assert rig.request(T.DISCARD, out=too_many)[0] == S.IOERR


def test_readonly_refuses_writes() -> None:
    rig = Rig(BlkDevice(MemoryBackend(MiB), BlkOptions(readonly=True)))
    assert rig.request(T.OUT, 0, out=bytes(512))[0] == S.IOERR
    assert rig.request(T.WRITE_ZEROES, out=_segments((0, 8, 0)))[0] == S.IOERR
    assert rig.request(T.IN, 0, in_len=512)[0] == S.OK
    assert rig.dev.offered_features() & bit(vb.F_RO)
    assert not rig.dev.offered_features() & bit(vb.F_DISCARD)


def test_request_without_status_byte_completes_with_zero(rig: Rig) -> None:
    rig.drv.add([vb.OUTHDR.pack(T.IN, 0, 0)], [])
    chain = rig.q.pop()
    assert chain is not None
    assert rig.dev.handle(0, chain) == 0
    assert rig.dev.stats.bad_chains == 1


def test_backend_error_is_ioerr(rig: Rig) -> None:
    def boom(offset: int, bufs: list[memoryview]) -> None:
        raise OSError(5, "Input/output error")

    rig.dev.backend.readv = boom  # type: ignore[method-assign]
    assert rig.request(T.IN, 0, in_len=512)[0] == S.IOERR


def test_null_backend_reads_zeroes() -> None:
    rig = Rig(BlkDevice(NullBackend(MiB)))
    rig.request(T.OUT, 0, out=b"\1" * 512)
    assert rig.request(T.IN, 0, in_len=512)[1] == bytes(512)


def test_config_space() -> None:
    dev = BlkDevice(MemoryBackend(MiB), BlkOptions(block_size=4096, num_queues=2, queue_size=128))
    cfg = vb.BlkConfig.unpack(dev.spec().config)
    assert cfg.capacity == MiB // 512
    assert cfg.blk_size == 4096 and cfg.num_queues == 2 and cfg.seg_max == 126
    f = dev.spec().features
    assert f & bit(vb.F_MQ) and f & bit(vb.F_BLK_SIZE) and not f & bit(vb.F_CONFIG_WCE)


@pytest.mark.parametrize(
    "size,opts",
    [
        (1000, BlkOptions()),
        (MiB + 512, BlkOptions(block_size=4096)),
        (MiB, BlkOptions(queue_size=100)),
        (MiB, BlkOptions(num_queues=0)),
        (MiB, BlkOptions(serial="x" * 21)),
    ],
)
def test_bad_options(size: int, opts: BlkOptions) -> None:
    with pytest.raises(BlkConfigError):
        BlkDevice(NullBackend(size), opts)


def test_file_backend_zero_copy_and_holes(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 4 * MiB)
    be = FileBackend(str(img))
    rig = Rig(BlkDevice(be))
    data = os.urandom(MiB)
    assert rig.request(T.OUT, 0, out=data)[0] == S.OK
    assert rig.request(T.FLUSH)[0] == S.OK
    assert img.read_bytes()[:MiB] == data
    blocks_before = os.stat(img).st_blocks
    assert rig.request(T.DISCARD, out=_segments((0, MiB // 512, 0)))[0] == S.OK
    assert os.stat(img).st_blocks < blocks_before  # a hole was punched
    assert img.read_bytes()[:MiB] == bytes(MiB)
    rig.request(T.OUT, 0, out=data)
    assert rig.request(T.WRITE_ZEROES, out=_segments((0, 16, 0)))[0] == S.OK
    assert img.read_bytes()[: 16 * 512] == bytes(16 * 512)
    assert img.read_bytes()[16 * 512 : MiB] == data[16 * 512 :]
    be.close()


def test_file_backend_readonly_opens_read_only(tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x07" * 4096)
    img.chmod(0o444)
    be = FileBackend(str(img), readonly=True)
    buf = bytearray(4096)
    be.readv(0, [memoryview(buf)])
    assert buf == b"\x07" * 4096
    be.close()
