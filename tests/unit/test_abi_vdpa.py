"""vdpa netlink ABI constants and the pyroute2-based client, without a kernel.

Messages are checked at the byte level (nlmsghdr + genlmsghdr + NLAs) by a parser written
here, so the test does not trust pyroute2's own decoder to agree with its encoder.
"""

from __future__ import annotations

import errno
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError

from pyvduse.abi import vdpa
from pyvduse.abi.vdpa import VdpaAttr, VdpaCmd
from pyvduse.transport.kernel import vdpa_netlink as nl

CMDS = {
    "UNSPEC": 0,
    "MGMTDEV_NEW": 1,
    "MGMTDEV_GET": 2,
    "DEV_NEW": 3,
    "DEV_DEL": 4,
    "DEV_GET": 5,
    "DEV_CONFIG_GET": 6,
    "DEV_VSTATS_GET": 7,
    "DEV_ATTR_SET": 8,
}

STABLE_ATTRS = {
    "UNSPEC": 0,
    "MGMTDEV_BUS_NAME": 1,
    "MGMTDEV_DEV_NAME": 2,
    "MGMTDEV_SUPPORTED_CLASSES": 3,
    "DEV_NAME": 4,
    "DEV_ID": 5,
    "DEV_VENDOR_ID": 6,
    "DEV_MAX_VQS": 7,
    "DEV_MAX_VQ_SIZE": 8,
    "DEV_MIN_VQ_SIZE": 9,
    "DEV_NET_CFG_MACADDR": 10,
    "DEV_NET_STATUS": 11,
    "DEV_NET_CFG_MAX_VQP": 12,
    "DEV_NET_CFG_MTU": 13,
    "DEV_NEGOTIATED_FEATURES": 14,
    "DEV_MGMTDEV_MAX_VQS": 15,
    "DEV_SUPPORTED_FEATURES": 16,
    "DEV_QUEUE_INDEX": 17,
    "DEV_VENDOR_ATTR_NAME": 18,
    "DEV_VENDOR_ATTR_VALUE": 19,
    "DEV_FEATURES": 20,
}

BLK_ATTRS = {
    "DEV_BLK_CFG_CAPACITY": 21,
    "DEV_BLK_CFG_SIZE_MAX": 22,
    "DEV_BLK_CFG_BLK_SIZE": 23,
    "DEV_BLK_CFG_SEG_MAX": 24,
    "DEV_BLK_CFG_NUM_QUEUES": 25,
    "DEV_BLK_CFG_PHY_BLK_EXP": 26,
    "DEV_BLK_CFG_ALIGN_OFFSET": 27,
    "DEV_BLK_CFG_MIN_IO_SIZE": 28,
    "DEV_BLK_CFG_OPT_IO_SIZE": 29,
    "DEV_BLK_CFG_MAX_DISCARD_SEC": 30,
    "DEV_BLK_CFG_MAX_DISCARD_SEG": 31,
    "DEV_BLK_CFG_DISCARD_SEC_ALIGN": 32,
    "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC": 33,
    "DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG": 34,
    "DEV_BLK_READ_ONLY": 35,
    "DEV_BLK_FLUSH": 36,
}


def test_family_constants() -> None:
    assert vdpa.GENL_NAME == "vdpa"
    assert vdpa.GENL_VERSION == 1
    assert vdpa.VDUSE_MGMTDEV == "vduse"
    assert vdpa.VDPA_ATTR_PAD is VdpaAttr.UNSPEC
    assert int(VdpaAttr.UNSPEC) == 0
    assert vdpa.STABLE_ATTR_MAX == 20
    assert vdpa.ATTR_VDPA_DEV_SUPPORTED_FEATURES_6_1 == 21


def test_commands() -> None:
    assert {c.name: c.value for c in VdpaCmd} == CMDS


def test_attributes() -> None:
    assert {a.name: a.value for a in VdpaAttr} == {**STABLE_ATTRS, **BLK_ATTRS}


# --------------------------------------------------------------------------------------
# Byte-level message checks
# --------------------------------------------------------------------------------------


