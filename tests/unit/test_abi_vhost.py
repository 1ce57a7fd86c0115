"""Pin the vhost / vhost-vdpa uAPI (pyvduse.abi.vhost) to literal values and the C header.

The request numbers below were printed by a C program built against linux-libc-dev 6.1's
``<linux/vhost.h>``, except the ones marked 6.x (newer than that header), which are the
``_IO*`` encodings of the 6.12 header's definitions, written out by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvduse.abi import vhost as h
from tests.unit.c_header import c_values

REQUESTS = {
    "VHOST_GET_FEATURES": 0x8008AF00,
    "VHOST_SET_FEATURES": 0x4008AF00,
    "VHOST_SET_OWNER": 0xAF01,
    "VHOST_RESET_OWNER": 0xAF02,
    "VHOST_SET_MEM_TABLE": 0x4008AF03,
    "VHOST_SET_LOG_BASE": 0x4008AF04,
    "VHOST_SET_LOG_FD": 0x4004AF07,
    "VHOST_SET_VRING_NUM": 0x4008AF10,
    "VHOST_SET_VRING_ADDR": 0x4028AF11,
    "VHOST_SET_VRING_BASE": 0x4008AF12,
    "VHOST_GET_VRING_BASE": 0xC008AF12,
    "VHOST_SET_VRING_KICK": 0x4008AF20,
    "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_SET_VRING_ERR": 0x4008AF22,
    "VHOST_SET_BACKEND_FEATURES": 0x4008AF25,
    "VHOST_GET_BACKEND_FEATURES": 0x8008AF26,
    "VHOST_VDPA_GET_DEVICE_ID": 0x8004AF70,
    "VHOST_VDPA_GET_STATUS": 0x8001AF71,
    "VHOST_VDPA_SET_STATUS": 0x4001AF72,
    "VHOST_VDPA_GET_CONFIG": 0x8008AF73,
    "VHOST_VDPA_SET_CONFIG": 0x4008AF74,
    "VHOST_VDPA_SET_VRING_ENABLE": 0x4008AF75,
    "VHOST_VDPA_GET_VRING_NUM": 0x8002AF76,
    "VHOST_VDPA_SET_CONFIG_CALL": 0x4004AF77,
    "VHOST_VDPA_GET_IOVA_RANGE": 0x8010AF78,
    "VHOST_VDPA_GET_CONFIG_SIZE": 0x8004AF79,
    "VHOST_VDPA_GET_AS_NUM": 0x8004AF7A,
    "VHOST_VDPA_GET_VRING_GROUP": 0xC008AF7B,
    "VHOST_VDPA_SET_GROUP_ASID": 0x4008AF7C,
    "VHOST_VDPA_SUSPEND": 0xAF7D,
    "VHOST_VDPA_GET_VQS_COUNT": 0x8004AF80,
    "VHOST_VDPA_GET_GROUP_NUM": 0x8004AF81,
}
REQUESTS_6X = {
    "VHOST_VDPA_RESUME": 0xAF7E,
    "VHOST_VDPA_GET_VRING_DESC_GROUP": 0xC008AF7F,
    "VHOST_VDPA_GET_VRING_SIZE": 0xC008AF82,
}

SIZES = {
    "VRING_STATE": 8,
    "VRING_FILE": 8,
    "VRING_ADDR": 40,
    "IOTLB_MSG": 32,
    "MSG_V1": 72,
    "MSG_V2": 72,
    "VDPA_CONFIG_HEADER": 8,
    "VDPA_IOVA_RANGE": 16,
    "MEMORY_HEADER": 8,
}


@pytest.mark.parametrize("name", sorted(REQUESTS | REQUESTS_6X))
def test_request_numbers(name: str) -> None:
    assert getattr(h, name) == (REQUESTS | REQUESTS_6X)[name]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_struct_sizes(name: str) -> None:
    assert getattr(h, name).size == SIZES[name]


def test_constants() -> None:
    assert h.VHOST_VIRTIO == 0xAF
    assert h.VHOST_FILE_UNBIND == -1
    assert (h.VHOST_ACCESS_RO, h.VHOST_ACCESS_WO, h.VHOST_ACCESS_RW) == (1, 2, 3)
    assert (h.VHOST_IOTLB_MSG, h.VHOST_IOTLB_MSG_V2) == (1, 2)
    assert h.MSG_SIZE == 72
    assert [(t.name, t.value) for t in h.IotlbType] == [
        ("MISS", 1),
        ("UPDATE", 2),
        ("INVALIDATE", 3),
        ("ACCESS_FAIL", 4),
        ("BATCH_BEGIN", 5),
        ("BATCH_END", 6),
    ]
    assert [(f.name, f.value) for f in h.BackendFeature] == [
        ("IOTLB_MSG_V2", 1),
        ("IOTLB_BATCH", 2),
        ("IOTLB_ASID", 3),
        ("SUSPEND", 4),
        ("RESUME", 5),
        ("ENABLE_AFTER_DRIVER_OK", 6),
        ("DESC_ASID", 7),
        ("IOTLB_PERSIST", 8),
    ]


def test_vring_addr_puts_used_before_avail() -> None:
    raw = h.VringAddr(3, desc=0x1000, avail=0x2000, used=0x3000).pack()
    assert raw == (
        b"\x03\0\0\0"
        + bytes(4)
        + (0x1000).to_bytes(8, "little")
        + (0x3000).to_bytes(8, "little")
        + (0x2000).to_bytes(8, "little")
        + bytes(8)
    )
    assert h.VringAddr.unpack(raw) == h.VringAddr(3, 0x1000, 0x2000, 0x3000)


def test_iotlb_messages_v1_and_v2() -> None:
    m = h.IotlbMsg(h.IotlbType.UPDATE, iova=1 << 33, size=4096, uaddr=0x7F0000001000, perm=h.VHOST_ACCESS_RW)
    v2 = m.message(v2=True)
    assert len(v2) == 72 and v2[:8] == b"\x02\0\0\0\0\0\0\0"
    assert v2[8:16] == (1 << 33).to_bytes(8, "little")
    assert v2[8 + 24] == h.VHOST_ACCESS_RW and v2[8 + 25] == h.IotlbType.UPDATE
    v1 = m.message(v2=False)
    assert len(v1) == 72 and v1[:8] == b"\x01\0\0\0\0\0\0\0" and v1[8:] == v2[8:]
    assert h.IotlbMsg.parse(v2) == (2, 0, m)
    assert h.IotlbMsg.parse(m.message(v2=True, asid=1)) == (2, 1, m)
    assert h.IotlbMsg.parse(v1) == (1, 0, m)
    with pytest.raises(ValueError):
        m.message(v2=False, asid=1)
    with pytest.raises(ValueError):
        h.IotlbMsg.parse(b"\x07" + bytes(71))


@given(st.integers(0, 1), st.integers(0, 0x7FFF), st.integers(0, 1), st.integers(0, 0x7FFF))
def test_packed_base_round_trips(aw: int, ai: int, uw: int, ui: int) -> None:
    num = h.packed_base(aw, ai, uw, ui)
    assert 0 <= num < 1 << 32
    assert h.unpack_packed_base(num) == (aw, ai, uw, ui)


def test_packed_base_layout_and_range() -> None:
    assert h.packed_base(1, 0, 1, 0) == 0x8000_8000
    assert h.packed_base(0, 5, 1, 3) == 0x8003_0005
    with pytest.raises(ValueError):
        h.packed_base(1, 0x8000, 1, 0)


def test_config_request() -> None:
    arg = h.config_request(4, 8)
    assert bytes(arg) == b"\x04\0\0\0\x08\0\0\0" + bytes(8)


# --------------------------------------------------------------------------------------
# Cross-check against the installed C header
# --------------------------------------------------------------------------------------

HEADER = Path("/usr/include/linux/vhost.h")

C_EXPRS: dict[str, int] = {
    **{name: getattr(h, name) for name in REQUESTS},
    "sizeof(struct vhost_vring_state)": h.VRING_STATE.size,
    "sizeof(struct vhost_vring_file)": h.VRING_FILE.size,
    "sizeof(struct vhost_vring_addr)": h.VRING_ADDR.size,
    "offsetof(struct vhost_vring_addr, used_user_addr)": 16,
    "offsetof(struct vhost_vring_addr, avail_user_addr)": 24,
    "sizeof(struct vhost_iotlb_msg)": h.IOTLB_MSG.size,
    "offsetof(struct vhost_iotlb_msg, perm)": 24,
    "offsetof(struct vhost_iotlb_msg, type)": 25,
    "sizeof(struct vhost_msg)": h.MSG_V1.size,
    "offsetof(struct vhost_msg, iotlb)": 8,
    "sizeof(struct vhost_msg_v2)": h.MSG_V2.size,
    "offsetof(struct vhost_msg_v2, iotlb)": 8,
    "sizeof(struct vhost_vdpa_config)": h.VDPA_CONFIG_HEADER.size,
    "sizeof(struct vhost_vdpa_iova_range)": h.VDPA_IOVA_RANGE.size,
    "VHOST_VIRTIO": h.VHOST_VIRTIO,
    "VHOST_FILE_UNBIND": h.VHOST_FILE_UNBIND,
    "VHOST_ACCESS_RO": h.VHOST_ACCESS_RO,
    "VHOST_ACCESS_WO": h.VHOST_ACCESS_WO,
    "VHOST_ACCESS_RW": h.VHOST_ACCESS_RW,
    "VHOST_IOTLB_MSG": h.VHOST_IOTLB_MSG,
    "VHOST_IOTLB_MSG_V2": h.VHOST_IOTLB_MSG_V2,
    **{f"VHOST_IOTLB_{t.name}": t.value for t in h.IotlbType},
    **{f"VHOST_BACKEND_F_{f.name}": f.value for f in h.BackendFeature if f <= h.BackendFeature.SUSPEND},
}
# Newer than some installed headers: checked when the header has them.
C_OPTIONAL: dict[str, int] = {
    **{name: getattr(h, name) for name in REQUESTS_6X},
    **{f"VHOST_BACKEND_F_{f.name}": f.value for f in h.BackendFeature if f > h.BackendFeature.SUSPEND},
}


@pytest.mark.skipif(shutil.which("gcc") is None or not HEADER.exists(), reason="needs gcc and linux/vhost.h")
def test_against_c_header(tmp_path: Path) -> None:
    got = c_values(tmp_path, "linux/vhost.h", list(C_EXPRS), list(C_OPTIONAL))
    expected = {**C_EXPRS, **{k: val for k, val in C_OPTIONAL.items() if k in got}}
    mismatches = {k: (got[k], val) for k, val in expected.items() if got[k] != val}
    assert not mismatches, f"C value vs Python value: {mismatches}"
