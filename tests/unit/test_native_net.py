"""virtio-net on the native data path (pyvduse/fastpath/splitblk_net.c), on the model: the
same frames and counts as the Python engine over the same backend (a ``FramePipe``, which
both serve as they serve a TAP), link changes, drops, and chains the loop leaves to Python."""

from __future__ import annotations

import time

import pytest

from pyvduse.abi import virtio_net as vn
from pyvduse.abi.virtio import has
from pyvduse.device.net import MAX_PACKET, OFFLOAD_FEATURES, NetDevice, NetOptions
from pyvduse.fastpath import engine as native
from pyvduse.model.net_driver import BIG_BUFFER, NetDriver, header
from pyvduse.ops import inspect
from pyvduse.ops.server import answer
from pyvduse.ops.target import Target
from pyvduse.ring.chain import Chain
from pyvduse.runtime.native_worker import NativeQueueWorker
from pyvduse.runtime.tuning import DataPath
from pyvduse.testing import FramePipe, ModelRig
from tests.unit.test_net_device import MAC, frame
from tests.unit.test_runtime import wait_for

pytestmark = pytest.mark.skipif(not native.available(), reason="the native data path is not built")

HDR = vn.NET_HDR_V1_SIZE


def served(
    data_path: DataPath = DataPath.NATIVE, offloads: int = OFFLOAD_FEATURES, **options: object
) -> tuple[NetDevice, FramePipe, ModelRig]:
    pipe = FramePipe(offloads)
    dev = NetDevice(pipe, NetOptions(mac=MAC, **options))  # type: ignore[arg-type]
    return dev, pipe, ModelRig(dev, data_path=data_path)


def counts(dev: NetDevice) -> list[tuple[object, ...]]:
    return [
        tuple(dev.queue_counts(q)[k] for k in ("packets", "bytes", "drops", "bad_requests")) for q in (0, 1)
    ]


@pytest.mark.parametrize("data_path", [DataPath.NATIVE, DataPath.PYTHON], ids=["native", "python"])
def test_frames_both_ways_as_the_python_engine_moves_them(data_path: DataPath) -> None:
    dev, pipe, rig = served(data_path)
    with pipe, rig:
        nic = NetDriver(rig.kernel, rx_buffers=32)
        wait_for(lambda: len(rig.server.workers) == 2)
        engines = [isinstance(w, NativeQueueWorker) for w in rig.server.workers.values()]
        assert engines == [data_path is DataPath.NATIVE] * 2
        sent = [frame(n, n) for n in (60, 1514, 9014, 65000)]
        nic.send_many(sent)
        assert [pipe.sent()[HDR:] for _ in sent] == sent
        sizes = (60, 1500, 4000, 20000, 65000, 65536 + 18)
        csum = header(flags=vn.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16, num_buffers=7)
        for n in sizes:
            pipe.inject(csum + frame(n, n))
        for n in sizes:
            hdr, got = nic.receive(5)
            assert got == frame(n, n)
            assert hdr == csum[:10] + (1).to_bytes(2, "little")  # num_buffers: one buffer
        assert nic.malformed == 0
        assert counts(dev) == [
            (len(sizes), sum(sizes), 0, 0),
            (len(sent), sum(len(f) for f in sent), 0, 0),
        ]
        nic.remove()


def test_the_loop_is_chosen_where_it_can_serve() -> None:
    assert native.why_not(NetDevice(FramePipe(), NetOptions()), packed=False) is None
    why = native.why_not(NetDevice(FramePipe(), NetOptions(mrg_rxbuf=True)), packed=False)
    assert why is not None and "mergeable" in why
    why = native.why_not(NetDevice(FramePipe(), NetOptions()), packed=True)
    assert why is not None and "split" in why

    class Reflector(NetDevice):
        def transmit(self, queue: int, chain: Chain) -> int:
            return 0

    why = native.why_not(Reflector(FramePipe(), NetOptions()), packed=False)
    assert why is not None and "handles its frames itself" in why


def test_link_down_drops_both_ways_and_up_resumes() -> None:
    dev, pipe, rig = served()
    with pipe, rig:
        nic = NetDriver(rig.kernel, rx_buffers=16)
        target = Target("n0", rig.server, rig.transport)
        assert answer(target, {"cmd": "link", "state": "down"})["result"]["changed"]
        assert not nic.link_up
        nic.send(frame(100))
        pipe.inject(header() + frame(100))
        with pytest.raises(TimeoutError):
            nic.receive(0.3)
        with pytest.raises(TimeoutError):
            pipe.sent(0.1)
        wait_for(lambda: dev.queue_counts(0)["drops"] == 1)
        assert answer(target, {"cmd": "link", "state": "up"})["result"]["changed"]
        nic.send(frame(100, 1))
        pipe.inject(header() + frame(100, 2))
        assert nic.receive(5)[1] == frame(100, 2)
        assert pipe.sent()[HDR:] == frame(100, 1)
        rx, tx = inspect.stats(target)["queues"]
        assert (rx["direction"], rx["packets"], rx["drops"]) == ("rx", 1, 1)
        assert (tx["direction"], tx["packets"], tx["drops"]) == ("tx", 1, 1)
        assert inspect.status(target)["queues"][0]["engine"] == "native"


