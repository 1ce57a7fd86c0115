"""The 'writing a device' example, tested on the model as the guide shows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from flaky_blk import FlakyBlk

from pyvduse.abi import virtio_blk as vb
from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.testing.rig import ModelRig


def test_every_third_write_fails() -> None:
    device = FlakyBlk(1 << 20, every=3)
    with ModelRig(device) as rig:
        disk = BlkDriver(rig.kernel)
        disk.write(0, b"a" * 512)
        disk.write(512, b"b" * 512)
        with pytest.raises(BlkIOError):
            disk.write(1024, b"c" * 512)  # the third write fails...
        assert disk.read(1024, 512) == bytes(512)  # ...and stored nothing
        assert disk.read(0, 1024) == b"a" * 512 + b"b" * 512
        assert device.failed == 1


def test_a_request_the_example_cannot_parse_fails_alone() -> None:
    """A header shorter than 16 bytes makes the example's struct.unpack raise: that request
    fails (IOERR in its status byte), the queue serves on."""
    device = FlakyBlk(1 << 20, every=3)
    with ModelRig(device) as rig:
        disk = BlkDriver(rig.kernel)
        q = disk.virtio.queues[0]
        c = q.wait(q.submit([b"\x01\x00\x00\x00"], [1]), 5)  # a 4-byte "header"
        assert c.data == bytes([vb.ReqStatus.IOERR]) and c.length == 1
        disk.write(0, b"a" * 512)
        assert disk.read(0, 512) == b"a" * 512
        assert all(w.broken is None for w in rig.server.workers.values())
