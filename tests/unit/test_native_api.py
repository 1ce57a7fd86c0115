"""The native engine's Python API refuses misuse that would corrupt memory (found with the
extension under AddressSanitizer; no driver can reach these, a caller of the API can)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from pyvduse.fastpath import engine as native

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")


def engine_args(**over: Any) -> dict[str, Any]:
    """A valid Engine() call over one 64 KiB region holding a ring of 8 at 0x1000."""
    args: dict[str, Any] = dict(
        regions=[(0, 0xFFFF, bytearray(0x10000), True)], num=8, desc=0x1000, avail=0x1080,
        used=0x2000, event_idx=True, indirect=True, last_avail=0, used_idx=0, signalled=0,
        capacity=bytearray(8), readonly=False, serial=b"", backend=native._splitblk.BACKEND_NULL)
    args.update(over)
    return args


def test_a_region_spanning_the_whole_iova_space_is_refused() -> None:
    """(0, 2^64-1) made last - start + 1 wrap to 0, so an empty buffer passed for it and
    every address then 'lay' in zero bytes of memory."""
    E = native._splitblk.Engine
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
    E = native._splitblk.Engine
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
        E = native._splitblk.Engine
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
