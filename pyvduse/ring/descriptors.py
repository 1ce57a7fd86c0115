"""Walking a descriptor table: the validation shared by split and packed rings.

Every rule of the spec that protects the device is checked here: addresses must lie in mapped
memory (writable memory for device-writable buffers), device-readable buffers come before
device-writable ones, an indirect table is only followed when negotiated, never nested and
never combined with NEXT, its length is a non-zero multiple of 16, a chain may not hold
more descriptors than the queue has (which also ends loops), and its device-writable buffers
may not total more than a used length can say (``MAX_WRITABLE``).
"""

from __future__ import annotations

from pyvduse.abi.virtio import (
    DESC_SIZE,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvduse.ring.errors import ChainError
from pyvduse.ring.memory import GuestMemory, MemoryFault

_unpack_desc = VRING_DESC.unpack_from

#: The most a chain's device-writable buffers may hold: a used element's length is a u32
#: (virtio 1.2 2.7.8), so a device serving more (256 descriptors of 16 MiB naming one buffer)
#: would complete it with a length that wraps. The spec caps a whole chain at 2^32 bytes.
MAX_WRITABLE = (1 << 32) - 1


def check_writable_total(total: int) -> None:
    """Refuse a chain whose device-writable descriptors add up to more than ``MAX_WRITABLE``."""
    if total > MAX_WRITABLE:
        raise ChainError(
            f"device-writable buffers total {total} bytes, more than a used length can hold (2^32-1)"
        )


def add_buffer(
    memory: GuestMemory,
    addr: int,
    length: int,
    flags: int,
    readable: list[memoryview],
    writable: list[memoryview],
) -> None:
    """Translate one direct descriptor and append it to the right list."""
    if flags & VRING_DESC_F_WRITE:
        if length:
            try:
                writable.extend(memory.segments(addr, length, True))
            except MemoryFault as e:
                raise ChainError(f"writable buffer: {e}") from None
    else:
        if writable:
            raise ChainError("device-readable descriptor after a device-writable one")
        if length:
            try:
                readable.extend(memory.segments(addr, length, False))
            except MemoryFault as e:
                raise ChainError(f"readable buffer: {e}") from None


def indirect_table(memory: GuestMemory, addr: int, length: int, limit: int) -> memoryview:
    """Map an indirect descriptor table after checking its size."""
    if length == 0 or length % DESC_SIZE:
        raise ChainError(f"indirect table length {length} is not a non-zero multiple of 16")
    if length // DESC_SIZE > limit:
        raise ChainError(f"indirect table of {length // DESC_SIZE} descriptors exceeds {limit}")
    try:
        return memory.view(addr, length, False)
    except MemoryFault as e:
        raise ChainError(f"indirect table: {e}") from None


def walk_indirect(
    memory: GuestMemory,
    table: memoryview,
    readable: list[memoryview],
    writable: list[memoryview],
    budget: int,
    writable_before: int = 0,
) -> int:
    """Follow the chain inside an indirect table from entry 0; returns descriptors used.

    ``writable_before``: bytes of device-writable buffers the chain had before the table
    (they count towards ``MAX_WRITABLE``)."""
    n = len(table) // DESC_SIZE
    i = 0
    count = 0
    wsum = writable_before
    segments = memory.segments
    while True:
        count += 1
        if count > budget:
            raise ChainError("indirect chain is longer than the queue (or loops)")
        addr, length, flags, nxt = _unpack_desc(table, i * DESC_SIZE)
        if flags & VRING_DESC_F_INDIRECT:
            raise ChainError("nested indirect descriptor")
        if length:  # add_buffer(), inlined: this is the hot path of every request
            write = flags & VRING_DESC_F_WRITE
            if not write and writable:
                raise ChainError("device-readable descriptor after a device-writable one")
            try:
                (writable if write else readable).extend(segments(addr, length, bool(write)))
            except MemoryFault as e:
                raise ChainError(f"{'writable' if write else 'readable'} buffer: {e}") from None
            if write:
                wsum += length
        if not flags & VRING_DESC_F_NEXT:
            check_writable_total(wsum)
            return count
        if nxt >= n:
            raise ChainError(f"indirect next {nxt} is outside the table of {n}")
        i = nxt
