"""Ring areas that overlap or are misaligned are refused when a queue is set up, by both
engines and on the model (a used ring on top of the avail ring made every completion the
next request: one kick kept a worker busy for good)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvduse.abi.virtio import F_RING_EVENT_IDX, bit
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.fastpath import engine as native
from pyvduse.fastpath.config import DeviceConfig, EngineConfig, RingLayout
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.ops import inspect
from pyvduse.ring.areas import check_areas, packed_areas, split_areas
from pyvduse.ring.errors import RingError
from pyvduse.ring.memory import RegionMap, buffer_region
from pyvduse.ring.packed import PackedQueue
from pyvduse.ring.split import SplitQueue
from pyvduse.runtime.tuning import DataPath
from pyvduse.testing import ModelRig

MEM = 1 << 18
NUM = 8


def null_engine(num: int, desc: int, avail: int, used: int, event_idx: bool) -> EngineConfig:
    """A native engine's configuration for a ring of ``num`` at these IOVAs in MEM bytes."""
    return EngineConfig(
        RingLayout(
            [(0, MEM - 1, bytearray(MEM), True)], num, desc, avail, used, event_idx=event_idx, indirect=True
        ),
        DeviceConfig(bytearray(8)),
    )


def memory() -> RegionMap:
    m = RegionMap()
    m.add(buffer_region(0, bytearray(MEM)))
    return m


# desc, avail, used of a ring of 8 (desc 128 bytes, avail 4+16+2, used 4+64+2)
SPLIT_CASES = {
    "apart": ((0x1000, 0x1080, 0x2000), None),
    "used on avail": ((0x1000, 0x2000, 0x2000), "overlap"),
    "used inside avail": ((0x1000, 0x2000, 0x2004), "overlap"),
    "avail on desc": ((0x1000, 0x1070, 0x2000), "overlap"),
    "used on desc": ((0x1000, 0x2000, 0x1000 + 0x7C), "overlap"),
    "adjacent": ((0x1000, 0x1080, 0x1080 + 24), None),
    "desc misaligned": ((0x1008, 0x1100, 0x2000), "aligned"),
    "avail misaligned": ((0x1000, 0x1081, 0x2000), "aligned"),
    "used misaligned": ((0x1000, 0x1080, 0x2002), "aligned"),
}


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_ring_areas(case: str) -> None:
    (desc, avail, used), refused = SPLIT_CASES[case]
    features = bit(F_RING_EVENT_IDX)
    if refused is None:
        SplitQueue(memory(), NUM, desc, avail, used, features)
    else:
        with pytest.raises(RingError, match=refused):
            SplitQueue(memory(), NUM, desc, avail, used, features)
    if native.available():
        config = null_engine(NUM, desc, avail, used, True)
        if refused is None:
            native.extension().Engine(config).close()
        else:
            with pytest.raises(ValueError, match=refused):
                native.extension().Engine(config)


def test_the_event_fields_count_only_when_negotiated() -> None:
    """Without EVENT_IDX the avail ring has no used_event and the used ring no avail_event."""
    SplitQueue(memory(), NUM, 0x1000, 0x1080, 0x1080 + 20, 0)
    with pytest.raises(RingError, match="overlap"):
        SplitQueue(memory(), NUM, 0x1000, 0x1080, 0x1080 + 20, bit(F_RING_EVENT_IDX))


@pytest.mark.parametrize(
    ("desc", "driver", "device", "refused"),
    [
        (0x1000, 0x1080, 0x1084, None),
        (0x1000, 0x1080, 0x1080, "overlap"),
        (0x1000, 0x1040, 0x1084, "overlap"),  # the driver area inside the descriptor ring
        (0x1000, 0x1080, 0x107C, "overlap"),
        (0x1004, 0x1080, 0x1084, "aligned"),
        (0x1000, 0x1082, 0x1088, "aligned"),
        (0x1000, 0x1080, 0x1086, "aligned"),
    ],
)
def test_packed_ring_areas(desc: int, driver: int, device: int, refused: str | None) -> None:
    if refused is None:
        PackedQueue(memory(), NUM, desc, driver, device, 0)
    else:
        with pytest.raises(RingError, match=refused):
            PackedQueue(memory(), NUM, desc, driver, device, 0)


def test_areas_at_the_top_of_the_iova_space() -> None:
    top = (1 << 64) - 0x1000
    check_areas(split_areas(NUM, top, top + 0x80, top + 0x100, True))
    with pytest.raises(RingError, match="end of the IOVA space"):
        check_areas(split_areas(NUM, top, top + 0x80, (1 << 64) - 4, True))
    with pytest.raises(RingError, match="end of the IOVA space"):
        check_areas(packed_areas(NUM, (1 << 64) - 0x40, top, top + 4))


@pytest.mark.skipif(not native.available(), reason="native extension not built")
@settings(max_examples=300, deadline=None)
@given(
    desc=st.integers(0, 0x400),
    avail=st.integers(0, 0x400),
    used=st.integers(0, 0x400),
    num=st.sampled_from([1, 2, 8, 16]),
    event_idx=st.booleans(),
)
def test_both_engines_refuse_the_same_layouts(
    desc: int, avail: int, used: int, num: int, event_idx: bool
) -> None:
    try:
        check_areas(split_areas(num, desc, avail, used, event_idx))
        python_ok = True
    except RingError:
        python_ok = False
    try:
        native.extension().Engine(null_engine(num, desc, avail, used, event_idx)).close()
        native_ok = True
    except ValueError:
        native_ok = False
    assert python_ok == native_ok


@pytest.mark.parametrize("path", [DataPath.NATIVE, DataPath.PYTHON])
@pytest.mark.parametrize("packed", [False, True])
def test_the_model_driver_placing_the_used_ring_on_the_avail_ring(
    path: DataPath, packed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Queue 0 is not served (one log line, and `ctl status` says why); queue 1 is."""
    if path is DataPath.NATIVE and not native.available():
        pytest.skip("native extension not built")
    dev = BlkDevice(MemoryBackend(1 << 20), BlkOptions(num_queues=2, packed=packed))

    def place(index: int, where: tuple[int, int, int]) -> tuple[int, int, int]:
        desc, driver, _device = where
        return (desc, driver, driver) if index == 0 else where

    with ModelRig(dev, data_path=path) as rig, caplog.at_level(logging.ERROR):
        drv = BlkDriver(rig.kernel, placement=place)
        assert rig.server.running.wait(5)  # the queues start once DRIVER_OK is answered
        assert sorted(rig.server.workers) == [1]
        drv.write(0, b"x" * 512, queue=1)
        assert drv.read(0, 512, queue=1) == b"x" * 512
        q0 = inspect.queue_status(0, 256, None, None, refused=rig.server.refused.get(0))
    lines = [r.getMessage() for r in caplog.records if "queue 0" in r.getMessage()]
    assert len(lines) == 1 and "cannot be served: ring areas overlap" in lines[0], lines
    assert not q0["served"] and "overlap" in q0["broken"]
