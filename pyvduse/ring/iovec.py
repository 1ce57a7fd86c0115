"""Helpers over lists of memoryviews (scatter-gather buffers taken from a descriptor chain)."""

from __future__ import annotations


def total(segs: list[memoryview]) -> int:
    """Total length in bytes."""
    return sum(len(s) for s in segs)


def slice_segments(segs: list[memoryview], start: int, end: int) -> list[memoryview]:
    """The views covering bytes ``[start, end)`` of the concatenation of ``segs``."""
    out: list[memoryview] = []
    pos = 0
    for s in segs:
        n = len(s)
        lo, hi = max(start - pos, 0), min(end - pos, n)
        if lo < hi:
            out.append(s if lo == 0 and hi == n else s[lo:hi])
        pos += n
        if pos >= end:
            break
    return out


def gather(segs: list[memoryview], start: int, length: int) -> bytes:
    """Copy ``length`` bytes at ``start`` out of the concatenation (for small headers)."""
    first = segs[0] if segs else None
    if first is not None and start + length <= len(first):
        return bytes(first[start : start + length])
    return b"".join(bytes(s) for s in slice_segments(segs, start, start + length))


def scatter(segs: list[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` into the segments in order; returns the bytes written."""
    pos = 0
    n = len(data)
    for s in segs:
        if pos >= n:
            break
        k = min(len(s), n - pos)
        s[:k] = data[pos : pos + k]
        pos += k
    return pos


def fill_zero(segs: list[memoryview]) -> None:
    """Zero every segment."""
    for s in segs:
        s[:] = bytes(len(s))
