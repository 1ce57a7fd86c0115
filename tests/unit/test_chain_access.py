"""``Chain.read`` / ``Chain.write``: a request's buffers as one byte string, however split."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from pyvduse.ring.chain import Chain


def split(data: bytearray, cuts: list[int]) -> list[memoryview]:
    view = memoryview(data)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [view[a:b] for a, b in itertools.pairwise(bounds)]


@given(
    st.binary(max_size=64),
    st.lists(st.integers(0, 64), max_size=5),
    st.integers(0, 80),
    st.one_of(st.none(), st.integers(0, 80)),
)
def test_read_is_a_slice_of_the_concatenation(
    data: bytes, cuts: list[int], start: int, length: int | None
) -> None:
    chain = Chain(0, split(bytearray(data), cuts), [])
    end = len(data) if length is None else start + length
    assert chain.read(start, length) == data[start:end]
    assert chain.readable_size == len(data)


@given(
    st.integers(0, 64), st.lists(st.integers(0, 64), max_size=5), st.binary(max_size=80), st.integers(0, 80)
)
def test_write_lands_where_asked_and_nowhere_else(
    size: int, cuts: list[int], data: bytes, start: int
) -> None:
    buf = bytearray(size)
    chain = Chain(0, [], split(buf, cuts))
    n = chain.write(data, start)
    want = bytearray(size)
    fits = data[: max(min(len(data), size - start), 0)]
    want[start : start + len(fits)] = fits
    assert n == len(fits) and buf == want[:size]
