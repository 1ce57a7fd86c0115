"""The single-store word views that ring and log writes go through."""

from __future__ import annotations

import struct

import pytest

from pyvduse.ring import stores
from pyvduse.ring.stores import words16, words32, words64


def test_words_store_little_endian_values_at_their_offsets() -> None:
    buf = bytearray(24)
    mem = memoryview(buf)
    words16(mem)[1] = 0x1234
    words32(mem)[1] = 0x0001_0007
    words64(mem)[2] = 0x0102_0304_0506_0708
    assert struct.unpack_from("<H", buf, 2)[0] == 0x1234
    assert struct.unpack_from("<HBx", buf, 4) == (7, 1)  # a packed log position
    assert struct.unpack_from("<Q", buf, 16)[0] == 0x0102_0304_0506_0708
    assert buf[:2] == b"\0\0" and buf[8:16] == bytes(8)  # nothing else touched


def test_a_view_of_odd_length_covers_whole_words_only() -> None:
    assert len(words16(memoryview(bytearray(7)))) == 3
    assert len(words32(memoryview(bytearray(7)))) == 1


def test_struct_pack_into_is_not_a_single_store() -> None:
    """Why the views exist: CPython clears a struct's bytes before it converts and writes the
    fields, so a reader in between sees 0. A value that fails to convert shows it: the
    zeros stay behind."""
    buf = bytearray(b"\xff\xff")
    with pytest.raises(struct.error):
        struct.pack_into("<H", buf, 0, 1 << 20)
    assert buf == bytearray(2)


def test_big_endian_hosts_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stores, "LITTLE_ENDIAN", False)
    with pytest.raises(RuntimeError, match="little-endian"):
        words16(memoryview(bytearray(4)))
