"""The in-process model of VDUSE's kernel half, with its virtio-blk driver."""

from __future__ import annotations

import os
import threading

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, Status, bit
from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.model.virtio_driver import DRIVER_TRANSPORT_FEATURES, ProbeError
from pyvduse.testing.rig import ModelRig
from pyvduse.transport.model.kernel import SET_STATUS, Message, ModelError, ModelKernel

MiB = 1 << 20


def blk(size: int = 8 * MiB, **opts: object) -> BlkDevice:
    return BlkDevice(MemoryBackend(size), BlkOptions(**opts))  # type: ignore[arg-type]


def test_probe_sequence_matches_virtio_vdpa() -> None:
    with ModelRig(blk()) as rig:
        drv = BlkDriver(rig.kernel)
        statuses = [arg for kind, arg in rig.kernel.message_log if kind == SET_STATUS]
        assert statuses == [0, 1, 3, 0xB, 0xF]
        assert rig.server.running.wait(10)  # queues start right after DRIVER_OK is answered
        drv.remove()
        assert not rig.server.workers


def test_read_write_flush_get_id() -> None:
    with ModelRig(blk(serial="model-1")) as rig:
        drv = BlkDriver(rig.kernel)
        data = os.urandom(64 * 1024)
        drv.write(4096, data)
        drv.flush()
        assert drv.read(4096, len(data)) == data
        assert drv.get_id() == "model-1"
        assert drv.capacity == 8 * MiB


def test_errors_come_back_as_status() -> None:
    with ModelRig(blk()) as rig:
        drv = BlkDriver(rig.kernel)
        with pytest.raises(BlkIOError) as e:
            drv.read(8 * MiB, 512)
        assert e.value.status == vb.ReqStatus.IOERR
        status, _, _ = drv.request(77)
        assert status == vb.ReqStatus.UNSUPP


def test_config_space_is_kernel_side() -> None:
    with ModelRig(blk()) as rig:
        drv = BlkDriver(rig.kernel)
        rig.kernel.set_config(0, b"\xff" * 8)  # driver writes are dropped
        assert drv.capacity == 8 * MiB
        assert rig.kernel.get_config(200, 4) == bytes(4)  # past config_size reads zero
        rig.device.set_capacity(16 * MiB)  # type: ignore[attr-defined]
        assert drv.capacity == 16 * MiB
        assert drv.virtio.config_changes == 1


def test_refused_features_fail_probe() -> None:
    device = blk()
    device.accept_features = lambda features: False  # type: ignore[method-assign]
    with ModelRig(device) as rig:
        with pytest.raises(ProbeError):
            BlkDriver(rig.kernel)
        assert rig.kernel.get_status() == 0x83  # FAILED on top of the stored status


def test_driver_without_event_idx() -> None:
    with ModelRig(blk()) as rig:
        drv = BlkDriver(rig.kernel, transport_features=DRIVER_TRANSPORT_FEATURES & ~bit(F_RING_EVENT_IDX))
        drv.write(0, b"a" * 512)
        assert drv.read(0, 512) == b"a" * 512


def test_multiqueue_concurrent_io() -> None:
    with ModelRig(blk(num_queues=4)) as rig:
        drv = BlkDriver(rig.kernel)
        errors: list[BaseException] = []

        def worker(q: int) -> None:
            try:
                for k in range(30):
                    off = (q * 64 + k) * 4096
                    payload = bytes([q, k]) * 2048
                    drv.write(off, payload, queue=q)
                    assert drv.read(off, 4096, queue=q) == payload
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(q,)) for q in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert all(rig.server.workers[q].completed >= 60 for q in range(4))


def test_threads_sharing_one_queue_get_their_own_completions() -> None:
    """Eight threads on queue 0 at once: a descriptor head is reused as soon as it is
    collected, so completions must reach the thread that submitted them, not whoever holds
    that head now."""
    with ModelRig(blk()) as rig:
        drv = BlkDriver(rig.kernel)
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                for k in range(25):
                    off = (t * 32 + k) * 4096
                    payload = bytes([t, k]) * 2048
                    drv.write(off, payload, queue=0)
                    assert drv.read(off, 4096, queue=0) == payload
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[0]


