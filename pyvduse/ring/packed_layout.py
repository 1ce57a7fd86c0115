"""Packed virtqueue layout (virtio 1.2 section 2.8): flag patterns, positions, indirect tables.

Shared by the device engine (``packed.py``) and the in-process driver model, so both sides
agree on what "available" and "used" look like.

Positions: a ring index together with its wrap counter names one of ``2 * num`` distinct
places. ``linear(idx, wrap, num)`` maps them onto ``[0, 2 * num)`` (wrap counter 1, the
initial value, is the first lap), which turns the wrap-aware event checks into plain modular
arithmetic.
"""

from __future__ import annotations

from pyvduse.abi.virtio import (
    DESC_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_F_WRAP_CTR,
)
from pyvduse.ring.descriptors import add_buffer, check_writable_total
from pyvduse.ring.errors import ChainError
from pyvduse.ring.memory import GuestMemory

F_AVAIL = 1 << VRING_PACKED_DESC_F_AVAIL  # 0x0080
F_USED = 1 << VRING_PACKED_DESC_F_USED  # 0x8000
F_AVAIL_USED = F_AVAIL | F_USED
EVENT_WRAP = 1 << VRING_PACKED_EVENT_F_WRAP_CTR  # bit 15 of off_wrap
EVENT_OFF_MASK = EVENT_WRAP - 1

# flags & F_AVAIL_USED of a descriptor the driver made available, indexed by wrap counter:
# AVAIL equal to the counter, USED its inverse.
AVAIL_PATTERN = (F_USED, F_AVAIL)
# ... and of a descriptor the device marked used: both bits equal to the counter.
USED_PATTERN = (0, F_AVAIL_USED)

EVENT_AREA_SIZE = 4  # struct pvirtq_event_suppress {le16 off_wrap; le16 flags;}
EVENT_FLAGS_MASK = 3  # the two defined bits of flags; the other 14 are reserved

_iter_desc = VRING_PACKED_DESC.iter_unpack


def is_avail(flags: int, wrap: int) -> bool:
    """Whether a descriptor with ``flags`` is available under driver wrap counter ``wrap``."""
    return flags & F_AVAIL_USED == AVAIL_PATTERN[wrap]


def is_used(flags: int, wrap: int) -> bool:
    """Whether a descriptor with ``flags`` is used under device wrap counter ``wrap``."""
    return flags & F_AVAIL_USED == USED_PATTERN[wrap]


def linear(idx: int, wrap: int, num: int) -> int:
    """The position of ring index ``idx`` in the lap with wrap counter ``wrap``, in [0, 2num)."""
    return idx if wrap else idx + num


def off_wrap(idx: int, wrap: int) -> int:
    """The ``off_wrap`` word naming ring index ``idx`` with wrap counter ``wrap``."""
    return (idx & EVENT_OFF_MASK) | (wrap & 1) << VRING_PACKED_EVENT_F_WRAP_CTR


def event_crossed(off_wrap_word: int, new: int, old: int, num: int) -> bool:
    """vring_need_event() over wrap-aware positions: was the event slot passed going old -> new?

    ``new`` and ``old`` are ``linear`` positions; the event fires when the descriptor named
    by ``off_wrap_word`` lies in ``[old, new)``, i.e. was made available/used by this step.
    Both sides can never move more than ``num`` slots between checks, so positions modulo
    ``2 * num`` are unambiguous. A nonsense offset (``>= num``) simply wraps: never a crash.
    """
    two = 2 * num
    ev = (off_wrap_word & EVENT_OFF_MASK) + (0 if off_wrap_word >> VRING_PACKED_EVENT_F_WRAP_CTR else num)
    return (new - ev - 1) % two < (new - old) % two


def walk_indirect_packed(
    memory: GuestMemory,
    table: memoryview,
    readable: list[memoryview],
    writable: list[memoryview],
) -> int:
    """Translate every entry of a packed indirect table; returns the number of entries.

    Unlike split tables, a packed table is not linked: its ``len / 16`` entries are used in
    order, and only WRITE is a valid flag (NEXT and the buffer id are reserved and ignored,
    section 2.8.8). An INDIRECT entry is refused as a nested table, and so is a table whose
    writable entries add up to more than a used length holds. The table size was already
    bounded by ``indirect_table``.
    """
    n = wsum = 0
    for addr, length, _id, flags in _iter_desc(table):
        if flags & VRING_DESC_F_INDIRECT:
            raise ChainError("nested indirect descriptor")
        add_buffer(memory, addr, length, flags, readable, writable)
        if flags & VRING_DESC_F_WRITE:
            wsum += length
        n += 1
    check_writable_total(wsum)
    return n


def table_bytes(num: int) -> int:
    """Bytes of a packed descriptor ring of ``num`` entries."""
    return DESC_SIZE * num
