"""The native engine's Python API refuses misuse that would corrupt memory (found with the
extension under AddressSanitizer; no driver can reach these, a caller of the API can)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pyvduse.fastpath import engine as native
from pyvduse.fastpath.config import (
    AioMode,
    DeviceConfig,
    DeviceKind,
    EngineConfig,
    EngineTuning,
    Interrupts,
    RingLayout,
    StorageConfig,
    StorageKind,
    TestKnobs,
)

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")


def ring(**over: Any) -> RingLayout:
    """One 64 KiB region holding a ring of 8 at 0x1000."""
    return replace(
        RingLayout(
            [(0, 0xFFFF, bytearray(0x10000), True)], 8, 0x1000, 0x1080, 0x2000, event_idx=True, indirect=True
        ),
        **over,
    )


def engine_config(**groups: Any) -> EngineConfig:
    """A valid Engine() configuration: ``ring()``, a null disk, whatever ``groups`` says."""
    return EngineConfig(**{"ring": ring(), "device": DeviceConfig(bytearray(8)), **groups})


def test_a_region_spanning_the_whole_iova_space_is_refused() -> None:
    """(0, 2^64-1) made last - start + 1 wrap to 0, so an empty buffer passed for it and
    every address then 'lay' in zero bytes of memory."""
    E = native.extension().Engine
    for buf in (bytearray(0), bytearray(1)):
        with pytest.raises(ValueError, match="regions"):
            E(engine_config(ring=ring(regions=[(0, (1 << 64) - 1, buf, True)])))
    with pytest.raises(ValueError, match="regions"):  # nor an empty region anywhere
        E(engine_config(ring=ring(regions=[(0x1000, 0xFFF, bytearray(0), True)])))
    eng = E(engine_config())
    with pytest.raises(ValueError, match="regions"):
        eng.set_regions([(0, (1 << 64) - 1, bytearray(0), True)])
    eng.close()


def test_a_region_at_the_top_of_the_iova_space_is_accepted() -> None:
    E = native.extension().Engine
    top = (1 << 64) - 0x10000
    eng = E(
        engine_config(
            ring=ring(
                regions=[(top, (1 << 64) - 1, bytearray(0x10000), True)],
                desc=top + 0x1000,
                avail=top + 0x1080,
                used=top + 0x2000,
            )
        )
    )
    eng.close()


def test_an_engine_whose_init_failed_cannot_run() -> None:
    """__init__ failing after it set the queue size left an engine run() would serve with a
    NULL capacity (a crash): every method that serves now refuses it. Run in a child so a
    regression is a failed test, not a dead test run."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from pyvduse.fastpath import engine as native
        from pyvduse.fastpath.config import DeviceConfig
        from tests.unit.test_native_api import engine_config
        E = native.extension().Engine
        e = E.__new__(E)
        try:
            e.__init__(engine_config(device=DeviceConfig(bytearray(4))))  # too small: late
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]


# -- the configuration object ------------------------------------------------------------


