"""Fencing: making sure a request the runtime gave up on writes nothing into driver memory.

When a reset or an unmap must be answered while a backend still holds a request (a hung
NFS ``preadv``, a stalled NBD server), the kernel must not wait longer than its message
timeout, and no byte may reach driver memory after the answer. The request's buffers are
views of our mapping of that memory; they must stay valid (the backend will write into them
when it wakes, and unmapping them under it would be a use-after-free). So the mapping is
*replaced in place*: fresh anonymous pages are mapped over the same addresses
(``mmap(MAP_FIXED)``). The views keep working, and what the backend writes lands in pages
nobody reads, freed when the last view goes.
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref
from collections.abc import Iterable
from typing import Any

from pyvduse.ring.chain import Chain

log = logging.getLogger(__name__)

_MAP_FIXED = 0x10
_mmap: Any = None  # libc's mmap(2), bound on first use (ctypes costs at start)
_fenced: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # mappings whose pages nobody reads


def _libc_mmap() -> Any:
    global _mmap
    import ctypes

    if _mmap is None:
        fn = ctypes.CDLL(None, use_errno=True).mmap
        fn.restype = ctypes.c_void_p
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _mmap = fn
    return _mmap


def owners(chains: Iterable[Chain]) -> list[object]:
    """The objects (mmaps, buffers) behind the buffers of ``chains``, each once."""
    seen: dict[int, object] = {}
    for chain in chains:
        for view in (*chain.readable, *chain.writable):
            obj = view.obj
            seen.setdefault(id(obj), obj)
    return list(seen.values())


def fence(owner: object) -> bool:
    """Replace ``owner``'s pages with anonymous ones at the same addresses (an ``mmap``
    object: our mapping of driver memory). False when it is not something we can fence."""
    if not isinstance(owner, mmap.mmap) or owner.closed or len(owner) == 0:
        return False
    before = getattr(owner, "before_fence", None)
    if before is not None:  # e.g. memory the kernel uses too: it must let go first
        before()
    import ctypes

    libc_mmap = _libc_mmap()
    try:
        anchor = ctypes.c_char.from_buffer(owner)  # needs a writable mapping
    except TypeError:  # read-only: nothing can be written through it anyway
        return True
    addr = ctypes.addressof(anchor)
    del anchor
    size = len(owner)
    got = libc_mmap(
        addr,
        size,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED,
        -1,
        0,
    )
    if got != addr:  # MAP_FAILED or, impossibly with MAP_FIXED, elsewhere
        err = ctypes.get_errno()
        log.error("could not fence a mapping of %d bytes: %s", size, os.strerror(err))
        return False
    _fenced.add(owner)
    return True


def fenced(view: memoryview) -> bool:
    """Whether ``view`` is into a fenced mapping: what is written there, the driver never
    sees (so a used length must not count it)."""
    owner = view.obj
    return isinstance(owner, mmap.mmap) and owner in _fenced


def fence_chains(chains: Iterable[Chain], only: set[int] | None = None) -> int:
    """Fence the mappings behind ``chains`` (those whose ``id`` is in ``only``, when given);
    returns how many were fenced."""
    n = 0
    for owner in owners(chains):
        if (only is None or id(owner) in only) and fence(owner):
            n += 1
    return n
