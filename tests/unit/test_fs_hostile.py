"""Hostile FUSE requests (a VM through vhost-vdpa writes whatever it likes): the session
never raises, never writes more than the driver's buffers hold, and every reply it writes
is a well-formed header for the request's unique id; the passthrough stays in its
directory whatever the requests say."""

from __future__ import annotations

import asyncio
import inspect
import os
import struct
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from hello_fs import Hello

from pyvduse.abi import fuse
from pyvduse.fs.passthrough import Passthrough
from pyvduse.fs.session import FuseSession
from pyvduse.testing.fuse_client import Driver, split

OPCODES = [int(op) for op in fuse.Opcode] + [0, 4096, 0xFFFFFFFF]


def check_reply(session: FuseSession, readable: list[memoryview], wsize: int, wcuts: list[int]) -> None:
    out = bytearray(wsize)
    canary = b"\xa5" * 64
    backing = bytearray(out + canary)
    writable = split(memoryview(backing)[:wsize].tobytes(), wcuts) if wsize else []
    # split() copies: use views of one buffer so overruns show in the canary.
    views, pos = [], 0
    for seg in writable:
        views.append(memoryview(backing)[pos : pos + len(seg)])
        pos += len(seg)
    result = session.serve(readable, views)
    n = asyncio.run(result) if inspect.iscoroutine(result) else result
    assert isinstance(n, int) and 0 <= n <= wsize
    assert bytes(backing[wsize:]) == canary
    if n:
        length, error, _unique = fuse.OUT_HEADER.unpack(backing)
        assert length == n and -4096 < error <= 0


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=5), wsize=st.integers(0, 300)
)
def test_random_bytes(data: bytes, cuts: list[int], wsize: int) -> None:
    session = FuseSession(Hello())
    Driver(session).init()
    check_reply(session, split(data, cuts) if data else [], wsize, [7])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, int]:
    opcode = draw(st.sampled_from(OPCODES))
    body = draw(
        st.one_of(
            st.binary(max_size=200),
            st.builds(lambda a, b: a + b"\0" + b, st.binary(max_size=90), st.binary(max_size=20)),
        )
    )
    nodeid = draw(st.sampled_from([0, 1, 2, 3, 4, 1 << 63]))
    length = draw(st.one_of(st.just(40 + len(body)), st.integers(0, (1 << 32) - 1)))
    extlen = draw(st.sampled_from([0, 0, 1, 0xFFFF]))
    hdr = struct.pack("<IIQQIIIHH", length & 0xFFFFFFFF, opcode, 77, nodeid, 0, 0, 1, extlen, 0)
    return hdr + body, draw(st.integers(0, 600))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(requests(), min_size=1, max_size=12), cuts=st.lists(st.integers(0, 300), max_size=4))
def test_random_requests_on_a_passthrough(reqs: list[tuple[bytes, int]], cuts: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        shared = top / "shared"
        shared.mkdir()
        (shared / "f").write_bytes(b"data")
        (shared / "d").mkdir()
        os.symlink("/", shared / "ln")
        (top / "outside").write_bytes(b"keep")
        fs = Passthrough(shared)
        try:
            d = Driver(FuseSession(fs))
            d.init()
            for name in (b"f", b"d", b"ln"):
                d.lookup(1, name)  # inodes 2, 3, 4 exist
            for raw, wsize in reqs:
                check_reply(d.session, split(raw, cuts), wsize, [16, 100])
        finally:
            fs.close()
        assert sorted(p.name for p in top.iterdir()) == ["outside", "shared"]
        assert (top / "outside").read_bytes() == b"keep"