def test_the_configuration_is_read_by_attribute_and_mistakes_name_the_field() -> None:
    E = native.extension().Engine
    E(engine_config()).close()
    full = engine_config()
    duck = SimpleNamespace(**{f.name: getattr(full, f.name) for f in fields(full)})
    E(duck).close()  # any object with the attributes will do
    device, storage = DeviceConfig(bytearray(8)), StorageConfig()
    wrong: list[tuple[Any, type[Exception], str]] = [
        (SimpleNamespace(ring=ring()), TypeError, "engine config: no attribute 'device'"),
        (engine_config(ring=SimpleNamespace(num=8)), TypeError, "ring has no attribute 'regions'"),
        (engine_config(ring=ring(num="8")), TypeError, "ring.num must be an int, not str"),
        (engine_config(ring=ring(event_idx=None)), TypeError, "ring.event_idx must be a bool, not NoneType"),
        (engine_config(ring=ring(regions=None)), TypeError, "ring.regions must be given"),
        (engine_config(ring=ring(last_avail=1 << 16)), ValueError, "ring.last_avail must be 0 to 65535"),
        (engine_config(ring=ring(num=3)), ValueError, "power of two"),
        (engine_config(ring=ring(log=bytearray(16))), ValueError, "log buffer too small"),
        (engine_config(device=with_(device, serial="x")), TypeError, "device.serial must be bytes, not str"),
        (engine_config(device=with_(device, serial=bytes(21))), ValueError, "longer than 20"),
        (engine_config(device=DeviceConfig(None)), ValueError, "a virtio-blk queue needs device.capacity"),
        (engine_config(device=DeviceConfig(kind=DeviceKind.NET_RX)), ValueError, "needs storage.kind"),
        (engine_config(storage=StorageConfig(StorageKind.TAP, fd=0)), ValueError, "needs storage.kind"),
        (engine_config(device=with_(device, kind=3)), ValueError, "device.kind must be 0 to 2"),
        (engine_config(device=with_(device, link=b"\1")), BufferError, "writable"),
        (engine_config(storage=StorageConfig(StorageKind.FD)), ValueError, "without an fd"),
        (engine_config(storage=StorageConfig(fd=-2)), ValueError, "storage.fd must be -1 to"),
        (engine_config(storage=with_(storage, kind=7)), ValueError, "storage.kind must be 0 to 4"),
        (engine_config(storage=StorageConfig(dio_align=3)), ValueError, "dio_align"),
        (engine_config(storage=StorageConfig(dio_align=2 << 20)), ValueError, "dio_align"),
        (engine_config(storage=StorageConfig(StorageKind.MEMORY)), ValueError, "storage.memory"),
        (
            engine_config(storage=StorageConfig(unpinnable=bytearray(0))),
            ValueError,
            "unpinnable buffer too small",
        ),
        (engine_config(storage=StorageConfig(unpinnable=b"\0")), BufferError, "writable"),
        (
            engine_config(storage=with_(storage, on_unpinnable="log")),
            TypeError,
            "storage.on_unpinnable must be callable or None, not str",
        ),
        (
            engine_config(interrupts=with_(Interrupts(), notify=5)),
            TypeError,
            "interrupts.notify must be callable or None, not int",
        ),
        (engine_config(tuning=EngineTuning(aio=AioMode.NBD)), ValueError, "tuning.aio"),
        (
            engine_config(tuning=EngineTuning(poll_ns=-1)),
            ValueError,
            f"tuning.poll_ns must be 0 to {(1 << 64) - 1}",
        ),
        (engine_config(tuning=EngineTuning(publish_ns=1 << 64)), ValueError, "tuning.publish_ns"),
        (
            engine_config(test=with_(TestKnobs(), efault=1.5)),
            TypeError,
            "test.efault must be an int, not float",
        ),
    ]
    for config, error, message in wrong:
        with pytest.raises(error, match=re.escape(message)):
            E(config)
    with pytest.raises(TypeError):
        E()


def test_build_makes_the_config_from_the_plan_and_the_ring(tmp_path: Path) -> None:
    from pyvduse.backend.file import FileBackend
    from pyvduse.backend.memory import MemoryBackend
    from pyvduse.backend.null import NullBackend
    from pyvduse.device.blk import BlkDevice, BlkOptions
    from pyvduse.model.arena import Arena
    from pyvduse.model.split_driver import DriverSplitRing
    from pyvduse.ring.inflight import InflightLog, log_size
    from pyvduse.ring.split import SplitQueue

    arena = Arena(1 << 16)
    drv = DriverSplitRing(arena, 8)
    q = SplitQueue(
        arena.memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr, 0, last_avail_idx=5, used_idx=3
    )
    log = InflightLog(memoryview(bytearray(log_size(8))), 8)
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    file = FileBackend(str(image), direct=False)
    for backend, kind in (
        (NullBackend(1 << 20), StorageKind.NULL),
        (MemoryBackend(1 << 20), StorageKind.MEMORY),
        (file, StorageKind.FD),
    ):
        dev = BlkDevice(backend, BlkOptions(readonly=True, serial="s1"))
        notify, on_error = print, print
        c = native.config(
            native.require_plan(dev),
            3,
            q,
            arena.memory,
            log,
            None,
            notify,
            on_error,
            tuning=EngineTuning(poll_ns=7),
            affinity_fd=9,
            follow_cpus=[0, 2, 70],
            inflight=bytearray(8),
            test=TestKnobs(serial=True),
        )
        assert c.ring.num == 8 and (c.ring.desc, c.ring.avail, c.ring.used) == (
            drv.desc_addr,
            drv.avail_addr,
            drv.used_addr,
        )
        assert (c.ring.last_avail, c.ring.used_idx, c.ring.event_idx) == (5, 3, False)
        assert c.ring.log is log.mem and c.ring.regions == native.region_tuples(arena.memory)
        assert c.device.capacity is dev.capacity_cell and c.device.readonly
        assert c.device.serial == b"s1".ljust(20, b"\0")
        assert c.storage.kind == kind and c.storage.fd == (file.fd if backend is file else -1)
        assert c.interrupts == Interrupts(-1, 0, 3, notify, on_error, 9, 0b101)
        assert c.tuning == EngineTuning(poll_ns=7, budget=4 * 8) and c.test.serial
        native.build(native.require_plan(dev), 3, q, arena.memory, log, (5, 6), notify, on_error).close()
        c = native.config(native.require_plan(dev), 0, q, arena.memory, None, (5, 6), notify, on_error)
        assert (c.interrupts.irq_fd, c.interrupts.irq_request, c.interrupts.notify) == (5, 6, None)
        backend.close()


