"""Word views for memory that someone else reads while we write it: one store per value.

``struct.pack_into`` is not such a store: CPython clears the whole destination before it
writes the fields (``s_pack_internal`` starts with a ``memset``). On a ring that lets the
driver, reading on another CPU, see a used index of 0 for an instant (Linux then finds "id N
is not a head" and breaks the queue); in the in-flight log a daemon killed between the two
steps leaves zeros where a position was, and its successor resumes at the wrong place.

A memoryview cast to a native unsigned type assigns a whole aligned word instead, the
counterpart of the kernel's ``WRITE_ONCE``. Every value the driver may read concurrently
(used index, event fields, packed flags) and every field of an in-flight log goes through
one of these views. Virtio 1.x memory is little-endian and the casts are native, so on a
big-endian host the engine refuses to start rather than write byte-swapped indices.
"""

from __future__ import annotations

import sys
from typing import Literal

LITTLE_ENDIAN = sys.byteorder == "little"


def _words(mem: memoryview, fmt: Literal["H", "I", "Q"], size: int) -> memoryview:
    if not LITTLE_ENDIAN:
        raise RuntimeError(
            "pyvduse's ring engine needs a little-endian host (virtio 1.x "
            "memory is little-endian and it stores native words)"
        )
    raw = mem.cast("B") if mem.format != "B" else mem
    return raw[: len(raw) - len(raw) % size].cast(fmt)


def words16(mem: memoryview) -> memoryview:
    """``mem`` as u16 words: ``w[off // 2] = v`` stores bytes ``off, off + 1`` at once."""
    return _words(mem, "H", 2)


def words32(mem: memoryview) -> memoryview:
    """``mem`` as u32 words (``w[off // 4]``)."""
    return _words(mem, "I", 4)


def words64(mem: memoryview) -> memoryview:
    """``mem`` as u64 words (``w[off // 8]``)."""
    return _words(mem, "Q", 8)