def test_deaf_device_is_marked_broken_and_driver_never_hangs() -> None:
    with ModelRig(blk(), msg_timeout=0.3) as rig:
        drv = BlkDriver(rig.kernel)
        rig.transport.deaf.set()
        queued: list[str] = []  # the messages the kernel sent the device (and waited for)
        put = rig.kernel.messages.put

        def counted(msg: Message, block: bool = True, timeout: float | None = None) -> None:
            queued.append(msg.kind)
            put(msg, block, timeout)

        rig.kernel.messages.put = counted  # type: ignore[method-assign,assignment]
        rig.kernel.set_status(rig.kernel.get_status() | Status.FAILED)  # waits msg_timeout, once
        assert rig.kernel.broken
        rig.kernel.set_status(0)  # later messages fail at once: never sent, never waited for
        assert queued == [SET_STATUS], queued
        with pytest.raises(ModelError):
            rig.kernel.vq_inject_irq(0)
        del drv


def test_reset_mid_request_and_reprobe() -> None:
    with ModelRig(blk()) as rig:
        drv = BlkDriver(rig.kernel)
        drv.write(0, b"x" * 4096)
        q = drv.virtio.queues[0]
        q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [4096, 1])  # never waited for
        rig.kernel.set_status(0)
        assert not rig.server.workers and rig.kernel.iova.lookup(q.ring.desc_addr) is not None
        drv2 = BlkDriver(rig.kernel)
        assert drv2.read(0, 4096) == b"x" * 4096


def test_create_validation() -> None:
    from pyvduse.device.base import DeviceSpec

    with pytest.raises(ModelError):
        ModelKernel(DeviceSpec(2, 1 << 32, b"", 1, 256))  # no ACCESS_PLATFORM
    with pytest.raises(ModelError):
        ModelKernel(DeviceSpec(2, (1 << 33) | (1 << vb.F_CONFIG_WCE), b"", 1, 256))


def test_features_changed_after_features_ok_are_refused() -> None:
    with ModelRig(blk()) as rig:
        k = rig.kernel
        k.set_status(0)
        k.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        k.set_driver_features(k.get_device_features())
        k.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert k.get_status() & Status.FEATURES_OK
        k.set_driver_features(k.get_device_features() & ~bit(F_RING_EVENT_IDX))
        k.set_status(k.get_status() | Status.DRIVER_OK)
        assert not k.get_status() & Status.DRIVER_OK
        assert not rig.server.running.is_set()


def test_kick_on_a_queue_that_is_not_ready_is_dropped() -> None:
    with ModelRig(blk(num_queues=2)) as rig:
        drv = BlkDriver(rig.kernel, num_queues=1)  # the driver sets up queue 0 only
        assert rig.server.running.wait(10)
        rig.kernel.kick(1)
        assert 1 not in rig.server.workers
        drv.write(0, b"k" * 512, queue=0)
        assert drv.read(0, 512, queue=0) == b"k" * 512


def test_status_without_driver_ok_is_not_a_reset() -> None:
    with ModelRig(blk()) as rig:
        drv = BlkDriver(rig.kernel)
        drv.write(0, b"s" * 512)
        rig.kernel.set_status(rig.kernel.get_status() | Status.FAILED)
        assert rig.server.running.is_set()  # FAILED is stored, queues keep their state
        assert drv.read(0, 512) == b"s" * 512


def test_packed_ring_end_to_end_on_the_model() -> None:
    from pyvduse.abi.virtio import F_RING_PACKED

    with ModelRig(blk(packed=True, num_queues=2)) as rig:
        drv = BlkDriver(rig.kernel)
        assert drv.virtio.features & bit(F_RING_PACKED)
        for k in range(300):  # many times round the ring
            drv.write(k * 4096, bytes([k % 251]) * 4096, queue=k % 2)
        for k in range(300):
            assert drv.read(k * 4096, 4096, queue=(k + 1) % 2) == bytes([k % 251]) * 4096
        state = rig.kernel.get_vq_state(0)
        assert len(state) == 4


def test_packed_without_indirect() -> None:
    with ModelRig(blk(packed=True)) as rig:
        drv = BlkDriver(rig.kernel, indirect=False)
        drv.write(0, b"p" * 8192)
        assert drv.read(0, 8192) == b"p" * 8192