def with_(obj: Any, **over: Any) -> Any:
    """``obj`` with fields its type hints do not allow (what a caller may still pass)."""
    return replace(obj, **over)


# -- the C sources against the Python definitions ------------------------------------------

FASTPATH = Path(native.__file__).parent


def c_defines() -> dict[str, int]:
    text = (FASTPATH / "splitblk.h").read_text()
    return {
        name: int(value, 0)
        for name, value in re.findall(r"#define (\w+) (0x[0-9a-fA-F]+|\d+)(?:u|ull)?\b", text)
    }


def test_the_c_constants_match_the_python_definitions() -> None:
    from pyvduse.abi import virtio as vio
    from pyvduse.abi import virtio_blk as vb
    from pyvduse.abi import virtio_net as vn
    from pyvduse.device import net
    from pyvduse.ring import budget, inflight
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
        inflight.FREE,
        inflight.IN_FLIGHT,
        inflight.COMPLETED,
    )
    assert d["LOG_HEADER"] + d["LOG_ENTRY"] * 8 == inflight.log_size(8)
    # the log's layout, field by field (the header's fields by their word indices)
    assert (d["LOG_HEADER"], d["LOG_ENTRY"]) == (inflight._HEADER.size, inflight._ENTRY.size)
    assert d["LOG_LAST_AVAIL"] == 2 * inflight._LAST_AVAIL16
    assert d["LOG_BASE"] == 2 * inflight._BASE16
    assert d["LOG_NUM"] == 4 * inflight._NUM32
    assert d["LOG_SEQ"] == 8 * inflight._SEQ64
    assert inflight._HEADER.format == "<HHIQ" and inflight._ENTRY.format == "<B7xQ"
    assert d["LOG_ENTRY_STATE"] == 0 and d["LOG_ENTRY_SEQ"] == struct.calcsize("<B7x")
    # virtio-blk requests
    assert (d["T_IN"], d["T_OUT"], d["T_FLUSH"], d["T_GET_ID"]) == (
        vb.ReqType.IN,
        vb.ReqType.OUT,
        vb.ReqType.FLUSH,
        vb.ReqType.GET_ID,
    )
    assert d["T_BARRIER"] == vb.T_BARRIER
    assert (d["S_OK"], d["S_IOERR"]) == (vb.ReqStatus.OK, vb.ReqStatus.IOERR)
    assert d["ID_BYTES"] == vb.ID_BYTES and d["OUTHDR_SIZE"] == vb.OUTHDR.size
    # virtio-net frames: the v1 header, where num_buffers is in it, the largest frame
    assert d["NET_HDR"] == vn.NET_HDR_V1_SIZE
    assert d["NET_NUM_BUFFERS"] == struct.calcsize("<BBHHHH")
    assert d["NET_MAX_PACKET"] == net.MAX_PACKET
    # the per-wakeup budget
    assert d["BUDGET_PER_SLOT"] == budget.BUDGET_PER_SLOT
    assert d["BUDGET_SLEEP_MIN_NS"] == budget.BUDGET_SLEEP_MIN_NS
    assert d["BUDGET_SLEEP_MAX_NS"] == budget.BUDGET_SLEEP_MAX_NS
    # the most a request in flight allocates (the README's bound: queue size x this)
    from pyvduse.backend import nbd

    chunk = re.search(r"#define BOUNCE_CHUNK \((\d+)u << (\d+)\)", (FASTPATH / "splitblk.h").read_text())
    assert chunk is not None and int(chunk[1]) << int(chunk[2]) == nbd.BOUNCE_LIMIT
    # the configuration's enums (the C enums, as the module exports them)
    ext = native.extension()
    assert list(StorageKind) == [
        ext.BACKEND_NULL,
        ext.BACKEND_FD,
        ext.BACKEND_MEMORY,
        ext.BACKEND_NBD,
        ext.BACKEND_TAP,
    ]
    assert list(DeviceKind) == [ext.DEV_BLK, ext.DEV_NET_RX, ext.DEV_NET_TX]
    assert list(AioMode) == [ext.AIO_SYNC, ext.AIO_URING, ext.AIO_NBD]


def test_driver_memory_is_read_through_the_single_read_helpers() -> None:
    """The plain little-endian loads (ld16/ld32/ld64) are for the engine's own memory only:
    the local copy of a request header and the in-flight log. Everything the driver can
    write is read with drv_ld* or drv_copy (one fetch per field: see splitblk.h)."""
    own = re.compile(r"^(hdr|e->log)\b")
    for path in sorted(FASTPATH.glob("*.c")):
        for m in re.finditer(r"\bld(16|32|64)\(([^)]*)\)", path.read_text()):
            assert own.match(m.group(2).strip()), f"{path.name}: {m.group(0)}"
