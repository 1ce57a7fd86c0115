"""virtio-net on the model: frames both ways over split and packed rings, mergeable receive
buffers, link changes, what VDUSE refuses, hostile chains, resets with buffers held."""

from __future__ import annotations

import errno
import os
import time

import pytest

from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import F_ACCESS_PLATFORM, F_VERSION_1, DeviceId, bit, has
from pyvduse.backend.packet_queue import PacketQueueBackend
from pyvduse.device.base import DeviceSpec
from pyvduse.device.net import (
    MAX_PACKET,
    OFFLOAD_FEATURES,
    NetConfigError,
    NetDevice,
    NetOptions,
    parse_mac,
)
from pyvduse.model.net_driver import NetDriver, header
from pyvduse.model.virtio_driver import ProbeError
from pyvduse.ops import inspect
from pyvduse.ops.drain import drain
from pyvduse.ops.server import answer
from pyvduse.ops.target import Target
from pyvduse.testing import ModelRig
from pyvduse.transport.model.kernel import ModelError, ModelKernel

MAC = bytes.fromhex("525400123456")


def frame(n: int, seed: int = 0) -> bytes:
    """An Ethernet frame of ``n`` bytes: our MAC as destination, then a pattern."""
    body = bytes((seed + i) % 251 for i in range(max(n - 6, 0)))
    return (MAC + body)[:n]


def served(
    backend: PacketQueueBackend | None = None, **options: object
) -> tuple[NetDevice, PacketQueueBackend, ModelRig]:
    be = backend or PacketQueueBackend(offloads=OFFLOAD_FEATURES)
    dev = NetDevice(be, NetOptions(mac=MAC, **options))  # type: ignore[arg-type]
    return dev, be, ModelRig(dev)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "big"])
