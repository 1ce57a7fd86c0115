"""What a failing request leaves in the log: rate-limited per device, a traceback the first
time a bug is hit (in a backend or in a device's ``handle``), and the request named by its
type and sector rather than by a descriptor index."""

from __future__ import annotations

import logging

import pytest

from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.ring.chain import Chain
from pyvduse.runtime.tuning import DataPath
from pyvduse.testing.rig import ModelRig

MiB = 1 << 20


class BuggyBackend(MemoryBackend):
    """Every read raises something that is not an OSError: a bug."""

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        raise ValueError("bug in readv")


class BuggyDevice(BlkDevice):
    def handle(self, queue: int, chain: Chain) -> int:
        raise KeyError("bug in handle")


def rig(device: BlkDevice) -> ModelRig:
    return ModelRig(device, data_path=DataPath.PYTHON)


def failing_reads(r: ModelRig, n: int, sector: int = 5) -> None:
    drv = BlkDriver(r.kernel)
    for _ in range(n):
        with pytest.raises(BlkIOError):
            drv.read(sector * 512, 512)


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_a_backend_bug_is_rate_limited_with_one_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyvduse")
    with rig(BlkDevice(BuggyBackend(MiB))) as r:
        failing_reads(r, 60)
    logged = records(caplog, "bug in readv")
    assert 1 <= len(logged) <= 12, len(logged)
    assert sum(r.exc_info is not None for r in logged) == 1
    assert "read at sector 5" in logged[0].getMessage()


def test_a_handle_bug_logs_its_traceback_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with rig(BuggyDevice(MemoryBackend(MiB))) as r:
        failing_reads(r, 40, sector=7)
    logged = records(caplog, "bug in handle")
    assert 1 <= len(logged) <= 12, len(logged)
    traced = [r for r in logged if r.exc_info is not None]
    assert len(traced) == 1
    assert "KeyError" in logging.Formatter().formatException(traced[0].exc_info)  # type: ignore[arg-type]
    message = logged[0].getMessage()
    assert "read at sector 7" in message and "request 2" not in message


def test_the_limit_is_per_device(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyvduse")
    with rig(BlkDevice(BuggyBackend(MiB))) as noisy:
        failing_reads(noisy, 40, sector=1)
    caplog.clear()
    with rig(BlkDevice(BuggyBackend(MiB))) as quiet:
        failing_reads(quiet, 1, sector=3)
    assert records(caplog, "read at sector 3"), "a second device's first failure was not logged"
