"""Where VDUSE runs each queue's interrupt callback: the per-queue ``irq_cb_affinity`` mask.

VDUSE does not raise a hardware interrupt: ``VDUSE_VQ_INJECT_IRQ`` queues a work item that
calls the driver's callback, on a CPU taken from the queue's ``vq<N>/irq_cb_affinity`` mask,
and it moves to the next CPU of the mask on every injection. virtio_vdpa spreads the CPUs
over the queues when the driver probes, so a single queue gets every CPU and its completions
hop from CPU to CPU, each hop waking another CPU and sending the request's completion back
across (under emulation, that cost a quarter to over half of our IOPS and 1.7 times the latency at
iodepth 1). A hardware interrupt with such an affinity is delivered to one CPU of it, so
``first`` does the same: each queue keeps the first CPU of the mask the driver gave it.
``follow`` (the default) starts the same way, then the native data path moves each queue's
interrupts to the CPU of that mask its worker runs on whenever the scheduler moves the
worker, so the completion work lands where the device's own work does rather than on the
application's CPU.

Plain objects and text in, text out; the sysfs reads and writes are the transport's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

FIRST = "first"  # each queue: the first CPU of the driver's mask
DRIVER = "driver"  # leave the driver's mask alone: the kernel rotates over it
FOLLOW = "follow"  # FIRST, then wherever the queue's native worker runs (the default)


def parse_cpu_list(text: str) -> list[int]:
    """``"0,2-3"`` (the format of taskset -c and /sys/devices/system/cpu/online) -> CPUs in
    the order given, without repeats; ValueError saying what is wrong."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if sep else first
        except ValueError:
            raise ValueError(f"'{part}' is not a CPU number or range like 2-3") from None
        if first < 0 or last < first:
            raise ValueError(f"'{part}' is not a CPU range (from low to high, from 0)")
        cpus.extend(c for c in range(first, last + 1) if c not in cpus)
    return cpus


def format_cpumask(cpus: Iterable[int]) -> str:
    """CPUs -> the kernel's hex cpumask text: 32-bit groups, most significant first, comma
    separated (what cpumask_parse takes and the attribute shows)."""
    bits = 0
    for c in cpus:
        bits |= 1 << c
    if not bits:
        raise ValueError("a cpumask needs at least one CPU")
    groups = []
    while bits:
        groups.append(f"{bits & 0xFFFFFFFF:08x}")
        bits >>= 32
    return ",".join(reversed(groups)).lstrip("0") or "0"


def parse_cpumask(text: str) -> list[int]:
    """The attribute's text (``"3"``, ``"00000000,00000003"``) -> sorted CPUs."""
    bits = int(text.strip().replace(",", "") or "0", 16)
    return [i for i in range(bits.bit_length()) if bits >> i & 1]


@dataclasses.dataclass(frozen=True)
class IrqPlacement:
    """Which CPUs each queue's interrupt callback may run on: ``FOLLOW``, ``FIRST``,
    ``DRIVER`` or an explicit list (queue i gets ``cpus[i % len(cpus)]``)."""

    mode: str = FOLLOW
    cpus: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str, online: Sequence[int]) -> IrqPlacement:
        """``--irq-cpus`` text -> a placement; ValueError naming the bad CPU or word."""
        if text in (FIRST, DRIVER, FOLLOW):
            return cls(text)
        try:
            cpus = parse_cpu_list(text)
        except ValueError as e:
            raise ValueError(
                f"{e}; give '{FIRST}', '{FOLLOW}', '{DRIVER}' or a CPU list like 0,2-3"
            ) from None
        offline = [c for c in cpus if c not in online]
        if offline:
            raise ValueError(f"CPU {offline[0]} is not online (online: {format_cpu_list(online)})")
        return cls("cpus", tuple(cpus))

    @property
    def explicit(self) -> bool:
        return self.mode == "cpus"

    def choose(self, index: int, driver_mask: Sequence[int]) -> list[int] | None:
        """The mask queue ``index`` should have, given the one it has; None: leave it."""
        if self.mode == DRIVER:
            return None
        if self.mode in (FIRST, FOLLOW):
            return [min(driver_mask)] if len(driver_mask) > 1 else None
        return [self.cpus[index % len(self.cpus)]]

    def __str__(self) -> str:
        return format_cpu_list(self.cpus) if self.explicit else self.mode


def drivers_mask(current: list[int], known: list[int] | None) -> list[int]:
    """The CPUs the driver gave a queue, from the mask the kernel shows now and the one
    known from before (an earlier DRIVER_OK, or a daemon before this one). Every placement
    narrows a mask to one CPU of the driver's, and ``follow`` then moves it within them, so
    one CPU of a known mask of several is ours; anything else the driver set afresh (it
    probed again)."""
    if known and len(known) > 1 and len(current) == 1 and current[0] in known:
        return list(known)
    return current


class IrqMaskStore(Protocol):
    """Keeps the driver's masks for the next daemon of the device (the state file)."""

    def load_irq_masks(self) -> dict[int, list[int]]: ...

    def save_irq_masks(self, masks: Mapping[int, list[int]]) -> None: ...


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Sorted CPUs as ranges: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
