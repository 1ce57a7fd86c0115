"""The IOTLB mapping cache against a stand-in for the VDUSE device fd.

``FakeIotlb`` answers VDUSE_IOTLB_GET_FD from a table of regions backed by memfds, as
VDUSE does for vhost-vdpa (the VMM's files and offsets). An UPDATE_IOTLB always names the
whole IOVA space, so the mapper must tell for itself which of its regions changed.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from pyvduse.abi import vduse as v
from pyvduse.transport.kernel.iotlb import IotlbMapper

PAGE = mmap.PAGESIZE


class FakeIotlb:
    """The device fd's IOTLB ioctl over ``table``: start -> (last, perm, fd, offset)."""

    def __init__(self) -> None:
        self.table: dict[int, tuple[int, int, int, int]] = {}
        self.files: list[int] = []

    def memfd(self, size: int, fill: bytes = b"") -> int:
        fd = os.memfd_create("fake-vmm", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        if fill:
            os.pwrite(fd, fill, 0)
        self.files.append(fd)
        return fd

    def iotlb_get_fd(self, start: int, last: int) -> tuple[v.IotlbEntry, int]:
        for s, (e, perm, fd, off) in sorted(self.table.items()):
            if s <= last and e >= start:
                return v.IotlbEntry(off, s, e, perm), os.dup(fd)
        raise OSError(errno.EINVAL, "no region")

    def close(self) -> None:
        for fd in self.files:
            os.close(fd)


@pytest.fixture
def fake() -> FakeIotlb:
    f = FakeIotlb()
    yield f
    f.close()


def test_regions_map_from_the_vmm_files_at_their_offsets(fake: FakeIotlb) -> None:
    fd = fake.memfd(4 * PAGE, b"\0" * PAGE + b"hello")
    fake.table[1 << 32] = ((1 << 32) + 2 * PAGE - 1, v.VDUSE_ACCESS_RW, fd, PAGE)
    m = IotlbMapper(fake)  # type: ignore[arg-type]
    assert bytes(m.regions.view(1 << 32, 5)) == b"hello"
    m.regions.view((1 << 32) + 5, 3, write=True)[:] = b"!!!"
    assert os.pread(fd, 8, PAGE) == b"hello!!!"
    m.close()


def test_only_changed_regions_are_stale(fake: FakeIotlb) -> None:
    a, b = fake.memfd(PAGE), fake.memfd(2 * PAGE)
    fake.table[0x10000] = (0x10000 + PAGE - 1, v.VDUSE_ACCESS_RW, a, 0)
    fake.table[0x20000] = (0x20000 + PAGE - 1, v.VDUSE_ACCESS_RW, b, 0)
    m = IotlbMapper(fake)  # type: ignore[arg-type]
    m.regions.view(0x10000, 1)
    m.regions.view(0x20000, 1)
    assert m.stale() == []  # nothing changed: nothing to drop
    fake.table[0x30000] = (0x30000 + PAGE - 1, v.VDUSE_ACCESS_RW, fake.memfd(PAGE), 0)
    assert m.stale() == []  # a region added elsewhere leaves ours alone
    del fake.table[0x20000]
    assert [r.start for r in m.stale()] == [0x20000]  # removed
    fake.table[0x20000] = (0x20000 + PAGE - 1, v.VDUSE_ACCESS_RW, b, 0)
    assert m.stale() == []  # back as it was
    fake.table[0x20000] = (0x20000 + PAGE - 1, v.VDUSE_ACCESS_RW, fake.memfd(PAGE), 0)
    assert [r.start for r in m.stale()] == [0x20000]  # another file at the same IOVA
    fake.table[0x20000] = (0x20000 + PAGE - 1, v.VDUSE_ACCESS_RO, b, 0)
    assert [r.start for r in m.stale()] == [0x20000]  # another permission
    fake.table[0x20000] = (0x20000 + PAGE - 1, v.VDUSE_ACCESS_RW, b, PAGE)
    assert [r.start for r in m.stale()] == [0x20000]  # another offset
    stale = m.stale()
    m.drop(stale)
    assert [r.start for r in m.regions.regions] == [0x10000]
    assert m.regions.view(0x20000, 1) is not None  # mapped afresh on the next access
    assert m.stale() == []
    m.close()


def test_a_region_that_shrank_is_stale(fake: FakeIotlb) -> None:
    a = fake.memfd(2 * PAGE)
    fake.table[0x10000] = (0x10000 + 2 * PAGE - 1, v.VDUSE_ACCESS_RW, a, 0)
    m = IotlbMapper(fake)  # type: ignore[arg-type]
    m.regions.view(0x10000, 1)
    fake.table[0x10000] = (0x10000 + PAGE - 1, v.VDUSE_ACCESS_RW, a, 0)
    assert [r.start for r in m.stale()] == [0x10000]
    assert m.stale(0x20000, 0x30000) == []  # outside the range asked about
    m.close()