def test_frames_both_ways(packed: bool, mrg: bool) -> None:
    dev, be, rig = served(packed=packed, mrg_rxbuf=mrg)
    with rig:
        nic = NetDriver(rig.kernel, rx_buffers=64)
        assert has(nic.features, vn.F_MRG_RXBUF) == mrg
        sent = [frame(n, n) for n in (60, 1514, 9014)]
        nic.send_many(sent)
        assert [be.sent.get(timeout=5)[vn.NET_HDR_V1_SIZE :] for _ in sent] == sent
        sizes = (60, 1500, 1536 - 12, 1536 - 11, 4000, 20000, 65000)
        for n in sizes:
            be.inject(header() + frame(n, n))
        for n in sizes:
            hdr, got = nic.receive(5)
            assert got == frame(n, n)
            count = vn.NET_HDR_V1.unpack(hdr)[6]
            assert count == (-(-(n + 12) // 1536) if mrg else 1)
        assert nic.malformed == 0
        rx, tx = dev.queue_stats
        assert (rx.packets, rx.bytes, rx.drops) == (len(sizes), sum(sizes), 0)
        assert (tx.packets, tx.bytes) == (3, sum(len(f) for f in sent))
        nic.remove()


def test_frame_waits_for_buffers_then_arrives() -> None:
    dev, be, rig = served(mrg_rxbuf=True)
    with rig:
        nic = NetDriver(rig.kernel, rx_buffers=8)  # 8 x 1536: a 20000-byte frame needs 14
        be.inject(header() + frame(20000))
        time.sleep(0.2)
        nic.rx_buffers = 64
        nic.refill()
        assert nic.receive(5)[1] == frame(20000)
        assert dev.queue_stats[0].drops == 0


def test_receive_buffers_are_held_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    """A reset or a drain with every receive buffer waiting for a frame is immediate: nothing
    waits for the held buffers (a drain counts none left, the reset's wind-down abandons none
    after a grace period, the kernel's message does not time out)."""
    dev, be, rig = served()
    with rig:
        nic = NetDriver(rig.kernel, rx_buffers=128)
        deadline = time.monotonic() + 5
        while dev.rx.held < 128 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.rx.held == 128
        assert drain(rig.server, 5.0) == 0
        nic.remove()
        assert not rig.kernel.broken
        assert "still in flight after" not in caplog.text
        assert dev.rx.held == 0
        # the driver comes back: the device serves it from scratch
        nic = NetDriver(rig.kernel, rx_buffers=16)
        be.inject(header() + frame(100))
        assert nic.receive(5)[1] == frame(100)


def test_link_down_and_up() -> None:
    _dev, be, rig = served()
    with rig:
        nic = NetDriver(rig.kernel, rx_buffers=16)
        assert nic.link_up and nic.config.mac == MAC
        target = Target("n0", rig.server, rig.transport)
        reply = answer(target, {"cmd": "link", "state": "down"})
        assert reply["result"] == {"link": "down", "changed": True}
        assert not nic.link_up and nic.virtio.config_changes == 1
        nic.send(frame(100))
        be.inject(header() + frame(100))
        with pytest.raises(TimeoutError):
            nic.receive(0.3)
        assert be.sent.empty()
        assert answer(target, {"cmd": "link", "state": "up"})["result"]["changed"]
        assert nic.link_up and nic.virtio.config_changes == 2
        nic.send(frame(100, 1))
        be.inject(header() + frame(100, 2))
        assert nic.receive(5)[1] == frame(100, 2)
        assert be.sent.get(timeout=5)[12:] == frame(100, 1)
        rx, tx = inspect.stats(target)["queues"]
        assert (rx["direction"], rx["packets"], rx["drops"]) == ("rx", 1, 1)
        assert (tx["direction"], tx["packets"], tx["drops"]) == ("tx", 1, 1)
        status = inspect.status(target)
        assert status["link"] == "up" and status["mac"] == "52:54:00:12:34:56"
        assert "MRG_RXBUF" not in status["feature_names"]  # off unless asked for
        assert answer(target, {"cmd": "link", "state": "sideways"})["error"]["code"] == "invalid-argument"


def test_checksum_flags_only_for_a_driver_that_took_them() -> None:
    needs_csum = header(flags=vn.HDR_F_NEEDS_CSUM | vn.HDR_F_DATA_VALID)
    for offloads in (OFFLOAD_FEATURES, 0):
        _dev, be, rig = served(PacketQueueBackend(offloads=offloads))
        with rig:
            nic = NetDriver(rig.kernel, rx_buffers=16)
            assert has(nic.features, vn.F_GUEST_CSUM) == bool(offloads)
            assert has(nic.features, vn.F_HOST_TSO4) == bool(offloads)
            be.inject(needs_csum + frame(100))
            hdr, _ = nic.receive(5)
            assert hdr[0] == (needs_csum[0] if offloads else 0)


def test_vduse_refusals() -> None:
    backend = PacketQueueBackend()
    for feature in (vn.F_CTRL_VQ, vn.F_MQ, vn.F_CTRL_RX, vn.F_RSS):
        with pytest.raises(NetConfigError, match="VDUSE refuses"):
            NetDevice(backend, NetOptions(extra_features=bit(feature)))
    base = bit(F_VERSION_1) | bit(F_ACCESS_PLATFORM)
    config = vn.NetConfig(mac=MAC).pack()
    with pytest.raises(ModelError) as e:  # the kernel's own check, on the model
        ModelKernel(DeviceSpec(DeviceId.NET, base | bit(vn.F_CTRL_VQ), config, 3, 256))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ModelError):
        ModelKernel(DeviceSpec(DeviceId.NET, bit(F_ACCESS_PLATFORM), config, 2, 256))
    # MQ without a control queue: VDUSE creates it, Linux's driver refuses to probe it
    kernel = ModelKernel(DeviceSpec(DeviceId.NET, base | bit(vn.F_MQ), config, 2, 256))
    with pytest.raises(ProbeError, match="control queue"):
        NetDriver(kernel)


def test_options_checked() -> None:
    with pytest.raises(NetConfigError):
        parse_mac("01:00:5e:00:00:01")  # multicast
    with pytest.raises(NetConfigError):
        parse_mac("52:54:00:12:34")
    assert parse_mac("52-54-00-12-34-56") == MAC
    with pytest.raises(NetConfigError):
        NetDevice(PacketQueueBackend(), NetOptions(mtu=20))
    dev = NetDevice(PacketQueueBackend(), NetOptions(mtu=9000))
    spec = dev.spec()
    assert has(spec.features, vn.F_MTU) and vn.NetConfig.unpack(spec.config).mtu == 9000
    assert dev.mac[0] & 3 == 2  # random, locally administered, unicast


def test_hostile_chains_cost_one_request() -> None:
    """A receive 'buffer' the device would have to read, and a frame shorter than its header,
    are counted and completed; the queues carry on."""
    dev, be, rig = served()
    with rig:
        nic = NetDriver(rig.kernel, rx_buffers=4)
        nic.post_receive([b"readable!"], [64])
        t = nic.txq.submit([b"short"], [])
        nic.txq.wait(t, 5)
        deadline = time.monotonic() + 5
        while dev.queue_stats[0].bad < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.queue_stats[0].bad == 1 and dev.queue_stats[1].bad == 1
        nic.send(frame(80))
        assert be.sent.get(timeout=5)[12:] == frame(80)
        be.inject(header() + frame(90))
        assert nic.receive(5)[1] == frame(90)


def test_oversized_injection_is_dropped() -> None:
    dev, be, rig = served()
    with rig:
        nic = NetDriver(rig.kernel, rx_buffers=64)
        be.inject(os.urandom(MAX_PACKET + 1))
        be.inject(header() + frame(70))
        assert nic.receive(5)[1] == frame(70)
        assert dev.queue_stats[0].drops == 1


def test_metrics_count_frames() -> None:
    pytest.importorskip("prometheus_client")
    from pyvduse.ops.metrics import DeviceCollector

    dev, be, rig = served()
    with rig:
        nic = NetDriver(rig.kernel, rx_buffers=16)
        nic.send(frame(100))
        be.inject(header() + frame(200))
        nic.receive(5)
        families = {f.name: f for f in DeviceCollector(Target("n0", rig.server)).collect()}
        samples = {
            (s.name, s.labels["queue"]): s.value
            for f in ("pyvduse_net_packets", "pyvduse_net_bytes")
            for s in families[f].samples
            if s.name.endswith("_total")
        }
        assert samples == {
            ("pyvduse_net_packets_total", "0"): 1,
            ("pyvduse_net_packets_total", "1"): 1,
            ("pyvduse_net_bytes_total", "0"): 200,
            ("pyvduse_net_bytes_total", "1"): 100,
        }
        assert dev.queue_stats[0].packets == 1
