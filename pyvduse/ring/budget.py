"""The work a queue does per wakeup: a budget of requests between two kicks of the driver.

A queue takes at most ``BUDGET_PER_SLOT`` requests per slot of its ring (four times the
queue size) between two kicks. Then it publishes, asks the driver to kick at its next
addition whatever is pending (``ask_for_kick``), and sleeps until the kick comes or a backoff ends: 1 ms,
doubling up to 1 s while no kick comes, back to 1 ms at a kick. A driver that keeps adding
work kicks at once when asked, so a busy queue pays one kick per budget; a ring that feeds
itself -- its used ring, or a buffer the device writes, on its avail ring through memory the
driver mapped at two addresses, where no check of the ring's layout can see it -- serves one
budget per backoff instead of keeping a CPU busy for good while the driver does nothing.

Sans-I/O: the worker tells it about takes, kicks and the clock. The native loop keeps the
same rule with the same numbers (splitblk.h, checked by a test).
"""

from __future__ import annotations

BUDGET_PER_SLOT = 4
BUDGET_SLEEP_MIN_NS = 1_000_000
BUDGET_SLEEP_MAX_NS = 1_000_000_000


def wakeup_budget(num: int) -> int:
    """Requests a queue of ``num`` entries takes between two kicks."""
    return BUDGET_PER_SLOT * num


class Budget:
    """One queue's credit between kicks, and the backoff while it is spent."""

    __slots__ = ("backoff_max_ns", "backoff_ns", "credit", "size", "sleeps", "wake_at")

    def __init__(self, num: int) -> None:
        self.size = wakeup_budget(num)
        self.credit = self.size
        self.backoff_ns = BUDGET_SLEEP_MIN_NS
        self.wake_at = 0  # while spent and asleep: when the credit comes back anyway
        self.sleeps = 0  # times it was spent
        self.backoff_max_ns = BUDGET_SLEEP_MIN_NS  # the longest the backoff grew (no kick came)

    def sleep(self, now: int) -> bool:
        """The credit is spent: start the backoff. True the first time for this sleep (the
        worker then asks the driver for a kick)."""
        if self.wake_at:
            return False
        self.wake_at = now + self.backoff_ns
        self.sleeps += 1
        return True

    def timeout_ms(self, now: int) -> int | None:
        """How long the worker may sleep (None: until something happens)."""
        if not self.wake_at:
            return None
        return max(0, -(-(self.wake_at - now) // 1_000_000))

    def kicked(self) -> None:
        """The driver kicked: the credit back, the backoff from the start."""
        self.credit = self.size
        self.wake_at = 0
        self.backoff_ns = BUDGET_SLEEP_MIN_NS

    def woke(self, now: int) -> None:
        """Woken without a kick: the credit back once the backoff has ended (which doubles)."""
        if self.wake_at and now >= self.wake_at:
            self.credit = self.size
            self.wake_at = 0
            self.backoff_ns = min(2 * self.backoff_ns, BUDGET_SLEEP_MAX_NS)
            self.backoff_max_ns = max(self.backoff_max_ns, self.backoff_ns)
