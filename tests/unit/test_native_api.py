"""The native engine's Python API refuses misuse that would corrupt memory (found with the
extension under AddressSanitizer; no driver can reach these, a caller of the API can)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pyvduse.fastpath import engine as native

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")


def engine_args(**over: Any) -> dict[str, Any]:
    """A valid Engine() call over one 64 KiB region holding a ring of 8 at 0x1000."""
    args: dict[str, Any] = dict(
        regions=[(0, 0xFFFF, bytearray(0x10000), True)], num=8, desc=0x1000, avail=0x1080,
        used=0x2000, event_idx=True, indirect=True, last_avail=0, used_idx=0, signalled=0,
        capacity=bytearray(8), readonly=False, serial=b"", backend=native.extension().BACKEND_NULL)
    args.update(over)
    return args


def test_a_region_spanning_the_whole_iova_space_is_refused() -> None:
    """(0, 2^64-1) made last - start + 1 wrap to 0, so an empty buffer passed for it and
    every address then 'lay' in zero bytes of memory."""
    E = native.extension().Engine
    for buf in (bytearray(0), bytearray(1)):
        with pytest.raises(ValueError, match="regions"):
            E(**engine_args(regions=[(0, (1 << 64) - 1, buf, True)]))
    with pytest.raises(ValueError, match="regions"):  # nor an empty region anywhere
        E(**engine_args(regions=[(0x1000, 0xFFF, bytearray(0), True)]))
    eng = E(**engine_args())
    with pytest.raises(ValueError, match="regions"):
        eng.set_regions([(0, (1 << 64) - 1, bytearray(0), True)])
    eng.close()


def test_a_region_at_the_top_of_the_iova_space_is_accepted() -> None:
    E = native.extension().Engine
    top = (1 << 64) - 0x10000
    eng = E(**engine_args(regions=[(top, (1 << 64) - 1, bytearray(0x10000), True)],
                          desc=top + 0x1000, avail=top + 0x1080, used=top + 0x2000))
    eng.close()


def test_an_engine_whose_init_failed_cannot_run() -> None:
    """__init__ failing after it set the queue size left an engine run() would serve with a
    NULL capacity (a crash): every method that serves now refuses it. Run in a child so a
    regression is a failed test, not a dead test run."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from pyvduse.fastpath import engine as native
        from tests.unit.test_native_api import engine_args
        E = native.extension().Engine
        e = E.__new__(E)
        try:
            e.__init__(**engine_args(capacity=bytearray(4)))  # too small: fails late
        except ValueError:
            pass
        else:
            raise SystemExit("init did not fail")
        kick, stop = os.eventfd(0), os.eventfd(1)
        for call in (lambda: e.run(kick, stop), lambda: e.set_regions([]),
                     lambda: e.set_position(0, 0, 0), lambda: e.wait_idle(0),
                     lambda: e.abandon()):
            try:
                call()
            except RuntimeError as err:
                assert "not initialised" in str(err), err
            else:
                raise SystemExit("a half-built engine was used")
        e.close()
        print("refused")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]


# -- the C sources against the Python definitions ------------------------------------------

FASTPATH = Path(native.__file__).parent


def c_defines() -> dict[str, int]:
    text = (FASTPATH / "splitblk.h").read_text()
    return {name: int(value, 0) for name, value in
            re.findall(r"#define (\w+) (0x[0-9a-fA-F]+|\d+)(?:u|ull)?\b", text)}


def test_the_c_constants_match_the_python_definitions() -> None:
    from pyvduse.abi import virtio as vio
    from pyvduse.ring import inflight
    from pyvduse.ring.areas import SPLIT_ALIGN
    from pyvduse.ring.descriptors import MAX_WRITABLE

    d = c_defines()
    assert (d["DESC_ALIGN"], d["AVAIL_ALIGN"], d["USED_ALIGN"]) == SPLIT_ALIGN
    assert d["MAX_WRITABLE"] == MAX_WRITABLE
    assert d["DESC_F_NEXT"] == vio.VRING_DESC_F_NEXT
    assert d["DESC_F_WRITE"] == vio.VRING_DESC_F_WRITE
    assert d["DESC_F_INDIRECT"] == vio.VRING_DESC_F_INDIRECT
    assert d["AVAIL_F_NO_INTERRUPT"] == vio.VRING_AVAIL_F_NO_INTERRUPT
    assert d["USED_F_NO_NOTIFY"] == vio.VRING_USED_F_NO_NOTIFY
    assert (d["LOG_FREE"], d["LOG_IN_FLIGHT"], d["LOG_COMPLETED"]) == (
        inflight.FREE, inflight.IN_FLIGHT, inflight.COMPLETED)
    assert d["LOG_HEADER"] + d["LOG_ENTRY"] * 8 == inflight.log_size(8)


def test_driver_memory_is_read_through_the_single_read_helpers() -> None:
    """The plain little-endian loads (ld16/ld32/ld64) are for the engine's own memory only:
    the local copy of a request header and the in-flight log. Everything the driver can
    write is read with drv_ld* or drv_copy (one fetch per field: see splitblk.h)."""
    own = re.compile(r"^(hdr|e->log)\b")
    for path in sorted(FASTPATH.glob("*.c")):
        for m in re.finditer(r"\bld(16|32|64)\(([^)]*)\)", path.read_text()):
            assert own.match(m.group(2).strip()), f"{path.name}: {m.group(0)}"
