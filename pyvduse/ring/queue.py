"""What the runtime needs of a virtqueue, whatever its layout (split, packed, logged)."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from pyvduse.ring.chain import Chain


class VirtQueue(Protocol):
    """The device side of one virtqueue."""

    num: int

    @property
    def last_avail_idx(self) -> int: ...

    @property
    def used_idx(self) -> int: ...

    @property
    def broken(self) -> str | None: ...

    def pending(self) -> int: ...
    def in_flight_count(self) -> int: ...
    def remap(self) -> None: ...
    def pop(self) -> Chain | None: ...
    def push(self, head: int, written: int, ndesc: int = 1) -> None: ...
    def publish(self) -> bool: ...
    def disable_kicks(self) -> None: ...
    def enable_kicks(self) -> bool: ...
    def ask_for_kick(self) -> None: ...


Q = TypeVar("Q", bound=VirtQueue)


class WrappedQueue(Generic[Q]):
    """A queue that adds work (an in-flight log) to some steps of another: the steps a
    subclass does not override go straight to the wrapped ``queue``."""

    def __init__(self, queue: Q) -> None:
        self.queue = queue
        self.num = queue.num
        self.resubmit: list[Chain] = []  # chains to repeat, after a recovery

    @property
    def last_avail_idx(self) -> int:
        return self.queue.last_avail_idx

    @property
    def used_idx(self) -> int:
        return self.queue.used_idx

    @property
    def broken(self) -> str | None:
        return self.queue.broken

    def pending(self) -> int:
        return self.queue.pending()

    def in_flight_count(self) -> int:
        return self.queue.in_flight_count()

    def remap(self) -> None:
        self.queue.remap()

    def pop(self) -> Chain | None:
        return self.queue.pop()

    def push(self, head: int, written: int, ndesc: int = 1) -> None:
        self.queue.push(head, written, ndesc)

    def publish(self) -> bool:
        return self.queue.publish()

    def disable_kicks(self) -> None:
        self.queue.disable_kicks()

    def enable_kicks(self) -> bool:
        return self.queue.enable_kicks()

    def ask_for_kick(self) -> None:
        self.queue.ask_for_kick()
