"""A backend that stores nothing and reads zeroes: for benchmarks and tests."""

from __future__ import annotations

from collections.abc import Awaitable

from pyvduse.backend.base import Backend, NativeStorage
from pyvduse.errors import ResizeError
from pyvduse.ring.iovec import fill_zero


class NullBackend(Backend):
    """Writes vanish, reads return zeroes (like QEMU's null-co with read-zeroes=on)."""

    kind = "null"

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def readv(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        fill_zero(bufs)
        return None

    def writev(self, offset: int, bufs: list[memoryview]) -> Awaitable[None] | None:
        return None

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> Awaitable[None] | None:
        return None

    def storage_size(self) -> int:
        raise ResizeError(
            "invalid", "a null device has no storage whose size could have changed: give the new size"
        )

    def size_settable(self) -> str | None:
        return None

    def set_storage_size(self, size: int, *, grow_only: bool) -> None:
        self._size = max(size, self._size) if grow_only else size

    def native_storage(self) -> NativeStorage | None:
        return NativeStorage("null") if self.io_as_in(NullBackend) else None
