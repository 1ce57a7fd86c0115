"""The network device of the 'writing a device' guide, tested on the model as it shows."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvduse.device.net import NetDevice
from pyvduse.model.net_driver import NetDriver
from pyvduse.testing import ModelRig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

from ping_responder import ETH, RESPONDER_MAC, Responder, checksum  # noqa: E402

OUR_MAC = bytes.fromhex("525400000001")


def ping_frame(seq: int) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, seq) + b"pyvduse!" * 4)
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(icmp),
            seq,
            0,
            64,
            1,
            0,
            bytes([10, 9, 0, 1]),
            bytes([10, 9, 0, 2]),
        )
    )
    ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
    return ETH.pack(RESPONDER_MAC, OUR_MAC, 0x0800) + bytes(ip) + bytes(icmp)


def test_it_answers_ping() -> None:
    device = NetDevice(Responder())
    with ModelRig(device) as rig:
        nic = NetDriver(rig.kernel)
        for seq in range(3):
            nic.send(ping_frame(seq))
            _, reply = nic.receive(5)
            dst, src, _ = ETH.unpack_from(reply)
            ip = reply[ETH.size :]
            assert (dst, src) == (OUR_MAC, RESPONDER_MAC)
            assert ip[12:16] == bytes([10, 9, 0, 2]) and ip[16:20] == bytes([10, 9, 0, 1])
            assert checksum(ip[:20]) == 0 and checksum(ip[20:]) == 0  # valid checksums
            assert ip[20] == 0 and struct.unpack_from("!H", ip, 26)[0] == seq  # echo reply


def test_it_answers_arp_and_ignores_the_rest() -> None:
    device = NetDevice(Responder())
    with ModelRig(device) as rig:
        nic = NetDriver(rig.kernel)
        arp = struct.pack(
            "!HHBBH6s4s6s4s",
            1,
            0x0800,
            6,
            4,
            1,
            OUR_MAC,
            bytes([10, 9, 0, 1]),
            bytes(6),
            bytes([10, 9, 0, 7]),
        )
        nic.send(ETH.pack(b"\xff" * 6, OUR_MAC, 0x0806) + arp)
        nic.send(ETH.pack(b"\xff" * 6, OUR_MAC, 0x86DD) + bytes(40))  # IPv6: no answer
        _, reply = nic.receive(5)
        op, sha, spa = struct.unpack_from("!6xH6s4s", reply, ETH.size)
        assert (op, sha, spa) == (2, RESPONDER_MAC, bytes([10, 9, 0, 7]))
        assert device.backend.answered == 1  # type: ignore[attr-defined]


@pytest.mark.skipif(Path("/dev/vduse/control").exists(), reason="this host has the vduse module")
def test_without_vduse_it_says_so_in_one_line() -> None:
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / "ping_responder.py"), "--name", "pong0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("ping_responder: error:") and "modprobe" in lines[0]
