"""Where a ring's areas may lie: inside the IOVA space, aligned, and apart from each other.

A ring is three areas of driver memory (split: descriptor table, avail ring, used ring;
packed: descriptor ring, driver and device event areas), checked once when a queue is set
up, by both engines (the native one in splitblk_ring.c, with the same sizes):

- each is aligned as virtio 1.2 requires (2.7 "Alignment": 16, 2, 4 for split; 2.8.10: 16,
  4, 4 for packed), which also keeps every index and flags word a single aligned access;
- no two overlap. A driver never places them so; one that does could make the device feed
  itself: a used ring on top of the avail ring turns each completion's used-index store into
  an avail-index store, so every completion makes the next request available and one kick
  keeps a worker busy for good (13 million requests in 2 s before this check).

A queue whose areas fail the check is not served: ``RingError`` with the reason, which the
runtime logs as "queue N cannot be served: ...".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from pyvduse.abi.virtio import DESC_SIZE, avail_ring_size, used_ring_size
from pyvduse.ring.errors import RingError
from pyvduse.ring.memory import MAX_IOVA
from pyvduse.ring.packed_layout import EVENT_AREA_SIZE

SPLIT_ALIGN = (16, 2, 4)  # descriptor table, avail ring, used ring
PACKED_ALIGN = (16, 4, 4)  # descriptor ring, driver event area, device event area


class Area(NamedTuple):
    name: str
    iova: int
    size: int
    align: int

    def __str__(self) -> str:
        return f"the {self.name} (0x{self.iova:x}+{self.size})"


def check_areas(areas: Sequence[Area]) -> None:
    """RingError naming the first area that is misaligned or outside the IOVA space, or the
    first two that overlap."""
    for a in areas:
        if a.iova % a.align:
            raise RingError(f"{a} is not {a.align}-byte aligned as virtio requires")
        if a.iova + a.size - 1 > MAX_IOVA:
            raise RingError(f"{a} runs past the end of the IOVA space")
    for i, a in enumerate(areas):
        for b in areas[i + 1 :]:
            if a.iova < b.iova + b.size and b.iova < a.iova + a.size:
                raise RingError(f"ring areas overlap: {a} and {b}")


def split_areas(num: int, desc: int, avail: int, used: int, event_idx: bool) -> list[Area]:
    """A split ring's areas (the event-index fields count only when negotiated)."""
    d, a, u = SPLIT_ALIGN
    return [
        Area("descriptor table", desc, DESC_SIZE * num, d),
        Area("avail ring", avail, avail_ring_size(num, event_idx), a),
        Area("used ring", used, used_ring_size(num, event_idx), u),
    ]


def packed_areas(num: int, desc: int, driver: int, device: int) -> list[Area]:
    d, drv, dev = PACKED_ALIGN
    return [
        Area("descriptor ring", desc, DESC_SIZE * num, d),
        Area("driver event area", driver, EVENT_AREA_SIZE, drv),
        Area("device event area", device, EVENT_AREA_SIZE, dev),
    ]
