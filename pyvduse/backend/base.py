"""The storage interface a block device serves from, kept small on purpose.

Offsets and lengths are in bytes. Buffers are memoryviews straight into driver memory, so a
backend that can (``preadv``/``pwritev``) moves data with no extra copy. Errors are raised as
``OSError``; the device turns them into VIRTIO_BLK_S_IOERR for that request only.

A backend whose calls may wait (a disk, a network server) says so with ``blocking = True``:
the runtime then makes them on its thread pool (``--aio threads``), many at once, and never
on the queue's own thread. A backend may also write its methods as ``async def``: they then
run on the runtime's event loop, as many at once as the driver sends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Backend(ABC):
    """Byte-addressed storage of a fixed ``size``."""

    #: A short name for status output ("file", "memory", "null").
    kind: str = "?"
    #: Its calls may block (I/O on a device or the network): make them off the queue thread.
    blocking: bool = False

    @property
    @abstractmethod
    def size(self) -> int:
        """Capacity in bytes."""

    @property
    def description(self) -> str:
        return self.kind

    @abstractmethod
    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` in order with the bytes at ``offset``."""

    @abstractmethod
    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        """Store the concatenation of ``bufs`` at ``offset``."""

    def flush(self) -> None:
        """Make completed writes durable."""

    def discard(self, offset: int, length: int) -> None:
        """Forget a range; later reads may return anything (we return zeroes)."""
        self.write_zeroes(offset, length, True)

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeroes; ``unmap`` allows freeing the space."""

    def close(self) -> None:
        """Release what the backend holds."""