def test_checksum_flags_only_for_a_driver_that_took_them() -> None:
    flags = header(flags=vn.HDR_F_NEEDS_CSUM | vn.HDR_F_DATA_VALID)
    for offloads in (OFFLOAD_FEATURES, 0):
        _dev, pipe, rig = served(offloads=offloads)
        with pipe, rig:
            nic = NetDriver(rig.kernel, rx_buffers=8)
            assert has(nic.features, vn.F_GUEST_CSUM) == bool(offloads)
            pipe.inject(flags + frame(100))
            hdr, _ = nic.receive(5)
            assert hdr[0] == (flags[0] if offloads else 0)


def test_frames_that_do_not_fit_are_dropped() -> None:
    """Longer than the receive buffer (the driver's own, or any frame a TAP could give), or
    shorter than a header: dropped and counted, the buffer kept for the next frame."""
    dev, pipe, rig = served()
    with pipe, rig:
        nic = NetDriver(rig.kernel, rx_buffers=8)
        pipe.inject(bytes(BIG_BUFFER + 1))
        pipe.inject(bytes(MAX_PACKET + 100))
        pipe.inject(b"short")
        pipe.inject(header() + frame(70))
        assert nic.receive(5)[1] == frame(70)
        assert counts(dev)[0] == (1, 70, 3, 0)


def test_chains_the_loop_leaves_to_python_cost_one_request() -> None:
    """A receive 'buffer' the device would have to read is walked by Python when its turn
    comes, refused by the loop again, then given back empty (the driver counts a malformed
    frame); a frame shorter than its header is Python's too. Both are counted as bad, and
    the queues carry on natively."""
    dev, pipe, rig = served()
    with pipe, rig:
        nic = NetDriver(rig.kernel, rx_buffers=4)
        nic.post_receive([b"readable!"], [64])
        t = nic.txq.submit([b"short"], [])
        nic.txq.wait(t, 5)
        for n in range(6):  # four buffers, the bad one, then buffers posted since
            pipe.inject(header() + frame(90, n))
        assert [nic.receive(5)[1] for _ in range(6)] == [frame(90, n) for n in range(6)]
        assert nic.malformed == 1
        nic.send(frame(80))
        assert pipe.sent()[HDR:] == frame(80)
        assert [c[3] for c in counts(dev)] == [1, 1]
        workers = rig.server.workers
        assert [w.deferred for w in workers.values()] == [1, 1]  # type: ignore[attr-defined]
        assert all(isinstance(w, NativeQueueWorker) for w in workers.values())


def test_a_reset_with_buffers_waiting_is_immediate() -> None:
    """The loop never holds a receive buffer taken and empty: a driver going away with every
    buffer posted finds nothing in flight, and the next driver is served from scratch."""
    dev, pipe, rig = served()
    with pipe, rig:
        nic = NetDriver(rig.kernel, rx_buffers=32)
        time.sleep(0.1)
        assert all(w.in_flight_count() == 0 for w in rig.server.workers.values())
        nic.remove()
        assert not rig.kernel.broken  # the reset was answered within the kernel's msg_timeout
        nic = NetDriver(rig.kernel, rx_buffers=8)
        pipe.inject(header() + frame(100))
        assert nic.receive(5)[1] == frame(100)
        assert dev.queue_counts(0)["packets"] == 1


def test_a_tap_that_fails_is_not_polled_in_a_loop() -> None:
    """Reads that fail (here: the other end closed, end of file) are counted and tried
    again at the driver's next kick or after a backoff that doubles from 1 ms (about nine
    times in 0.3 s), not in a loop on the TAP's error (hundreds of thousands)."""
    _dev, pipe, rig = served()
    with pipe, rig:
        nic = NetDriver(rig.kernel, rx_buffers=8)
        pipe.inject(header() + frame(100))
        assert nic.receive(5)[1] == frame(100)
        pipe.peer.close()
        time.sleep(0.3)
        rx = rig.server.workers[vn.RX_QUEUE]
        assert isinstance(rx, NativeQueueWorker)
        assert 1 <= rx.engine.counters()["net"]["errors"] <= 16
        nic.send(frame(60))  # the other queue goes on
