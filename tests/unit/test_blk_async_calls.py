"""A backend's call is awaited whenever it returns an awaitable, whatever its class shows.

``BlkDevice`` must never complete a request OK without the backend's work done: an
``async def write_zeroes`` or ``discard``, an async ``readv`` behind a decorator that hides
it (no ``functools.wraps``), on an inline or a blocking backend, and a device whose
``handle`` returns an awaitable that is not a coroutine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

import pytest

from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.base import DeviceSpec, VirtioDevice
from pyvduse.device.blk import BlkDevice
from pyvduse.device.request import Request
from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.ring.chain import Chain
from pyvduse.runtime.executors import Aio
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.testing.rig import ModelRig

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def rig(device: VirtioDevice, aio: Aio = Aio.THREADS) -> ModelRig:
    return ModelRig(device, tuning=QueueTuning(data_path=DataPath.PYTHON, aio=aio))


class AsyncZeroes(MemoryBackend):
    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await asyncio.sleep(0)
        MemoryBackend.write_zeroes(self, offset, length, unmap)

    async def discard(self, offset: int, length: int) -> None:
        await asyncio.sleep(0)
        MemoryBackend.write_zeroes(self, offset, length, True)


def hiding(fn: Callable[..., Any]) -> Callable[..., Any]:
    """An ordinary decorator: the wrapper is a plain function returning a coroutine."""

    def wrapper(*args: Any) -> Any:
        return fn(*args)

    return wrapper


class HiddenAsyncRead(MemoryBackend):
    @hiding
    async def readv(self, offset: int, bufs: list[memoryview]) -> None:
        await asyncio.sleep(0.001)
        MemoryBackend.readv(self, offset, bufs)


class BlockingHiddenAsyncRead(HiddenAsyncRead):
    blocking = True


def test_async_write_zeroes_and_discard_do_their_work() -> None:
    backend = AsyncZeroes(MiB)
    with rig(BlkDevice(backend)) as r:
        drv = BlkDriver(r.kernel)
        drv.write(0, b"A" * 4096)
        drv.write_zeroes(0, 1024)
        assert drv.read(0, 4096) == bytes(1024) + b"A" * 3072
        drv.discard(1024, 1024)
        assert drv.read(0, 4096) == bytes(2048) + b"A" * 2048


@pytest.mark.parametrize("cls", [HiddenAsyncRead, BlockingHiddenAsyncRead])
@pytest.mark.parametrize("aio", [Aio.THREADS, Aio.SYNC])
def test_an_async_read_behind_a_plain_decorator_returns_the_data(cls: type[MemoryBackend], aio: Aio) -> None:
    backend = cls(MiB)
    with rig(BlkDevice(backend), aio) as r:
        drv = BlkDriver(r.kernel)
        drv.write(0, b"A" * 512)
        drv.write(4096, b"Z" * 512)  # what a buffer the read reuses may still hold
        assert drv.read(0, 512) == b"A" * 512
        assert drv.read(4096, 512) == b"Z" * 512


class Ready:
    """An awaitable that is not a coroutine."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, int]:
        yield from asyncio.sleep(0).__await__()
        return self.value


class AwaitableHandle(VirtioDevice):
    """A device whose ``handle`` returns a non-coroutine awaitable (serving as a BlkDevice)."""

    def __init__(self, inner: BlkDevice) -> None:
        super().__init__()
        self.inner = inner

    def spec(self) -> DeviceSpec:
        return self.inner.spec()

    def start(self, features: int) -> None:
        super().start(features)
        self.inner.start(features)

    def write_failure(self, chain: Chain) -> int:
        return self.inner.write_failure(chain)

    def handle(self, queue: int, chain: Chain) -> int | Awaitable[int]:
        return Ready(self.inner.handle(queue, chain))


def test_handle_may_return_any_awaitable() -> None:
    with ModelRig(
        AwaitableHandle(BlkDevice(MemoryBackend(MiB))), tuning=QueueTuning(data_path=DataPath.PYTHON)
    ) as r:
        drv = BlkDriver(r.kernel)
        drv.write(0, b"B" * 512)
        assert drv.read(0, 512) == b"B" * 512


class Inline(BlkDevice):
    """A subclass serving through ``BlkDevice.handle``, which cannot wait."""

    def handle(self, queue: int, chain: Chain) -> int:
        return super().handle(queue, chain)


class Awaiting(BlkDevice):
    """A subclass over an async backend, as ``BlkDevice.handle`` says to write it."""

    def submit(self, request: Request) -> None:
        request.run(self.handle_async(request.queue, request.chain))


@pytest.mark.parametrize("backend", [AsyncZeroes, HiddenAsyncRead])
def test_a_subclass_awaiting_handle_async_serves_an_async_backend(backend: type[MemoryBackend]) -> None:
    with rig(Awaiting(backend(MiB))) as r:
        drv = BlkDriver(r.kernel)
        drv.write(0, b"C" * 1024)
        drv.write(4096, b"Z" * 512)
        drv.write_zeroes(0, 512)
        assert drv.read(0, 1024) == bytes(512) + b"C" * 512


@pytest.mark.parametrize("backend", [AsyncZeroes, HiddenAsyncRead])
def test_inline_handle_over_an_async_backend_fails_instead_of_faking_success(
    backend: type[MemoryBackend],
) -> None:
    with rig(Inline(backend(MiB))) as r:
        drv = BlkDriver(r.kernel)
        with pytest.raises(BlkIOError):
            drv.read(0, 512) if backend is HiddenAsyncRead else drv.write_zeroes(0, 512)
