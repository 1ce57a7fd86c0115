"""A descriptor chain taken from a virtqueue: the request's buffers, already validated."""

from __future__ import annotations


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

    def __repr__(self) -> str:
        r = sum(len(s) for s in self.readable)
        w = sum(len(s) for s in self.writable)
        err = f" error={self.error!r}" if self.error else ""
        return f"<Chain head={self.head} readable={r} writable={w}{err}>"
