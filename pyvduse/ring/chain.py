"""A descriptor chain taken from a virtqueue: the request's buffers, already validated."""

from __future__ import annotations

from pyvduse.ring.iovec import gather, scatter, slice_segments, total


class Chain:
    """One request: its id and the device-readable then device-writable buffers.

    ``error`` is set when the chain was malformed; the device must still complete ``head``
    (with whatever it can safely write) so that the driver is not left waiting.
    """

    __slots__ = ("error", "head", "ndesc", "readable", "writable")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        error: str | None = None,
        ndesc: int = 1,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.error = error
        self.ndesc = ndesc  # ring slots the chain occupied (packed rings advance by this)

    @property
    def readable_size(self) -> int:
        """Bytes the driver gave to be read."""
        return total(self.readable)

    @property
    def writable_size(self) -> int:
        """Bytes the driver gave to be written (the most a completion can report)."""
        return total(self.writable)

    def read(self, start: int = 0, length: int | None = None) -> bytes:
        """A copy of the readable bytes from ``start`` (``length`` of them, or to the end;
        fewer if the buffers end first). Driver memory may change under a device: read a
        header once and use the copy."""
        end = self.readable_size if length is None else start + length
        return gather(self.readable, start, max(min(end, self.readable_size) - start, 0))

    def write(self, data: bytes | memoryview, start: int = 0) -> int:
        """Copy ``data`` into the writable buffers from ``start``; returns how many bytes
        fitted (the buffers may be shorter)."""
        return scatter(slice_segments(self.writable, start, start + len(data)), data)

    def __repr__(self) -> str:
        r = sum(len(s) for s in self.readable)
        w = sum(len(s) for s in self.writable)
        err = f" error={self.error!r}" if self.error else ""
        return f"<Chain head={self.head} readable={r} writable={w}{err}>"