def _encode(msg: nl.VdpaMsg, mtype: int = 0x1C, flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    msg["header"]["type"] = mtype
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = 1
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def _parse(raw: bytes) -> tuple[int, int, int, list[tuple[int, bytes]]]:
    """(nlmsg type, genl cmd, genl version, [(nla type, payload)]) from raw bytes."""
    length, mtype, _flags, _seq, _pid = struct.unpack_from("<IHHII", raw)
    assert length == len(raw)
    cmd, version, reserved = struct.unpack_from("<BBH", raw, 16)
    assert reserved == 0
    attrs = []
    off = 20
    while off < length:
        nla_len, nla_type = struct.unpack_from("<HH", raw, off)
        assert nla_len >= 4
        attrs.append((nla_type, raw[off + 4 : off + nla_len]))
        off += (nla_len + 3) & ~3
    assert off == length
    return mtype, cmd, version, attrs


def test_dev_add_sends_exactly_name_and_mgmtdev() -> None:
    raw = _encode(nl.build_dev_add("blk0"))
    mtype, cmd, version, attrs = _parse(raw)
    assert (mtype, cmd, version) == (0x1C, 3, 1)
    assert attrs == [(4, b"blk0\0"), (2, b"vduse\0")]
    assert all(t != VdpaAttr.MGMTDEV_BUS_NAME for t, _ in attrs)


def test_dev_add_other_mgmtdev_and_long_name() -> None:
    name = "n" * 40
    _, cmd, _, attrs = _parse(_encode(nl.build_dev_add(name, "vdpasim_blk")))
    assert cmd == VdpaCmd.DEV_NEW
    assert attrs == [(4, name.encode() + b"\0"), (2, b"vdpasim_blk\0")]


def test_dev_del_sends_only_name() -> None:
    _, cmd, version, attrs = _parse(_encode(nl.build_dev_del("blk0")))
    assert (cmd, version) == (4, 1)
    assert attrs == [(4, b"blk0\0")]


def test_dump_requests_have_no_attributes() -> None:
    for cmd in (VdpaCmd.MGMTDEV_GET, VdpaCmd.DEV_GET):
        raw = _encode(nl.build_msg(cmd), flags=NLM_F_REQUEST | NLM_F_DUMP)
        assert _parse(raw)[1:] == (int(cmd), 1, [])


def test_pyroute2_decodes_what_it_encodes() -> None:
    raw = _encode(nl.build_dev_add("blk0"))
    msg = nl.VdpaMsg(raw)
    msg.decode()
    assert msg["cmd"] == VdpaCmd.DEV_NEW
    assert msg.get_attr("VDPA_ATTR_DEV_NAME") == "blk0"
    assert msg.get_attr("VDPA_ATTR_MGMTDEV_DEV_NAME") == "vduse"


def _nla(attr: int, payload: bytes) -> bytes:
    body = struct.pack("<HH", 4 + len(payload), attr) + payload
    return body + bytes(-len(body) % 4)


def _reply(cmd: int, attrs: list[bytes], mtype: int = 0x1C) -> nl.VdpaMsg:
    """A reply as the kernel builds it, decoded by the client's message class."""
    payload = struct.pack("<BBH", cmd, 1, 0) + b"".join(attrs)
    raw = struct.pack("<IHHII", 16 + len(payload), mtype, 2, 1, 0) + payload
    msg = nl.VdpaMsg(raw)
    msg.decode()
    return msg


def _dev_reply(name: str) -> nl.VdpaMsg:
    return _reply(
        VdpaCmd.DEV_NEW,
        [
            _nla(VdpaAttr.MGMTDEV_DEV_NAME, b"vduse\0"),
            _nla(VdpaAttr.DEV_NAME, name.encode() + b"\0"),
            _nla(VdpaAttr.DEV_ID, struct.pack("<I", 2)),
            _nla(VdpaAttr.DEV_VENDOR_ID, struct.pack("<I", 0x1AF4)),
            _nla(VdpaAttr.DEV_MAX_VQS, struct.pack("<I", 1)),
            _nla(VdpaAttr.DEV_MAX_VQ_SIZE, struct.pack("<H", 128)),
            _nla(VdpaAttr.DEV_MIN_VQ_SIZE, struct.pack("<H", 1)),
        ],
    )


def test_parse_device_from_kernel_bytes() -> None:
    assert nl.parse_device(_dev_reply("blk0")) == nl.VdpaDevice(
        name="blk0", mgmtdev="vduse", device_id=2, vendor_id=0x1AF4, max_vqs=1, max_vq_size=128
    )


def test_mgmtdev_with_bus() -> None:
    msg = _reply(
        VdpaCmd.MGMTDEV_NEW,
        [
            _nla(VdpaAttr.MGMTDEV_BUS_NAME, b"pci\0"),
            _nla(VdpaAttr.MGMTDEV_DEV_NAME, b"0000:01:00.2\0"),
            _nla(VdpaAttr.MGMTDEV_SUPPORTED_CLASSES, struct.pack("<Q", 2)),
        ],
    )
    assert nl.parse_device(msg).mgmtdev == "pci/0000:01:00.2"


# --------------------------------------------------------------------------------------
# The client against a fake socket
# --------------------------------------------------------------------------------------

PRID = 0x1C


class FakeSock:
    """Stands in for the pyroute2 socket: records requests, returns canned replies."""

    prid = PRID

    def __init__(self, replies: list[Any] | None = None, error: int | None = None) -> None:
        self.replies = replies or []
        self.error = error
        self.sent: list[tuple[bytes, int, int]] = []
        self.closed = 0
        self.bound: tuple[str, type] | None = None

    def bind(self, proto: str, msg_class: type) -> None:
        self.bound = (proto, msg_class)
        if self.error is not None:
            raise NetlinkError(self.error)

    def nlm_request(self, msg: nl.VdpaMsg, msg_type: int, msg_flags: int) -> tuple[Any, ...]:
        self.sent.append((_encode(msg, msg_type, msg_flags), msg_type, msg_flags))
        if self.error is not None:
            raise NetlinkError(self.error, "extack text")
        return tuple(self.replies)

    def close(self) -> None:
        self.closed += 1


def _client(sock: FakeSock, monkeypatch: pytest.MonkeyPatch) -> nl.VdpaNetlink:
    monkeypatch.setattr(nl, "_VdpaSocket", lambda **kw: sock)
    return nl.VdpaNetlink()


def _ack() -> nl.VdpaMsg:
    return _reply(0, [], mtype=2)  # an NLMSG_ERROR(0) ack must not be taken for a reply


def test_client_dev_add(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSock([_ack()])
    with _client(sock, monkeypatch) as client:
        assert sock.bound == ("vdpa", nl.VdpaMsg)
        client.dev_add("blk0")
    assert sock.closed == 1
    ((raw, mtype, flags),) = sock.sent
    assert mtype == PRID and flags == NLM_F_REQUEST | NLM_F_ACK
    assert _parse(raw) == (PRID, 3, 1, [(4, b"blk0\0"), (2, b"vduse\0")])


def test_client_dev_del(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSock()
    client = _client(sock, monkeypatch)
    client.dev_del("blk0")
    assert _parse(sock.sent[0][0])[1:] == (4, 1, [(4, b"blk0\0")])


def test_client_dev_list(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSock([_dev_reply("a"), _dev_reply("b"), _ack()])
    client = _client(sock, monkeypatch)
    devs = client.dev_list()
    assert [d.name for d in devs] == ["a", "b"]
    assert devs[0].max_vq_size == 128
    (_, _, flags) = sock.sent[0]
    assert flags == NLM_F_REQUEST | NLM_F_DUMP


def test_client_mgmtdevs(monkeypatch: pytest.MonkeyPatch) -> None:
    reply = _reply(VdpaCmd.MGMTDEV_NEW, [_nla(VdpaAttr.MGMTDEV_DEV_NAME, b"vduse\0")])
    client = _client(FakeSock([reply]), monkeypatch)
    assert client.mgmtdev_names() == ["vduse"]
    assert client.has_mgmtdev()
    assert not client.has_mgmtdev("vdpasim_net")


def test_client_empty_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(FakeSock([]), monkeypatch)
    assert client.dev_list() == []
    assert not client.has_mgmtdev()


def test_client_maps_netlink_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSock()
    client = _client(sock, monkeypatch)
    sock.error = errno.EINVAL
    with pytest.raises(nl.VdpaError) as info:
        client.dev_add("nonexistent")
    assert info.value.errno == errno.EINVAL
    assert isinstance(info.value, OSError)
    assert "DEV_NEW" in str(info.value) and "nonexistent" in str(info.value)
    assert "extack text" in str(info.value)


def test_client_family_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSock(error=errno.ENOENT)
    with pytest.raises(nl.VdpaError) as info:
        _client(sock, monkeypatch)
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror == (
        "vdpa netlink family not found: load the vdpa and vduse modules (modprobe vduse)"
    )
    assert sock.closed == 1


def test_client_other_bind_error(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSock(error=errno.EPERM)
    with pytest.raises(nl.VdpaError) as info:
        _client(sock, monkeypatch)
    assert info.value.errno == errno.EPERM
    assert sock.closed == 1


def test_client_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSock()
    client = _client(sock, monkeypatch)
    client.close()
    client.close()
    assert sock.closed == 1
    with pytest.raises(nl.VdpaError) as info:
        client.dev_list()
    assert info.value.errno == errno.EBADF


def test_real_socket_opens_or_reports_missing_family() -> None:
    """On a host without the vdpa module the real pyroute2 path must give ENOENT."""
    try:
        client = nl.VdpaNetlink()
    except nl.VdpaError as exc:
        assert exc.errno in (errno.ENOENT, errno.EPROTONOSUPPORT, errno.EPERM, errno.EACCES)
    else:
        client.close()


# --------------------------------------------------------------------------------------
# Cross-check against the installed C header
# --------------------------------------------------------------------------------------

HEADER = Path("/usr/include/linux/vdpa.h")


def _c_values(tmp: Path, names: list[str], tag: str) -> dict[str, int] | None:
    """Values of the given enum/macro names, or None if the header lacks one of them."""
    lines = ["#include <stdio.h>", "#include <linux/vdpa.h>", "int main(void) {"]
    lines += [f'printf("{n}|%lld\\n", (long long)({n}));' for n in names]
    lines += ["return 0;", "}"]
    src = tmp / f"vdpa_{tag}.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp / f"vdpa_{tag}"
    if subprocess.run(["gcc", "-o", str(exe), str(src)], capture_output=True).returncode:
        return None
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(val) for k, val in (ln.split("|") for ln in out.splitlines())}


@pytest.mark.skipif(shutil.which("gcc") is None or not HEADER.exists(), reason="needs gcc and linux/vdpa.h")
def test_against_c_header(tmp_path: Path) -> None:
    text = HEADER.read_text()
    assert f'#define VDPA_GENL_NAME "{vdpa.GENL_NAME}"' in text
    base = {"VDPA_GENL_VERSION": vdpa.GENL_VERSION}
    base |= {f"VDPA_CMD_{k}": v for k, v in CMDS.items() if v <= VdpaCmd.DEV_VSTATS_GET}
    base |= {f"VDPA_ATTR_{k}": v for k, v in STABLE_ATTRS.items()}
    base["VDPA_ATTR_PAD"] = 0
    got = _c_values(tmp_path, list(base), "base")
    assert got == base
    # Version-dependent parts: compare whichever numbering this header has.
    newer = {"VDPA_CMD_DEV_ATTR_SET": 8} | {f"VDPA_ATTR_{k}": v for k, v in BLK_ATTRS.items()}
    got_newer = _c_values(tmp_path, list(newer), "newer")
    got_61 = _c_values(tmp_path, ["VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES"], "v61")
    assert got_newer is not None or got_61 is not None, "header matches neither numbering"
    if got_newer is not None:
        assert got_newer == newer
    if got_61 is not None:
        assert got_61 == {"VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES": 21}
