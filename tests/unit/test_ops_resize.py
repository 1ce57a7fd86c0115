"""Live resize over the management socket, seen by the model's virtio-blk driver."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvduse.backend.file import FileBackend
from pyvduse.backend.null import NullBackend
from pyvduse.daemon import Daemon
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.model.blk_driver import BlkIOError
from pyvduse.ops.client import request
from pyvduse.ops.service import OpsOptions
from pyvduse.runtime.state_file import StateFile
from tests.unit.test_ops_socket import served, short_dir

sock_dir = pytest.fixture(name="sock_dir")(short_dir)

MiB = 1 << 20


def image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def call(path: str, **req: object) -> dict[str, object]:
    return request(path, {"cmd": "resize", **req})


def code(reply: dict[str, object]) -> str:
    assert "error" in reply, reply
    return reply["error"]["code"]  # type: ignore[index,no-any-return]


def test_grow_file_updates_config_space_and_the_driver_sees_it(sock_dir: Path) -> None:
    img = image(sock_dir / "a.img", 4 * MiB)
    device = BlkDevice(FileBackend(str(img)))
    with served(sock_dir, device) as (_rig, drv, ops, _):
        assert drv is not None
        drv.write(4 * MiB - 512, b"e" * 512)
        with pytest.raises(BlkIOError):
            drv.write(4 * MiB, b"x" * 512)
        r = call(ops.control_path, size="6M")
        assert r == {"result": {"old_size": 4 * MiB, "size": 6 * MiB, "changed": True}}
        assert os.path.getsize(img) == 6 * MiB
        assert drv.capacity == 6 * MiB and drv.virtio.config_changes == 1
        drv.write(6 * MiB - 512, b"n" * 512)  # the new end is writable
        assert drv.read(4 * MiB - 512, 512) == b"e" * 512  # data intact
        r = call(ops.control_path, size=6 * MiB)  # the same size: nothing to do
        assert r["result"] == {"old_size": 6 * MiB, "size": 6 * MiB, "changed": False}
        assert drv.virtio.config_changes == 1
        status = request(ops.control_path, {"cmd": "status"})["result"]
        assert status["capacity"] == 6 * MiB
    device.backend.close()


def test_refusals(sock_dir: Path) -> None:
    img = image(sock_dir / "b.img", 4 * MiB)
    device = BlkDevice(FileBackend(str(img)), BlkOptions(block_size=4096))
    with served(sock_dir, device) as (_rig, drv, ops, _):
        assert drv is not None
        assert code(call(ops.control_path, size=5 * MiB + 512)) == "invalid-argument"
        r = call(ops.control_path, size="2M")
        assert code(r) == "invalid-argument" and "--shrink" in r["error"]["message"]  # type: ignore[index]
        assert code(call(ops.control_path, size=0)) == "invalid-argument"
        assert code(call(ops.control_path, size=True)) == "invalid-argument"
        assert code(call(ops.control_path, size=[1])) == "invalid-argument"
        assert code(call(ops.control_path, size="1G", shrink="yes")) == "invalid-argument"
        assert os.path.getsize(img) == 4 * MiB and drv.capacity == 4 * MiB
        assert drv.virtio.config_changes == 0
    device.backend.close()


def test_shrink_with_flag_truncates_after_lowering_capacity(sock_dir: Path) -> None:
    img = image(sock_dir / "c.img", 8 * MiB)
    device = BlkDevice(FileBackend(str(img)))
    with served(sock_dir, device) as (_rig, drv, ops, _):
        assert drv is not None
        drv.write(0, b"k" * 4096)
        r = call(ops.control_path, size="2M", shrink=True)
        assert r["result"] == {"old_size": 8 * MiB, "size": 2 * MiB, "changed": True}
        assert os.path.getsize(img) == 2 * MiB and drv.capacity == 2 * MiB
        with pytest.raises(BlkIOError):
            drv.read(2 * MiB, 512)
        assert drv.read(0, 4096) == b"k" * 4096
    device.backend.close()


def test_no_size_takes_the_grown_file(sock_dir: Path) -> None:
    img = image(sock_dir / "d.img", 4 * MiB)
    device = BlkDevice(FileBackend(str(img)))
    with served(sock_dir, device) as (_rig, drv, ops, _):
        assert drv is not None
        r = call(ops.control_path)
        assert r["result"]["changed"] is False  # type: ignore[index]
        os.truncate(img, 10 * MiB + 100)  # grown by someone else, not a block multiple
        r = call(ops.control_path)
        assert r["result"] == {"old_size": 4 * MiB, "size": 10 * MiB, "changed": True}
        assert drv.capacity == 10 * MiB
        os.truncate(img, 3 * MiB)  # shrunk by someone else: needs --shrink to follow
        assert code(call(ops.control_path)) == "invalid-argument"
        assert call(ops.control_path, shrink=True)["result"]["size"] == 3 * MiB  # type: ignore[index]
    device.backend.close()


def test_readonly_file_follows_its_size_but_is_not_resized(sock_dir: Path) -> None:
    img = image(sock_dir / "e.img", 4 * MiB)
    device = BlkDevice(FileBackend(str(img), readonly=True), BlkOptions(readonly=True))
    with served(sock_dir, device) as (_rig, drv, ops, _):
        assert drv is not None
        r = call(ops.control_path, size="8M")
        assert code(r) == "unsupported" and "read-only" in r["error"]["message"]  # type: ignore[index]
        os.truncate(img, 5 * MiB)
        assert call(ops.control_path)["result"]["size"] == 5 * MiB  # type: ignore[index]
        assert drv.capacity == 5 * MiB and os.path.getsize(img) == 5 * MiB
    device.backend.close()


def test_memory_refused_null_supported(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):  # memory backend
        r = call(ops.control_path, size="16M")
        assert code(r) == "unsupported"
        assert "fixed mapping" in r["error"]["message"]  # type: ignore[index]
    with served(sock_dir, BlkDevice(NullBackend(4 * MiB))) as (_rig, drv, ops, _):
        assert drv is not None
        assert call(ops.control_path, size="1G")["result"]["size"] == 1 << 30  # type: ignore[index]
        assert drv.capacity == 1 << 30
        assert drv.read((1 << 30) - 512, 512) == bytes(512)
        assert code(call(ops.control_path)) == "invalid-argument"  # nothing to re-read


def test_one_resize_at_a_time(sock_dir: Path) -> None:
    img = image(sock_dir / "f.img", 4 * MiB)
    device = BlkDevice(FileBackend(str(img)))
    with served(sock_dir, device) as (_rig, _drv, ops, _):
        with ops.target.resize_lock:
            assert code(call(ops.control_path, size="8M")) == "busy"
        assert "result" in call(ops.control_path, size="8M")
    device.backend.close()


def test_resize_keeps_the_crash_recovery_identity(sock_dir: Path) -> None:
    img = image(sock_dir / "g.img", 4 * MiB)
    device = BlkDevice(FileBackend(str(img)))
    control = str(sock_dir / "t0.sock")
    with Daemon(device, "t0", model=True, state_dir=sock_dir / "state", ops=OpsOptions(control=control)):
        assert "result" in call(control, size="8M")
        # a restart after a crash opens the grown file: its identity matches the state file
        again = BlkDevice(FileBackend(str(img)))
        reopened = StateFile.for_device("t0", sock_dir / "state", again.identity(), 1, 256)
        reopened.check_identity()
        assert reopened.stored_identity()["size"] == 8 * MiB  # type: ignore[index]
        reopened.close()
        again.backend.close()
    device.backend.close()
