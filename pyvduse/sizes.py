"""Parsing sizes the way storage tools accept them (``512``, ``64K``, ``1G``, ``2GiB``)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``; suffixes K, M, G, T are powers of 1024. ValueError if malformed."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"'{text}' is not a size (examples: 4096, 64M, 2G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]
