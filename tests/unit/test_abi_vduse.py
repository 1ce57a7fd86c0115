"""Pin the VDUSE uAPI (pyvduse.abi.vduse) to the checked reference and to the C header.

The literal numbers below are copied from shared/reference/vduse-uapi.md (sections 1 and 2)
and, for what Linux 7.x added or changed (VDUSE_GET/SET_FEATURES, VDUSE_IOTLB_GET_FD2 and its
80-byte struct, SET_VQ_READY, SUSPEND, ngroups/nas, a queue's group), printed by gcc from
Debian's linux-libc-dev 7.3.4 (trixie-backports) <linux/vduse.h>; not computed, so a mistake
in the encoder cannot hide behind itself.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from pyvduse.abi import vduse as v
from tests.unit.c_header import c_values

# --------------------------------------------------------------------------------------
# Literal values from the reference
# --------------------------------------------------------------------------------------

REQUESTS = {
    "VDUSE_GET_API_VERSION": 0x80088100,
    "VDUSE_SET_API_VERSION": 0x40088101,
    "VDUSE_CREATE_DEV": 0x41508102,
    "VDUSE_DESTROY_DEV": 0x41008103,
    "VDUSE_GET_FEATURES": 0x80088104,
    "VDUSE_SET_FEATURES": 0x40088105,
    "VDUSE_IOTLB_GET_FD": 0xC0208110,
    "VDUSE_DEV_GET_FEATURES": 0x80088111,
    "VDUSE_DEV_SET_CONFIG": 0x40088112,
    "VDUSE_DEV_INJECT_CONFIG_IRQ": 0x00008113,
    "VDUSE_VQ_SETUP": 0x40208114,
    "VDUSE_VQ_GET_INFO": 0xC0308115,
    "VDUSE_VQ_SETUP_KICKFD": 0x40088116,
    "VDUSE_VQ_INJECT_IRQ": 0x40048117,
    "VDUSE_IOTLB_REG_UMEM": 0x40308118,
    "VDUSE_IOTLB_DEREG_UMEM": 0x40308119,
    "VDUSE_IOTLB_GET_INFO": 0xC030811A,
    "VDUSE_IOTLB_GET_FD2": 0xC050811B,
}

REQUESTS_DEC = {
    "VDUSE_GET_API_VERSION": 2148040960,
    "VDUSE_SET_API_VERSION": 1074299137,
    "VDUSE_CREATE_DEV": 1095794946,
    "VDUSE_DESTROY_DEV": 1090552067,
    "VDUSE_GET_FEATURES": 2148040964,
    "VDUSE_SET_FEATURES": 1074299141,
    "VDUSE_IOTLB_GET_FD": 3223355664,
    "VDUSE_DEV_GET_FEATURES": 2148040977,
    "VDUSE_DEV_SET_CONFIG": 1074299154,
    "VDUSE_DEV_INJECT_CONFIG_IRQ": 33043,
    "VDUSE_VQ_SETUP": 1075872020,
    "VDUSE_VQ_GET_INFO": 3224404245,
    "VDUSE_VQ_SETUP_KICKFD": 1074299158,
    "VDUSE_VQ_INJECT_IRQ": 1074037015,
    "VDUSE_IOTLB_REG_UMEM": 1076920600,
    "VDUSE_IOTLB_DEREG_UMEM": 1076920601,
    "VDUSE_IOTLB_GET_INFO": 3224404250,
    "VDUSE_IOTLB_GET_FD2": 3226501403,
}

SIZES = {
    "DEV_CONFIG": 336,
    "DEV_CONFIG_V1": 336,
    "IOTLB_ENTRY": 32,
    "IOTLB_ENTRY_V2": 80,
    "CONFIG_DATA_HEADER": 8,
    "VQ_CONFIG": 32,
    "VQ_CONFIG_V1": 32,
    "VQ_STATE_SPLIT": 2,
    "VQ_STATE_PACKED": 8,
    "VQ_STATE": 12,
    "VQ_INFO": 48,
    "VQ_EVENTFD": 8,
    "IOVA_UMEM": 48,
    "IOVA_UMEM_V1": 48,
    "IOVA_INFO": 48,
    "IOVA_INFO_V1": 48,
    "DEV_STATUS": 1,
    "IOVA_RANGE": 16,
    "IOVA_RANGE_V2": 24,
    "VQ_GROUP_ASID": 8,
    "VQ_READY": 8,
    "DEV_REQUEST": 152,
    "REQUEST_HEADER": 24,
    "DEV_RESPONSE": 152,
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_numbers(name: str) -> None:
    assert getattr(v, name) == REQUESTS[name] == REQUESTS_DEC[name]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_struct_sizes(name: str) -> None:
    assert getattr(v, name).size == SIZES[name]


def test_constants() -> None:
    assert v.VDUSE_BASE == 0x81
    assert v.VDUSE_API_VERSION == 0
    assert v.VDUSE_API_VERSION_1 == 1
    assert v.VDUSE_NAME_MAX == 256
    assert (v.VDUSE_ACCESS_RO, v.VDUSE_ACCESS_WO, v.VDUSE_ACCESS_RW) == (1, 2, 3)
    assert v.VDUSE_EVENTFD_DEASSIGN == -1
    assert v.VDUSE_IOVA_CAP_UMEM == 1
    assert (v.VDUSE_REQ_RESULT_OK, v.VDUSE_REQ_RESULT_FAILED) == (0, 1)
    assert v.MESSAGE_SIZE == 152
    assert v.DEV_CONFIG_HEADER_SIZE == 336
    assert [(m.name, m.value) for m in v.MsgType] == [
        ("GET_VQ_STATE", 0),
        ("SET_STATUS", 1),
        ("UPDATE_IOTLB", 2),
        ("SET_VQ_GROUP_ASID", 3),
        ("SET_VQ_READY", 4),
        ("SUSPEND", 5),
    ]
    assert (v.VDUSE_F_QUEUE_READY, v.VDUSE_F_SUSPEND) == (0, 1)
    assert v.API_VERSION_MAX == 1


def test_vduse_feature_names() -> None:
    assert v.vduse_feature_names(0) == []
    assert v.vduse_feature_names(0x3) == ["queue_ready", "suspend"]  # what 7.3 offers
    assert v.vduse_feature_names(0x6) == ["suspend", "bit2"]


# --------------------------------------------------------------------------------------
# ioctl encoding helpers
# --------------------------------------------------------------------------------------


def test_ioc_helpers() -> None:
    assert v.io(0x81, 0x13) == 0x8113
    assert v.ior(0x81, 0x00, 8) == 0x80088100
    assert v.iow(0x81, 0x01, 8) == 0x40088101
    assert v.iowr(0x81, 0x10, 32) == 0xC0208110
    assert v.ioc(v.IOC_READ | v.IOC_WRITE, 0x81, 0x15, 48) == 0xC0308115
    # the classic TCGETS-style sanity value from asm-generic: _IOR('T', 0x2A, 4)
    assert v.ior(ord("T"), 0x2A, 4) == 0x8004542A


@pytest.mark.parametrize(
    "args",
    [(4, 0x81, 0, 0), (0, 0x100, 0, 0), (0, 0x81, 0x100, 0), (0, 0x81, 0, 1 << 14), (0, 0, -1, 0)],
)
def test_ioc_rejects_out_of_range(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        v.ioc(*args)


# --------------------------------------------------------------------------------------
# DevConfig
# --------------------------------------------------------------------------------------


def test_dev_config_layout_and_roundtrip() -> None:
    cfg = bytes(range(96))
    dc = v.DevConfig("blk0", 0x1AF4, 2, (1 << 32) | (1 << 33), 1, 4096, cfg)
    raw = dc.pack()
    assert len(raw) == 336 + 96
    assert raw[:5] == b"blk0\0" and raw[4:256] == bytes(252)
    assert struct.unpack_from("<IIQII", raw, 256) == (0x1AF4, 2, (1 << 32) | (1 << 33), 1, 4096)
    assert raw[280:332] == bytes(52)  # reserved[13] (API 0) all zero
    assert struct.unpack_from("<I", raw, 332)[0] == 96  # config_size
    assert raw[336:] == cfg
    assert v.DevConfig.unpack(raw) == dc


def test_dev_config_api_1_groups_and_address_spaces() -> None:
    dc = v.DevConfig("blk0", 0, 2, 0, 1, 4096, b"", ngroups=1, nas=1)
    raw = dc.pack()
    assert struct.unpack_from("<II", raw, 280) == (1, 1)  # offsetof ngroups, nas (7.3)
    assert raw[288:332] == bytes(44)  # reserved[11]
    assert v.DevConfig.unpack(raw) == dc
    assert v.DevConfig.unpack(v.DevConfig("b", 0, 2, 0, 1, 4096, ngroups=2, nas=3).pack()).nas == 3


def test_dev_config_without_config() -> None:
    dc = v.DevConfig("x", 0, 2, 0, 1, 4096)
    raw = dc.pack()
    assert len(raw) == 336
    assert v.DevConfig.unpack(raw) == dc


def test_dev_config_unpack_short_config() -> None:
    raw = v.DevConfig("x", 0, 2, 0, 1, 4096, bytes(8)).pack()
    with pytest.raises(ValueError):
        v.DevConfig.unpack(raw[:-1])


@pytest.mark.parametrize("name", ["", "a\0b", "a" * 256, "é" * 128])
def test_dev_config_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        v.DevConfig(name, 0, 2, 0, 1, 4096)


@pytest.mark.parametrize("name", ["a", "a" * 255, "é" * 127, "vduse-blk.0"])
def test_dev_config_accepts_good_names(name: str) -> None:
    dc = v.DevConfig(name, 0, 2, 0, 1, 4096)
    assert v.DevConfig.unpack(dc.pack()).name == name


def test_name_buffer() -> None:
    buf = v.name_buffer("blk0")
    assert len(buf) == 256 and buf.startswith(b"blk0\0") and buf[4:] == bytes(252)
    with pytest.raises(ValueError):
        v.name_buffer("")


# --------------------------------------------------------------------------------------
# Device-fd structs
# --------------------------------------------------------------------------------------


def test_iotlb_entry() -> None:
    e = v.IotlbEntry(0x1000, 0x2000, 0x2FFF, v.VDUSE_ACCESS_RW)
    raw = e.pack()
    assert raw == struct.pack("<QQQB", 0x1000, 0x2000, 0x2FFF, 3) + bytes(7)
    assert v.IotlbEntry.unpack(raw) == e


def test_iotlb_entry_v2() -> None:
    e = v.IotlbEntryV2(1, 2, 3, v.VDUSE_ACCESS_RO, 7)
    raw = e.pack()
    assert len(raw) == 80  # sizeof(struct vduse_iotlb_entry_v2) in 7.3
    assert raw[:32] == v.IotlbEntry(1, 2, 3, 1).pack()
    assert struct.unpack_from("<I", raw, 32)[0] == 7  # offsetof asid
    assert raw[36:] == bytes(44)  # reserved[11]
    assert v.IotlbEntryV2.unpack(raw) == e
    assert e.entry == v.IotlbEntry(1, 2, 3, v.VDUSE_ACCESS_RO)


def test_vq_config() -> None:
    raw = v.VqConfig(3, 256).pack()
    assert raw == struct.pack("<IH", 3, 256) + bytes(26)
    assert v.VqConfig.unpack(raw) == v.VqConfig(3, 256)
    raw = v.VqConfig(3, 256, group=2).pack()  # API 1: offsetof group is 8
    assert raw == struct.pack("<IHHI", 3, 256, 0, 2) + bytes(20)
    assert v.VqConfig.unpack(raw) == v.VqConfig(3, 256, 2)


def test_vq_state_packed() -> None:
    s = v.VqStatePacked(1, 0x7FFF, 0, 5)
    assert s.pack() == struct.pack("<HHHH", 1, 0x7FFF, 0, 5)
    assert v.VqStatePacked.unpack(s.pack()) == s


def test_vq_info_unpack_both_views() -> None:
    raw = struct.pack("<IIQQQHHHHB", 1, 256, 0x10000, 0x11000, 0x12000, 1, 2, 1, 4, 1) + bytes(7)
    assert len(raw) == 48
    info = v.VqInfo.unpack(raw)
    assert info == v.VqInfo(
        index=1,
        num=256,
        desc_addr=0x10000,
        driver_addr=0x11000,
        device_addr=0x12000,
        avail_index=1,
        packed=v.VqStatePacked(1, 2, 1, 4),
        ready=True,
    )
    assert info.pack() == raw


def test_vq_info_pack_split_view() -> None:
    info = v.VqInfo(0, 128, 1, 2, 3, 42, v.VqStatePacked(0, 0, 0, 0), False)
    raw = info.pack()
    assert struct.unpack_from("<HHHH", raw, 32) == (42, 0, 0, 0)
    assert raw[40] == 0 and raw[41:] == bytes(7)
    back = v.VqInfo.unpack(raw)
    assert back.avail_index == 42 and back.packed == v.VqStatePacked(42, 0, 0, 0)


def test_vq_info_pack_inconsistent_views() -> None:
    with pytest.raises(ValueError):
        v.VqInfo(0, 128, 1, 2, 3, 42, v.VqStatePacked(1, 0, 1, 0), True).pack()


def test_vq_info_query() -> None:
    q = v.VqInfo.query(5)
    assert len(q) == 48 and struct.unpack_from("<I", q)[0] == 5 and q[4:] == bytes(44)


def test_vq_eventfd() -> None:
    assert v.VqEventfd(2, 17).pack() == struct.pack("<Ii", 2, 17)
    raw = v.VqEventfd(2, v.VDUSE_EVENTFD_DEASSIGN).pack()
    assert raw == b"\x02\0\0\0\xff\xff\xff\xff"
    assert v.VqEventfd.unpack(raw) == v.VqEventfd(2, -1)


def test_config_data() -> None:
    assert v.config_data(6, b"\x01\x00") == struct.pack("<II", 6, 2) + b"\x01\x00"
    with pytest.raises(ValueError):
        v.config_data(0, b"")


def test_iova_umem_and_info() -> None:
    u = v.IovaUmem(0x7F0000000000, 0, 64 << 20)
    raw = u.pack()
    assert raw == struct.pack("<QQQ", 0x7F0000000000, 0, 64 << 20) + bytes(24)
    assert v.IovaUmem.unpack(raw) == u
    i = v.IovaInfo(0, (64 << 20) - 1, v.VDUSE_IOVA_CAP_UMEM)
    raw = i.pack()
    assert raw == struct.pack("<QQQ", 0, (64 << 20) - 1, 1) + bytes(24)
    assert v.IovaInfo.unpack(raw) == i
    assert i.umem_capable and not v.IovaInfo(0, 0, 0).umem_capable
    # API 1: the address space in the first u32 of what was reserved (offsetof asid 24)
    assert v.IovaUmem(1, 0, 2, asid=3).pack()[24:] == struct.pack("<I", 3) + bytes(20)
    assert v.IovaInfo.unpack(v.IovaInfo(0, 1, 0, asid=2).pack()).asid == 2


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def _request(type_: int, rid: int, body: bytes) -> bytes:
    """A request as the kernel lays it out, built independently of the module."""
    return struct.pack("<II16x", type_, rid) + body.ljust(128, b"\0")


def test_request_set_status() -> None:
    r = v.Request.unpack(_request(1, 7, b"\x0f"))
    assert r == v.Request(v.MsgType.SET_STATUS, 7, 0, 0x0F, 0, 0, 0, 0)
    assert r.type is v.MsgType.SET_STATUS


def test_request_get_vq_state() -> None:
    r = v.Request.unpack(_request(0, 8, struct.pack("<I", 1)))
    assert r == v.Request(v.MsgType.GET_VQ_STATE, 8, 1, 0, 0, 0, 0, 0)


def test_request_update_iotlb() -> None:
    r = v.Request.unpack(_request(2, 9, struct.pack("<QQ", 0, 2**64 - 1)))
    assert r == v.Request(v.MsgType.UPDATE_IOTLB, 9, 0, 0, 0, 2**64 - 1, 0, 0)
    r = v.Request.unpack(_request(2, 9, struct.pack("<QQI", 0x1000, 0x1FFF, 1)))
    assert (r.iova_start, r.iova_last, r.asid) == (0x1000, 0x1FFF, 1)


def test_request_set_vq_group_asid() -> None:
    r = v.Request.unpack(_request(3, 10, struct.pack("<II", 2, 1)))
    assert r == v.Request(v.MsgType.SET_VQ_GROUP_ASID, 10, 0, 0, 0, 0, 1, 2)


def test_request_set_vq_ready_and_suspend() -> None:
    # struct vduse_vq_ready {u32 num; u32 ready;} at the body (offsetof ready: 28)
    r = v.Request.unpack(_request(4, 12, struct.pack("<II", 1, 1)))
    assert r == v.Request(v.MsgType.SET_VQ_READY, 12, vq_index=1, ready=True)
    assert not v.Request.unpack(_request(4, 12, struct.pack("<II", 0, 0))).ready
    assert v.Request.unpack(_request(5, 13, b"")) == v.Request(v.MsgType.SUSPEND, 13)


def test_request_unknown_type_does_not_raise() -> None:
    r = v.Request.unpack(_request(99, 11, b"\xff" * 128))
    assert r == v.Request(99, 11, 0, 0, 0, 0, 0, 0)
    assert not isinstance(r.type, v.MsgType)


def test_request_short_buffer() -> None:
    with pytest.raises(ValueError):
        v.Request.unpack(bytes(151))


@pytest.mark.parametrize(
    "req",
    [
        v.Request(v.MsgType.SET_STATUS, 1, status=0x0B),
        v.Request(v.MsgType.GET_VQ_STATE, 2, vq_index=1),
        v.Request(v.MsgType.UPDATE_IOTLB, 3, iova_start=5, iova_last=9),
        v.Request(v.MsgType.SET_VQ_GROUP_ASID, 4, group=1, asid=1),
        v.Request(v.MsgType.SET_VQ_READY, 6, vq_index=2, ready=True),
        v.Request(v.MsgType.SUSPEND, 7),
        v.Request(77, 5),
    ],
)
def test_request_pack_roundtrip(req: v.Request) -> None:
    raw = req.pack()
    assert len(raw) == 152 and raw[8:24] == bytes(16)
    assert v.Request.unpack(raw) == req


def test_response_plain_ok() -> None:
    raw = v.pack_response(7, v.VDUSE_REQ_RESULT_OK)
    assert raw == struct.pack("<II", 7, 0) + bytes(144)


def test_response_failed_reserved_zero() -> None:
    raw = v.pack_response(0xFFFFFFFF, v.VDUSE_REQ_RESULT_FAILED, vq_index=3, avail_index=9)
    assert len(raw) == 152
    assert raw[8:24] == bytes(16)  # reserved
    assert struct.unpack_from("<IIIH", raw) == (0xFFFFFFFF, 1, 0, 0)
    assert raw[36:] == bytes(116)


def test_response_split_state() -> None:
    raw = v.pack_response(1, 0, vq_index=1, avail_index=0x1234)
    assert struct.unpack_from("<IH", raw, 24) == (1, 0x1234)
    assert raw[30:] == bytes(122)
    resp = v.Response.unpack(raw)
    assert (resp.request_id, resp.result, resp.vq_index, resp.avail_index) == (1, 0, 1, 0x1234)


def test_response_packed_state() -> None:
    raw = v.pack_response(2, 0, vq_index=0, packed=v.VqStatePacked(1, 10, 0, 20))
    assert struct.unpack_from("<IHHHH", raw, 24) == (0, 1, 10, 0, 20)
    assert raw[8:24] == bytes(16) and raw[36:] == bytes(116)
    assert v.Response.unpack(raw).packed == v.VqStatePacked(1, 10, 0, 20)


def test_response_both_states_rejected() -> None:
    with pytest.raises(ValueError):
        v.pack_response(1, 0, avail_index=1, packed=v.VqStatePacked(1, 0, 1, 0))


def test_response_unpack_rejects_reserved() -> None:
    raw = bytearray(v.pack_response(1, 0))
    raw[8] = 1
    with pytest.raises(ValueError):
        v.Response.unpack(bytes(raw))


# --------------------------------------------------------------------------------------
# Cross-check against the installed C header
# --------------------------------------------------------------------------------------

HEADER = Path("/usr/include/linux/vduse.h")
C_OPTIONAL_REQUESTS = ("VDUSE_IOTLB_GET_FD2", "VDUSE_GET_FEATURES", "VDUSE_SET_FEATURES")

# expression -> expected Python value
C_EXPRS: dict[str, int] = {
    "sizeof(struct vduse_dev_config)": v.DEV_CONFIG.size,
    "offsetof(struct vduse_dev_config, vendor_id)": 256,
    "offsetof(struct vduse_dev_config, features)": 264,
    "offsetof(struct vduse_dev_config, vq_num)": 272,
    "offsetof(struct vduse_dev_config, config_size)": 332,
    "offsetof(struct vduse_dev_config, config)": v.DEV_CONFIG_HEADER_SIZE,
    "sizeof(struct vduse_iotlb_entry)": v.IOTLB_ENTRY.size,
    "offsetof(struct vduse_iotlb_entry, perm)": 24,
    "sizeof(struct vduse_config_data)": v.CONFIG_DATA_HEADER.size,
    "sizeof(struct vduse_vq_config)": v.VQ_CONFIG.size,
    "sizeof(struct vduse_vq_state_split)": v.VQ_STATE_SPLIT.size,
    "sizeof(struct vduse_vq_state_packed)": v.VQ_STATE_PACKED.size,
    "sizeof(struct vduse_vq_state)": v.VQ_STATE.size,
    "sizeof(struct vduse_vq_info)": v.VQ_INFO.size,
    "offsetof(struct vduse_vq_info, split)": 32,
    "offsetof(struct vduse_vq_info, packed.last_used_idx)": 38,
    "offsetof(struct vduse_vq_info, ready)": 40,
    "sizeof(struct vduse_vq_eventfd)": v.VQ_EVENTFD.size,
    "sizeof(struct vduse_iova_umem)": v.IOVA_UMEM.size,
    "sizeof(struct vduse_iova_info)": v.IOVA_INFO.size,
    "sizeof(struct vduse_dev_status)": v.DEV_STATUS.size,
    "sizeof(struct vduse_iova_range)": v.IOVA_RANGE.size,
    "sizeof(struct vduse_dev_request)": v.MESSAGE_SIZE,
    "offsetof(struct vduse_dev_request, vq_state)": v.REQUEST_BODY_OFFSET,
    "offsetof(struct vduse_dev_request, iova.last)": 32,
    "sizeof(struct vduse_dev_response)": v.MESSAGE_SIZE,
    "offsetof(struct vduse_dev_response, vq_state.split.avail_index)": 28,
    "VDUSE_BASE": v.VDUSE_BASE,
    "VDUSE_API_VERSION": v.VDUSE_API_VERSION,
    "VDUSE_NAME_MAX": v.VDUSE_NAME_MAX,
    "VDUSE_ACCESS_RO": v.VDUSE_ACCESS_RO,
    "VDUSE_ACCESS_WO": v.VDUSE_ACCESS_WO,
    "VDUSE_ACCESS_RW": v.VDUSE_ACCESS_RW,
    "VDUSE_EVENTFD_DEASSIGN": v.VDUSE_EVENTFD_DEASSIGN,
    "VDUSE_IOVA_CAP_UMEM": v.VDUSE_IOVA_CAP_UMEM,
    "VDUSE_REQ_RESULT_OK": v.VDUSE_REQ_RESULT_OK,
    "VDUSE_REQ_RESULT_FAILED": v.VDUSE_REQ_RESULT_FAILED,
    "VDUSE_GET_VQ_STATE": v.MsgType.GET_VQ_STATE,
    "VDUSE_SET_STATUS": v.MsgType.SET_STATUS,
    "VDUSE_UPDATE_IOTLB": v.MsgType.UPDATE_IOTLB,
    **{name: getattr(v, name) for name in REQUESTS if name not in C_OPTIONAL_REQUESTS},
}
# Only in 7.x headers; guarded with #ifdef.
C_OPTIONAL: dict[str, int] = {
    **{name: getattr(v, name) for name in C_OPTIONAL_REQUESTS},
    "VDUSE_API_VERSION_1": v.VDUSE_API_VERSION_1,
    "VDUSE_F_QUEUE_READY": v.VDUSE_F_QUEUE_READY,
    "VDUSE_F_SUSPEND": v.VDUSE_F_SUSPEND,
}


# Where the header speaks API 0 only, what follows vq_align is reserved[13]; API 1 (7.x)
# put ngroups and nas there, and the asid fields; VDUSE_F_* came with their messages.
V0_ONLY = "!defined(VDUSE_API_VERSION_1)"
V1 = "defined(VDUSE_API_VERSION_1)"
F = "defined(VDUSE_F_QUEUE_READY)"
C_GUARDED: dict[str, dict[str, int]] = {
    V0_ONLY: {"offsetof(struct vduse_dev_config, reserved[0])": 280},
    V1: {
        "offsetof(struct vduse_dev_config, ngroups)": 280,
        "offsetof(struct vduse_dev_config, nas)": 284,
        "offsetof(struct vduse_dev_config, reserved)": 288,
        "offsetof(struct vduse_vq_config, group)": 8,
        "sizeof(struct vduse_iotlb_entry_v2)": v.IOTLB_ENTRY_V2.size,
        "offsetof(struct vduse_iotlb_entry_v2, asid)": 32,
        "offsetof(struct vduse_iova_umem, asid)": 24,
        "offsetof(struct vduse_iova_info, asid)": 24,
        "sizeof(struct vduse_iova_range_v2)": v.IOVA_RANGE_V2.size,
        "offsetof(struct vduse_dev_request, iova_v2.asid)": 40,
        "offsetof(struct vduse_dev_request, vq_group_asid.asid)": 28,
        "VDUSE_SET_VQ_GROUP_ASID": v.MsgType.SET_VQ_GROUP_ASID,
    },
    F: {
        "sizeof(struct vduse_vq_ready)": v.VQ_READY.size,
        "offsetof(struct vduse_dev_request, vq_ready.ready)": 28,
        "VDUSE_SET_VQ_READY": v.MsgType.SET_VQ_READY,
        "VDUSE_SUSPEND": v.MsgType.SUSPEND,
    },
}


def _check_header(tmp_path: Path, include: Path | None = None) -> dict[str, int]:
    guarded = {cond: list(exprs) for cond, exprs in C_GUARDED.items()}
    got = c_values(tmp_path, "linux/vduse.h", list(C_EXPRS), list(C_OPTIONAL), guarded, include)
    expected = {**C_EXPRS, **{k: val for k, val in C_OPTIONAL.items() if k in got}}
    for exprs in C_GUARDED.values():
        expected.update({k: val for k, val in exprs.items() if k in got})
    mismatches = {k: (got[k], val) for k, val in expected.items() if got[k] != val}
    assert not mismatches, f"C value vs Python value: {mismatches}"
    return got


@pytest.mark.skipif(shutil.which("gcc") is None or not HEADER.exists(), reason="needs gcc and linux/vduse.h")
def test_against_c_header(tmp_path: Path) -> None:
    _check_header(tmp_path)


UAPI_7 = os.environ.get("PYVDUSE_UAPI_7_INCLUDE")


@pytest.mark.skipif(
    shutil.which("gcc") is None or not UAPI_7,
    reason="set PYVDUSE_UAPI_7_INCLUDE to the usr/include of Debian's linux-libc-dev 7.3",
)
def test_against_a_linux_7_header(tmp_path: Path) -> None:
    """The API-1 layouts against a 7.x header (checked with trixie-backports' 7.3.4)."""
    assert UAPI_7
    got = _check_header(tmp_path, Path(UAPI_7))
    for cond in (V1, F):
        assert set(C_GUARDED[cond]) <= set(got), f"{UAPI_7}/linux/vduse.h lacks what {cond} guards"
    assert set(C_OPTIONAL) <= set(got)
