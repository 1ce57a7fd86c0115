"""A device's counters per queue, with those a native engine keeps while it serves one.

The Python engine counts a queue's outcomes into the device's own object for that queue
(written by that queue's worker only). A native engine counts in C: while it serves the
queue its counters are read through ``attach_engine``'s source, and when it stops they are
added to the device's own (``retire_engine``), so ``ctl stats`` and the metrics show one sum
whichever engine served, and across engines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, Self, TypeVar


class Counts(Protocol):
    """Counters that add up (``BlkStats``, ``NetStats``)."""

    def add(self, other: Self) -> None: ...


S = TypeVar("S", bound=Counts)


class PerQueueStats(Generic[S]):
    """``own[q]``: queue q's counters as Python counts them; ``make()`` a zeroed one."""

    def __init__(self, own: list[S], make: Callable[[], S]) -> None:
        self.own = own
        self._make = make
        self._engines: dict[int, Callable[[], S]] = {}

    def attach_engine(self, queue: int, source: Callable[[], S]) -> None:
        """An engine serves ``queue`` now; ``source()`` reads its counters."""
        self._engines[queue] = source

    def retire_engine(self, queue: int, final: S) -> None:
        """The engine of ``queue`` stopped with these counters: keep them."""
        self.own[queue].add(final)
        self._engines.pop(queue, None)

    def snapshot(self, queue: int) -> S:
        """Queue ``queue``'s counters, an engine serving it included."""
        out = self._make()
        out.add(self.own[queue])
        source = self._engines.get(queue)
        if source is not None:
            out.add(source())
        return out

    def total(self) -> S:
        """Every queue's counters added up."""
        out = self._make()
        for q in range(len(self.own)):
            out.add(self.snapshot(q))
        return out
