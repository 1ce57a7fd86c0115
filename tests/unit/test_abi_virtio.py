"""Pin the virtio ABI modules (virtio, virtio_blk, virtio_net) to the reference and C headers.

Literal values come from shared/reference/vduse-uapi.md section 6. The C cross-check at the
end compiles against whatever kernel headers are installed (Debian 12 has 6.1 ones) and
compares only what those headers define.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvduse.abi import virtio as vio
from pyvduse.abi import virtio_blk as vb
from pyvduse.abi import virtio_net as vn

# --------------------------------------------------------------------------------------
# virtio core
# --------------------------------------------------------------------------------------


def test_status_and_ids() -> None:
    assert [(s.name, s.value) for s in vio.Status] == [
        ("ACKNOWLEDGE", 1),
        ("DRIVER", 2),
        ("DRIVER_OK", 4),
        ("FEATURES_OK", 8),
        ("DEVICE_NEEDS_RESET", 0x40),
        ("FAILED", 0x80),
    ]
    assert (vio.DeviceId.NET, vio.DeviceId.BLOCK, vio.DeviceId.FS) == (1, 2, 26)


def test_transport_bits() -> None:
    assert (vio.F_NOTIFY_ON_EMPTY, vio.F_ANY_LAYOUT) == (24, 27)
    assert (vio.F_RING_INDIRECT_DESC, vio.F_RING_EVENT_IDX) == (28, 29)
    assert (vio.F_VERSION_1, vio.F_ACCESS_PLATFORM, vio.F_RING_PACKED, vio.F_IN_ORDER) == (
        32,
        33,
        34,
        35,
    )
    assert (vio.F_ORDER_PLATFORM, vio.F_SR_IOV, vio.F_NOTIFICATION_DATA) == (36, 37, 38)
    assert (vio.F_NOTIF_CONFIG_DATA, vio.F_RING_RESET, vio.F_ADMIN_VQ) == (39, 40, 41)
    assert (vio.TRANSPORT_F_START, vio.TRANSPORT_F_END) == (28, 42)
    assert vio.bit(33) == 0x2_0000_0000
    assert vio.has((1 << 32) | (1 << 33), vio.F_ACCESS_PLATFORM)
    assert not vio.has(1 << 32, vio.F_RING_PACKED)


def test_ring_constants_and_layouts() -> None:
    assert (vio.VRING_DESC_F_NEXT, vio.VRING_DESC_F_WRITE, vio.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert (vio.VRING_PACKED_DESC_F_AVAIL, vio.VRING_PACKED_DESC_F_USED) == (7, 15)
    assert vio.VRING_PACKED_EVENT_F_WRAP_CTR == 15
    assert (
        vio.VRING_PACKED_EVENT_FLAG_ENABLE,
        vio.VRING_PACKED_EVENT_FLAG_DISABLE,
        vio.VRING_PACKED_EVENT_FLAG_DESC,
    ) == (0, 1, 2)
    assert vio.VRING_AVAIL_F_NO_INTERRUPT == 1 and vio.VRING_USED_F_NO_NOTIFY == 1
    assert vio.VRING_DESC.size == vio.VRING_PACKED_DESC.size == vio.DESC_SIZE == 16
    assert vio.VRING_USED_ELEM.size == vio.USED_ELEM_SIZE == 8
    assert vio.VRING_PACKED_DESC_EVENT.size == 4
    assert vio.VRING_DESC.pack(0x1000, 512, 3, 7) == struct.pack("<QIHH", 0x1000, 512, 3, 7)


def test_ring_sizes() -> None:
    assert vio.desc_table_size(256) == 4096
    assert vio.avail_ring_size(256) == 4 + 512 + 2
    assert vio.avail_ring_size(256, event_idx=False) == 4 + 512
    assert vio.used_ring_size(256) == 4 + 2048 + 2
    assert vio.used_ring_size(256, event_idx=False) == 4 + 2048


def test_need_event() -> None:
    assert vio.need_event(event_idx=5, new_idx=6, old_idx=5)
    assert not vio.need_event(event_idx=6, new_idx=6, old_idx=5)
    assert vio.need_event(event_idx=0xFFFF, new_idx=1, old_idx=0xFFFE)  # wraps
    assert not vio.need_event(event_idx=10, new_idx=3, old_idx=1)


# --------------------------------------------------------------------------------------
# virtio-blk
# --------------------------------------------------------------------------------------

BLK_FEATURES = {
    "BARRIER": 0,
    "SIZE_MAX": 1,
    "SEG_MAX": 2,
    "GEOMETRY": 4,
    "RO": 5,
    "BLK_SIZE": 6,
    "SCSI": 7,
    "FLUSH": 9,
    "TOPOLOGY": 10,
    "CONFIG_WCE": 11,
    "MQ": 12,
    "DISCARD": 13,
    "WRITE_ZEROES": 14,
    "LIFETIME": 15,
    "SECURE_ERASE": 16,
    "ZONED": 17,
}

BLK_TYPES = {
    "IN": 0,
    "OUT": 1,
    "SCSI_CMD": 2,
    "FLUSH": 4,
    "GET_ID": 8,
    "GET_LIFETIME": 10,
    "DISCARD": 11,
    "WRITE_ZEROES": 13,
    "SECURE_ERASE": 14,
    "ZONE_APPEND": 15,
    "ZONE_REPORT": 16,
    "ZONE_OPEN": 18,
    "ZONE_CLOSE": 20,
    "ZONE_FINISH": 22,
    "ZONE_RESET": 24,
    "ZONE_RESET_ALL": 26,
}

BLK_STATUS = {
    "OK": 0,
    "IOERR": 1,
    "UNSUPP": 2,
    "ZONE_INVALID_CMD": 3,
    "ZONE_UNALIGNED_WP": 4,
    "ZONE_OPEN_RESOURCE": 5,
    "ZONE_ACTIVE_RESOURCE": 6,
}

# (Python field, C member, offset, size) of struct virtio_blk_config, from the reference.
BLK_CONFIG_FIELDS = [
    ("capacity", "capacity", 0, 8),
    ("size_max", "size_max", 8, 4),
    ("seg_max", "seg_max", 12, 4),
    ("cylinders", "geometry.cylinders", 16, 2),
    ("heads", "geometry.heads", 18, 1),
    ("sectors", "geometry.sectors", 19, 1),
    ("blk_size", "blk_size", 20, 4),
    ("physical_block_exp", "physical_block_exp", 24, 1),
    ("alignment_offset", "alignment_offset", 25, 1),
    ("min_io_size", "min_io_size", 26, 2),
    ("opt_io_size", "opt_io_size", 28, 4),
    ("wce", "wce", 32, 1),
    ("num_queues", "num_queues", 34, 2),
    ("max_discard_sectors", "max_discard_sectors", 36, 4),
    ("max_discard_seg", "max_discard_seg", 40, 4),
    ("discard_sector_alignment", "discard_sector_alignment", 44, 4),
    ("max_write_zeroes_sectors", "max_write_zeroes_sectors", 48, 4),
    ("max_write_zeroes_seg", "max_write_zeroes_seg", 52, 4),
    ("write_zeroes_may_unmap", "write_zeroes_may_unmap", 56, 1),
    ("max_secure_erase_sectors", "max_secure_erase_sectors", 60, 4),
    ("max_secure_erase_seg", "max_secure_erase_seg", 64, 4),
    ("secure_erase_sector_alignment", "secure_erase_sector_alignment", 68, 4),
]
BLK_ZONED_FIELDS = [
    ("zone_sectors", "zoned.zone_sectors", 72, 4),
    ("max_open_zones", "zoned.max_open_zones", 76, 4),
    ("max_active_zones", "zoned.max_active_zones", 80, 4),
    ("max_append_sectors", "zoned.max_append_sectors", 84, 4),
    ("write_granularity", "zoned.write_granularity", 88, 4),
    ("zoned_model", "zoned.model", 92, 1),
]


def test_blk_constants() -> None:
    assert {k: getattr(vb, f"F_{k}") for k in BLK_FEATURES} == BLK_FEATURES
    assert {t.name: t.value for t in vb.ReqType} == BLK_TYPES
    assert {s.name: s.value for s in vb.ReqStatus} == BLK_STATUS
    assert vb.T_BARRIER == 0x80000000
    assert vb.WRITE_ZEROES_FLAG_UNMAP == 1
    assert (vb.SECTOR_SIZE, vb.SECTOR_SHIFT, vb.ID_BYTES) == (512, 9, 20)
    assert vb.OUTHDR.size == 16 and vb.DISCARD_SEGMENT.size == 16
    assert vb.CONFIG.size == vb.CONFIG_SIZE == 96
    assert vb.CONFIG_SIZE_NO_ZONED == 72
    assert vb.CAPACITY_OFFSET == 0


@pytest.mark.parametrize("field", BLK_CONFIG_FIELDS + BLK_ZONED_FIELDS, ids=lambda f: f[0])
def test_blk_config_field_offsets(field: tuple[str, str, int, int]) -> None:
    name, _, offset, size = field
    value = int.from_bytes(bytes(range(0x11, 0x11 + size)), "little")
    raw = vb.BlkConfig(**{name: value}).pack()
    assert len(raw) == 96
    assert raw[offset : offset + size] == value.to_bytes(size, "little")
    assert raw[:offset] + raw[offset + size :] == bytes(96 - size)


def test_blk_config_roundtrip_and_short_buffer() -> None:
    cfg = vb.BlkConfig(capacity=2048, blk_size=4096, seg_max=126, num_queues=1, zoned_model=2)
    assert vb.BlkConfig.unpack(cfg.pack()) == cfg
    assert vb.BlkConfig.unpack(cfg.pack()[:72]) == vb.BlkConfig(
        capacity=2048, blk_size=4096, seg_max=126, num_queues=1
    )
    assert vb.BlkConfig.unpack(struct.pack("<Q", 99)).capacity == 99


def test_blk_request_structs() -> None:
    assert vb.OUTHDR.pack(vb.ReqType.OUT, 0, 8) == struct.pack("<IIQ", 1, 0, 8)
    assert vb.DISCARD_SEGMENT.pack(8, 16, 1) == struct.pack("<QII", 8, 16, 1)


# --------------------------------------------------------------------------------------
# virtio-net
# --------------------------------------------------------------------------------------

NET_FEATURES = {
    "CSUM": 0,
    "GUEST_CSUM": 1,
    "CTRL_GUEST_OFFLOADS": 2,
    "MTU": 3,
    "MAC": 5,
    "GSO": 6,
    "GUEST_TSO4": 7,
    "GUEST_TSO6": 8,
    "GUEST_ECN": 9,
    "GUEST_UFO": 10,
    "HOST_TSO4": 11,
    "HOST_TSO6": 12,
    "HOST_ECN": 13,
    "HOST_UFO": 14,
    "MRG_RXBUF": 15,
    "STATUS": 16,
    "CTRL_VQ": 17,
    "CTRL_RX": 18,
    "CTRL_VLAN": 19,
    "CTRL_RX_EXTRA": 20,
    "GUEST_ANNOUNCE": 21,
    "MQ": 22,
    "CTRL_MAC_ADDR": 23,
    "DEVICE_STATS": 50,
    "VQ_NOTF_COAL": 52,
    "NOTF_COAL": 53,
    "GUEST_USO4": 54,
    "GUEST_USO6": 55,
    "HOST_USO": 56,
    "HASH_REPORT": 57,
    "GUEST_HDRLEN": 59,
    "RSS": 60,
    "RSC_EXT": 61,
    "STANDBY": 62,
    "SPEED_DUPLEX": 63,
    "RSS_CONTEXT": 64,
    "GUEST_UDP_TUNNEL_GSO": 65,
    "GUEST_UDP_TUNNEL_GSO_CSUM": 66,
    "HOST_UDP_TUNNEL_GSO": 67,
    "HOST_UDP_TUNNEL_GSO_CSUM": 68,
}

NET_HDR_FLAGS = {"NEEDS_CSUM": 1, "DATA_VALID": 2, "RSC_INFO": 4, "UDP_TUNNEL_CSUM": 8}
NET_GSO = {
    "NONE": 0,
    "TCPV4": 1,
    "UDP": 3,
    "TCPV6": 4,
    "UDP_L4": 5,
    "UDP_TUNNEL_IPV4": 0x20,
    "UDP_TUNNEL_IPV6": 0x40,
    "ECN": 0x80,
}

# (Python field, offset, size) of struct virtio_net_config.
NET_CONFIG_FIELDS = [
    ("status", 6, 2),
    ("max_virtqueue_pairs", 8, 2),
    ("mtu", 10, 2),
    ("speed", 12, 4),
    ("duplex", 16, 1),
    ("rss_max_key_size", 17, 1),
    ("rss_max_indirection_table_length", 18, 2),
    ("supported_hash_types", 20, 4),
]
NET_HDR_FIELDS = [
    ("flags", 0),
    ("gso_type", 1),
    ("hdr_len", 2),
    ("gso_size", 4),
    ("csum_start", 6),
    ("csum_offset", 8),
    ("num_buffers", 10),
]


def test_net_constants() -> None:
    found = {k[2:]: getattr(vn, k) for k in dir(vn) if k.startswith("F_")}
    assert found == NET_FEATURES
    assert {k: getattr(vn, f"HDR_F_{k}") for k in NET_HDR_FLAGS} == NET_HDR_FLAGS
    assert {k: getattr(vn, f"HDR_GSO_{k}") for k in NET_GSO} == NET_GSO
    assert (vn.S_LINK_UP, vn.S_ANNOUNCE) == (1, 2)
    assert (vn.RX_QUEUE, vn.TX_QUEUE, vn.NUM_QUEUES) == (0, 1, 2)
    assert vn.CONFIG.size == vn.CONFIG_SIZE == 24
    assert vn.NET_HDR_V1.size == vn.NET_HDR_V1_SIZE == 12
    assert vn.NET_HDR_V1.format == "<BBHHHHH"
    assert vn.NET_HDR_LEGACY.size == 10
    assert vn.NET_HDR_V1_HASH.size == 20
    assert (vn.STATUS_OFFSET, vn.MTU_OFFSET, vn.SPEED_OFFSET, vn.DUPLEX_OFFSET) == (6, 10, 12, 16)


def test_cvq_dependent_features() -> None:
    must = {18, 19, 21, 22, 23, 60, 57, 53, 52}  # virtnet_validate_features() refuses these
    assert must <= vn.CVQ_DEPENDENT_FEATURES
    assert {2, 20} <= vn.CVQ_DEPENDENT_FEATURES  # spec: require CTRL_VQ
    assert vn.F_CTRL_VQ not in vn.CVQ_DEPENDENT_FEATURES
    usable = {0, 1, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 54, 55, 56, 59, 63}
    assert not usable & vn.CVQ_DEPENDENT_FEATURES
    refused = vn.CVQ_DEPENDENT_FEATURES | {17}
    assert refused == vn.VDUSE_REFUSED_FEATURES
    mask = sum(1 << b for b in refused)
    assert mask == vn.VDUSE_REFUSED_MASK
    assert vn.VDUSE_REFUSED_MASK < 1 << 64


@pytest.mark.parametrize("field", NET_CONFIG_FIELDS, ids=lambda f: f[0])
def test_net_config_field_offsets(field: tuple[str, int, int]) -> None:
    name, offset, size = field
    value = int.from_bytes(bytes(range(0x21, 0x21 + size)), "little")
    raw = vn.NetConfig(**{name: value}).pack()  # type: ignore[arg-type]
    assert len(raw) == 24
    assert raw[offset : offset + size] == value.to_bytes(size, "little")
    assert raw[:offset] + raw[offset + size :] == bytes(24 - size)


def test_net_config_roundtrip() -> None:
    cfg = vn.NetConfig(
        mac=bytes.fromhex("525400123456"),
        status=vn.S_LINK_UP,
        mtu=1500,
        speed=10000,
        duplex=vn.DUPLEX_FULL,
    )
    raw = cfg.pack()
    assert raw[:6] == bytes.fromhex("525400123456")
    assert vn.NetConfig.unpack(raw) == cfg
    assert vn.NetConfig.unpack(raw[:8]) == vn.NetConfig(mac=cfg.mac, status=1)


@pytest.mark.parametrize("mac", [b"", bytes(5), bytes(7)])
def test_net_config_rejects_bad_mac(mac: bytes) -> None:
    with pytest.raises(ValueError):
        vn.NetConfig(mac=mac).pack()


def test_net_header() -> None:
    raw = vn.NET_HDR_V1.pack(vn.HDR_F_NEEDS_CSUM, vn.HDR_GSO_TCPV4, 54, 1448, 34, 16, 1)
    for (_, offset), value in zip(NET_HDR_FIELDS, (1, 1, 54, 1448, 34, 16, 1), strict=True):
        size = 1 if offset < 2 else 2
        assert int.from_bytes(raw[offset : offset + size], "little") == value


# --------------------------------------------------------------------------------------
# Cross-check against the installed C headers
# --------------------------------------------------------------------------------------

HEADERS = [
    Path("/usr/include/linux/virtio_ring.h"),
    Path("/usr/include/linux/virtio_blk.h"),
    Path("/usr/include/linux/virtio_net.h"),
    Path("/usr/include/linux/virtio_config.h"),
]

# (C preprocessor guard or "", C expression, Python value)
Check = tuple[str, str, int]


def _checks() -> list[Check]:
    out: list[Check] = [
        ("", "sizeof(struct vring_desc)", vio.VRING_DESC.size),
        ("", "sizeof(struct vring_used_elem)", vio.VRING_USED_ELEM.size),
        ("", "sizeof(struct vring_packed_desc)", vio.VRING_PACKED_DESC.size),
        ("", "sizeof(struct vring_packed_desc_event)", vio.VRING_PACKED_DESC_EVENT.size),
        ("", "VRING_DESC_F_NEXT", vio.VRING_DESC_F_NEXT),
        ("", "VRING_DESC_F_WRITE", vio.VRING_DESC_F_WRITE),
        ("", "VRING_DESC_F_INDIRECT", vio.VRING_DESC_F_INDIRECT),
        ("", "VRING_PACKED_DESC_F_AVAIL", vio.VRING_PACKED_DESC_F_AVAIL),
        ("", "VRING_PACKED_DESC_F_USED", vio.VRING_PACKED_DESC_F_USED),
        ("", "VRING_PACKED_EVENT_F_WRAP_CTR", vio.VRING_PACKED_EVENT_F_WRAP_CTR),
        ("", "VRING_PACKED_EVENT_FLAG_ENABLE", vio.VRING_PACKED_EVENT_FLAG_ENABLE),
        ("", "VRING_PACKED_EVENT_FLAG_DISABLE", vio.VRING_PACKED_EVENT_FLAG_DISABLE),
        ("", "VRING_PACKED_EVENT_FLAG_DESC", vio.VRING_PACKED_EVENT_FLAG_DESC),
        ("", "VRING_AVAIL_F_NO_INTERRUPT", vio.VRING_AVAIL_F_NO_INTERRUPT),
        ("", "VRING_USED_F_NO_NOTIFY", vio.VRING_USED_F_NO_NOTIFY),
        ("", "VIRTIO_RING_F_INDIRECT_DESC", vio.F_RING_INDIRECT_DESC),
        ("", "VIRTIO_RING_F_EVENT_IDX", vio.F_RING_EVENT_IDX),
        ("", "VIRTIO_TRANSPORT_F_START", vio.TRANSPORT_F_START),
        # END moved from 41 to 42 when ADMIN_VQ (41) was added; compare only then.
        ("defined(VIRTIO_F_ADMIN_VQ)", "VIRTIO_TRANSPORT_F_END", vio.TRANSPORT_F_END),
        ("", "sizeof(struct virtio_blk_outhdr)", vb.OUTHDR.size),
        ("", "sizeof(struct virtio_blk_discard_write_zeroes)", vb.DISCARD_SEGMENT.size),
        ("", "VIRTIO_BLK_ID_BYTES", vb.ID_BYTES),
        ("", "VIRTIO_BLK_T_BARRIER", vb.T_BARRIER),
        ("", "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", vb.WRITE_ZEROES_FLAG_UNMAP),
        # The 96-byte 6.12 layout only where the header has the zoned fields; else 72.
        ("defined(VIRTIO_BLK_F_ZONED)", "sizeof(struct virtio_blk_config)", vb.CONFIG_SIZE),
        (
            "!defined(VIRTIO_BLK_F_ZONED)",
            "sizeof(struct virtio_blk_config)",
            vb.CONFIG_SIZE_NO_ZONED,
        ),
        ("", "sizeof(struct virtio_net_config)", vn.CONFIG.size),
        ("", "sizeof(struct virtio_net_hdr_v1)", vn.NET_HDR_V1.size),
        ("", "sizeof(struct virtio_net_hdr_v1_hash)", vn.NET_HDR_V1_HASH.size),
        ("", "sizeof(struct virtio_net_hdr)", vn.NET_HDR_LEGACY.size),
        ("", "sizeof(struct virtio_net_hdr_mrg_rxbuf)", vn.NET_HDR_V1.size),
        ("", "VIRTIO_NET_S_LINK_UP", vn.S_LINK_UP),
        ("", "VIRTIO_NET_S_ANNOUNCE", vn.S_ANNOUNCE),
        ("", "offsetof(struct virtio_net_config, mac)", 0),
    ]
    for _, cmember, offset, _ in BLK_CONFIG_FIELDS:
        out.append(("", f"offsetof(struct virtio_blk_config, {cmember})", offset))
    for _, cmember, offset, _ in BLK_ZONED_FIELDS:
        expr = f"offsetof(struct virtio_blk_config, {cmember})"
        out.append(("defined(VIRTIO_BLK_F_ZONED)", expr, offset))
    for name, offset, _ in NET_CONFIG_FIELDS:
        out.append(("", f"offsetof(struct virtio_net_config, {name})", offset))
    for name, offset in NET_HDR_FIELDS:
        out.append(("", f"offsetof(struct virtio_net_hdr_v1, {name})", offset))
    for name, value in BLK_FEATURES.items():
        out.append((f"defined(VIRTIO_BLK_F_{name})", f"VIRTIO_BLK_F_{name}", value))
    for name, value in BLK_TYPES.items():
        out.append((f"defined(VIRTIO_BLK_T_{name})", f"VIRTIO_BLK_T_{name}", value))
    for name, value in BLK_STATUS.items():
        out.append((f"defined(VIRTIO_BLK_S_{name})", f"VIRTIO_BLK_S_{name}", value))
    for name, value in NET_FEATURES.items():
        out.append((f"defined(VIRTIO_NET_F_{name})", f"VIRTIO_NET_F_{name}", value))
    for name, value in NET_HDR_FLAGS.items():
        out.append((f"defined(VIRTIO_NET_HDR_F_{name})", f"VIRTIO_NET_HDR_F_{name}", value))
    for name, value in NET_GSO.items():
        out.append((f"defined(VIRTIO_NET_HDR_GSO_{name})", f"VIRTIO_NET_HDR_GSO_{name}", value))
    for name in (
        "NOTIFY_ON_EMPTY",
        "ANY_LAYOUT",
        "VERSION_1",
        "ACCESS_PLATFORM",
        "RING_PACKED",
        "IN_ORDER",
        "ORDER_PLATFORM",
        "SR_IOV",
        "NOTIFICATION_DATA",
        "NOTIF_CONFIG_DATA",
        "RING_RESET",
        "ADMIN_VQ",
    ):
        out.append((f"defined(VIRTIO_F_{name})", f"VIRTIO_F_{name}", getattr(vio, f"F_{name}")))
    for status in vio.Status:
        cname = "NEEDS_RESET" if status.name == "DEVICE_NEEDS_RESET" else status.name
        out.append(("", f"VIRTIO_CONFIG_S_{cname}", int(status)))
    return out


def _c_values(tmp: Path, checks: list[Check]) -> dict[int, int]:
    """Compile and run a program printing each check's C value, keyed by check index."""
    lines = ["#include <stdio.h>", "#include <stddef.h>"]
    lines += [f"#include <linux/{h.name}>" for h in HEADERS]
    lines.append('#define P(i, x) printf("%d|%lld\\n", i, (long long)(x));')
    lines.append("int main(void) {")
    for i, (guard, expr, _) in enumerate(checks):
        if guard:
            lines += [f"#if {guard}", f"P({i}, {expr})", "#endif"]
        else:
            lines.append(f"P({i}, {expr})")
    lines += ["return 0;", "}"]
    src = tmp / "virtio_check.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp / "virtio_check"
    cc = subprocess.run(["gcc", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {int(i): int(val) for i, val in (ln.split("|") for ln in out.splitlines())}


@pytest.mark.skipif(
    shutil.which("gcc") is None or not all(h.exists() for h in HEADERS),
    reason="needs gcc and the linux virtio headers",
)
def test_against_c_headers(tmp_path: Path) -> None:
    checks = _checks()
    got = _c_values(tmp_path, checks)
    # Every unguarded check was compiled in, and so were the core guarded ones.
    assert {i for i, (guard, _, _) in enumerate(checks) if not guard} <= set(got)
    compared = {checks[i][1] for i in got}
    assert {"VIRTIO_NET_F_CSUM", "VIRTIO_BLK_F_SECURE_ERASE", "VIRTIO_F_VERSION_1"} <= compared
    assert "sizeof(struct virtio_blk_config)" in compared
    mismatches = {checks[i][1]: (value, checks[i][2]) for i, value in got.items() if value != checks[i][2]}
    assert not mismatches, f"C value vs Python value: {mismatches}"
