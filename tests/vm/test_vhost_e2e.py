"""The VM path: pyvduse devices bound to vhost_vdpa, driven by our own userspace driver.

A VMM maps guest memory into the device's IOTLB from its own files, at IOVAs of its
choosing, and changes that map while the device runs; it can die at any moment, reset the
device and negotiate again. ``VhostVdpa`` does all of that from this process, with the
model's virtio-blk driver on top, against the real kernel (vhost_vdpa over VDUSE): the cases
below are the ones only this path has. Booting a VM inside the emulated test VM would be too
slow to be a test.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_PACKED, Status, bit
from pyvduse.model.blk_driver import NO_STATUS, BlkDriver, Pending
from pyvduse.model.iotlb_memory import Mapping
from pyvduse.model.vhost_vdpa import VhostVdpa
from pyvduse.model.virtio_driver import DRIVER_TRANSPORT_FEATURES
from tests.vm.helpers import Daemon, Hangable, MiB, NullBlk, ctl_result, make_image, sh

pytestmark = pytest.mark.vm

GiB = 1 << 30
SECTOR = vb.SECTOR_SIZE


@contextlib.contextmanager
def driven(
    dev: str, rings_at: int = MiB, size: int = 8 * MiB, **driver_args: Any
) -> Iterator[tuple[VhostVdpa, BlkDriver, Mapping]]:
    """Our driver on ``dev``: one region of memory for the rings (and buffers, unless a
    test places them elsewhere), probed; closed at the end (before the daemon stops:
    detaching waits for whoever holds the node)."""
    v = VhostVdpa(dev)
    try:
        main = v.iova.map(rings_at, size)
        yield v, BlkDriver(v, **driver_args), main
    finally:
        v.close()


def ok(drv: BlkDriver, p: Pending, timeout: float = 30) -> bytes:
    status, data, _ = drv.wait(p, timeout)
    assert status == vb.ReqStatus.OK, status
    return data


def test_iotlb_changes_with_requests_in_flight(tmp_path: Path) -> None:
    """Requests hang in the backend (dm suspend) with buffers in regions A and B. Adding a
    region C must not disturb them (VDUSE names the whole IOVA space on every change);
    removing B fails B's requests (nothing reaches B's memory after the unmap) and leaves
    A's, which complete with the right data when the backend wakes. Requests into B after
    the unmap fail at once; C, above 4 GiB, serves."""
    with (
        NullBlk("vh-iotlb", size_mb=16, latency_us=0) as disk,
        Hangable("vh-iotlb-dm", disk.dev) as dm,
        Daemon(
            "--file",
            dm.dev,
            "--bind",
            "vhost",
            "--aio",
            "threads",
            "--cache",
            "none",
            "--msg-timeout",
            "6",
            name="vh-iotlb",
        ) as d,
        driven(d.dev) as (v, drv, a),
    ):
        b = v.iova.map(64 * MiB, MiB)
        pattern = {k: os.urandom(4096) for k in range(8)}
        for k, data in pattern.items():
            drv.write(k * 4096, data)
        dm.suspend()
        try:
            with v.iova.placed(a):
                in_a = [(k, drv.submit(vb.ReqType.IN, k * 8, in_len=4096)) for k in range(4)]
            with v.iova.placed(b):
                in_b = [(k, drv.submit(vb.ReqType.IN, k * 8, in_len=4096)) for k in range(4, 8)]
            wait_in_flight("vh-iotlb", 8)
            c = v.iova.map(5 * GiB, MiB)
            # nothing waited for (or failed) the requests in flight: all eight still are
            assert "still use memory being unmapped" not in d.stderr()
            assert ctl_result("vh-iotlb", "stats")["total"]["in_flight"] == 8
            v.iova.unmap(b)  # B's requests get half the message timeout, then are fenced
            # the unmap was answered (in the message timeout: the device serves on, below)
            # after the four requests into B were given up on, and only those
            assert "4 request(s) still use memory being unmapped" in d.stderr(), d.stderr()[-3000:]
        finally:
            dm.resume()  # (a daemon blocked in I/O on a suspended device cannot even die)
        for k, p in in_a:
            assert ok(drv, p) == pattern[k]
        for _k, p in in_b:
            status, _, length = drv.wait(p, 30)
            assert status == NO_STATUS and length == 0  # their status byte is in B
        for m in (a, b):  # nothing of B's requests reached the driver's memory
            assert pattern[4] not in v.iova.read(m.iova, m.size)
        with v.iova.placed(b):  # unmapped: fails, the queue goes on
            assert drv.request(vb.ReqType.IN, 0, in_len=4096)[0] == NO_STATUS
        with v.iova.placed(c):
            assert drv.read(4096, 4096) == pattern[1]
        assert ctl_result("vh-iotlb", "stats")["total"]["in_flight"] == 0
        assert "still use memory being unmapped" in d.stderr()


def wait_in_flight(name: str, n: int) -> None:
    """Until the daemon holds ``n`` requests."""
    deadline = time.monotonic() + 20
    while ctl_result(name, "stats")["total"]["in_flight"] < n:
        assert time.monotonic() < deadline, ctl_result(name, "stats")
        time.sleep(0.1)


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-by-one"])
def test_many_small_regions_high_iovas(tmp_path: Path, batch: bool) -> None:
    """48 regions of 64 KiB scattered over the IOVA space (rings above 4 GiB too), mapped
    in one batch or one message each; requests everywhere on the native data path, then
    every other region removed while another thread keeps requests going in the rest."""
    img = make_image(tmp_path / "small.img", 16 * MiB)
    with Daemon("--file", str(img), "--bind", "vhost", name="vh-small") as d:
        v = VhostVdpa(d.dev)
        try:
            v.iova.batching = batch and v.iova.batching
            rng = random.Random(3)
            starts = sorted(rng.sample(range(1, 1 << 20), 48))
            sent = v.iova.messages
            with v.iova.batch():
                rings = v.iova.map((1 << 36) + 0x7000 * 4096, MiB)  # above 64 GiB
                regions = [v.iova.map(s * 0x10 * 65536, 65536) for s in starts]
            assert v.iova.messages - sent == 49 + (2 if v.iova.batching else 0)
            with v.iova.placed(rings):
                drv = BlkDriver(v, indirect=False)
            assert drv.virtio.queues[0].ring.desc_addr >= 1 << 36
            written = {}
            for k, m in enumerate(regions):
                data = os.urandom(8192)
                with v.iova.placed(m):
                    drv.write(k * 8192, data)
                written[k] = data
            for k in range(len(regions)):  # read back through another region
                with v.iova.placed(regions[-1 - k]):
                    assert drv.read(k * 8192, 8192) == written[k]

            keep, drop = regions[::2], regions[1::2]
            stop = threading.Event()
            errors: list[BaseException] = []
            served = [0]

            def keep_going() -> None:
                try:
                    while not stop.is_set():
                        for k, m in enumerate(keep):
                            with v.iova.placed(m):
                                assert drv.read(2 * k * 8192, 8192) == written[2 * k]
                            served[0] += 1
                except BaseException as e:
                    errors.append(e)

            th = threading.Thread(target=keep_going)
            th.start()
            try:
                for m in drop:
                    v.iova.unmap(m)
                    time.sleep(0.02)
            finally:
                stop.set()
                th.join(60)
            assert not errors, errors
            assert served[0] >= len(keep)
            with v.iova.placed(drop[0]):
                assert drv.request(vb.ReqType.IN, 0, in_len=512)[0] == NO_STATUS
            status = ctl_result("vh-small", "status")
            assert [q["engine"] for q in status["queues"]] == ["native"], status
        finally:
            v.close()


def test_reset_and_fresh_negotiation(tmp_path: Path) -> None:
    """SET_STATUS 0, then a new negotiation with other features (split without event
    index, then packed) over the same memory map; the device's position is what the
    driver set (VHOST_GET_VRING_BASE asks the daemon); last, queues enabled only after
    DRIVER_OK (VDUSE says nothing of it: the daemon notices the first kick)."""
    img = make_image(tmp_path / "reset.img", 8 * MiB)
    with Daemon("--file", str(img), "--bind", "vhost", "--packed", name="vh-reset") as d:
        v = VhostVdpa(d.dev)
        try:
            v.iova.map(MiB, 8 * MiB)
            split = DRIVER_TRANSPORT_FEATURES & ~bit(F_RING_PACKED) & ~bit(F_RING_EVENT_IDX)
            drv = BlkDriver(v, transport_features=split)
            assert not drv.virtio.features & bit(F_RING_PACKED)
            drv.write(0, b"\x11" * 4096)
            assert v.get_vq_state(0) == (1,)
            assert drv.virtio.queues[0].interrupts
            drv.remove()  # status 0
            assert v.get_status() == 0
            drv = BlkDriver(v)  # every feature again: packed
            assert drv.virtio.features & bit(F_RING_PACKED)
            assert v.get_status() & Status.DRIVER_OK
            assert drv.read(0, 4096) == b"\x11" * 4096
            drv.write(4096, b"\x22" * 4096)
            assert v.get_vq_state(0)[:2] == (1, 2)  # avail wrap counter, avail index
            assert drv.virtio.queues[0].interrupts  # the call eventfd was bound again
            drv.remove()
            drv = BlkDriver(v, transport_features=split)
            assert drv.read(0, 8192) == b"\x11" * 4096 + b"\x22" * 4096
            drv.remove()
            # queues enabled after DRIVER_OK, as QEMU's vhost-vdpa-device did up to 8.2
            drv = BlkDriver(v, late_enable=True)
            assert drv.read(0, 8192) == b"\x11" * 4096 + b"\x22" * 4096
        finally:
            v.close()
        assert d.stop() == 0
    assert "broken" not in d.stderr()


DRIVER_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, os.getcwd())
from pyvduse.abi import virtio_blk as vb
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.model.vhost_vdpa import VhostVdpa
v = VhostVdpa(sys.argv[1])
v.iova.map(1 << 20, 16 << 20)
drv = BlkDriver(v)
for k in range(32):
    drv.submit(vb.ReqType.IN, k * 8, in_len=4096)
print("submitted", flush=True)
time.sleep(600)
"""


def test_driver_killed_with_requests_in_flight(tmp_path: Path) -> None:
    """A VMM dies (kill -9) with 32 requests hanging in the backend: the kernel resets the
    device on its behalf; the daemon abandons them after half the message timeout, the
    device is not broken and the next opener negotiates and serves."""
    with (
        NullBlk("vh-kill", size_mb=16, latency_us=0) as disk,
        Hangable("vh-kill-dm", disk.dev) as dm,
        Daemon(
            "--file",
            dm.dev,
            "--bind",
            "vhost",
            "--aio",
            "threads",
            "--cache",
            "none",
            "--msg-timeout",
            "4",
            name="vh-kill",
        ) as d,
    ):
        dm.suspend()
        child = subprocess.Popen(
            [sys.executable, "-c", DRIVER_SCRIPT, d.dev], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "submitted"
            wait_in_flight("vh-kill", 32)
            child.send_signal(signal.SIGKILL)
            child.wait()
            time.sleep(3)  # the reset's answer goes out after 2 s (half of msg_timeout)
        finally:
            child.kill()
            dm.resume()
        with driven(d.dev) as (_v, drv, _m):
            drv.write(0, b"\x5a" * 8192)
            assert drv.read(0, 8192) == b"\x5a" * 8192
            assert drv.get_id() == ""
        assert ctl_result("vh-kill", "stats")["total"]["in_flight"] == 0
        assert d.stop() == 0
    log = d.stderr()
    assert "abandoned" in log or "still in flight" in log, log[-3000:]
    assert "broken" not in log


def test_stop_waits_for_the_vm(tmp_path: Path) -> None:
    """SIGTERM while a VMM holds the node: the daemon keeps serving and detaches once the
    node is closed (vdpa dev del would wait for it uninterruptibly); a second SIGTERM
    leaves the device attached and the same command serves it again."""
    img = make_image(tmp_path / "stop.img", 8 * MiB)
    args = ("--file", str(img), "--bind", "vhost")
    d = Daemon(*args, name="vh-stop")
    with driven(d.dev) as (_v, drv, _m):
        drv.write(0, b"\x01" * 4096)
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while "serving it until it closes it" not in d.stderr():
            assert time.monotonic() < deadline, d.stderr()
            time.sleep(0.1)
        assert drv.read(0, 4096) == b"\x01" * 4096  # still served
        assert d.stop(signal.SIGTERM) == 0  # the second one: leave it attached
        assert "left vh-stop attached" in d.stderr()
        d = Daemon(*args, name="vh-stop")  # resumes the same device under the same driver
        assert "resumed" in d.stderr(), d.stderr()
        drv.write(4096, b"\x02" * 4096)
        assert drv.read(0, 8192) == b"\x01" * 4096 + b"\x02" * 4096
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert d.proc.poll() is None
    assert d.proc.wait(timeout=60) == 0  # the node was closed: detached and gone
    assert not Path("/dev/vduse/vh-stop").exists()
    assert "vh-stop" not in sh("vdpa dev show").stdout


class Keeper:
    """Keeps ``depth`` verified requests in flight: each slot writes fresh data to a block
    of its own, reads it back, compares, and moves on; every completion is waited for by
    its own ticket, so a lost one times out and a doubled one makes the ring driver raise
    (a completion for a request that is not in flight)."""

    def __init__(self, drv: BlkDriver, depth: int = 32, block: int = 4096) -> None:
        self.drv = drv
        self.depth = depth
        self.block = block
        self.rng = random.Random(9)
        self.written: dict[int, bytes] = {}  # offset -> what the last completed write put
        self.completed = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="keeper")

    def _write(self, slot: int) -> tuple[str, int, bytes, Pending]:
        off = (slot * 16 + self.rng.randrange(16)) * self.block
        data = self.rng.randbytes(self.block)
        return "write", off, data, self.drv.submit(vb.ReqType.OUT, off // SECTOR, out=data)

    def _run(self) -> None:
        try:
            pending = {slot: self._write(slot) for slot in range(self.depth)}
            while not self.stop.is_set():
                for slot, (kind, off, data, p) in list(pending.items()):
                    status, got, _ = self.drv.wait(p, 120)
                    assert status == vb.ReqStatus.OK, (kind, off, status)
                    self.completed += 1
                    if kind == "write":
                        self.written[off] = data
                        pending[slot] = (
                            "read",
                            off,
                            data,
                            self.drv.submit(vb.ReqType.IN, off // SECTOR, in_len=self.block),
                        )
                    else:
                        assert got == data, f"block at {off} read back wrong"
                        pending[slot] = self._write(slot)
            for kind, off, data, p in pending.values():
                status, got, _ = self.drv.wait(p, 120)
                assert status == vb.ReqStatus.OK
                if kind == "write":
                    self.written[off] = data
                else:
                    assert got == data
                self.completed += 1
        except BaseException as e:
            self.error = e


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_kill9_with_32_verified_requests_in_flight(ring: str) -> None:
    """kill -9 of the daemon while our driver keeps 32 verified requests in flight against
    a disk with an SSD's latency, restart, three times: every request completes once, with
    the right data, and the driver never noticed more than a pause."""
    with NullBlk("vh-crash", size_mb=32) as disk:
        args = ("--file", disk.dev, "--bind", "vhost", *(("--packed",) if ring == "packed" else ()))
        d = Daemon(*args, name="vh-crash")
        try:
            with driven(d.dev, size=16 * MiB) as (_v, drv, _m):
                keeper = Keeper(drv)
                keeper.thread.start()
                rng = random.Random(1)
                for _ in range(3):
                    time.sleep(rng.uniform(0.5, 1.5))
                    assert keeper.error is None, keeper.error
                    before = keeper.completed
                    d.proc.send_signal(signal.SIGKILL)
                    d.proc.wait()
                    d = Daemon(*args, name="vh-crash")
                    assert "resumed" in d.stderr(), d.stderr()
                    deadline = time.monotonic() + 60
                    while keeper.completed < before + 64 and keeper.error is None:
                        assert time.monotonic() < deadline, "requests stopped completing"
                        time.sleep(0.05)
                keeper.stop.set()
                keeper.thread.join(180)
                assert keeper.error is None, keeper.error
                assert keeper.completed > 3 * 64
                for off, data in keeper.written.items():
                    assert drv.read(off, len(data)) == data
        finally:
            if d.proc.poll() is None:
                assert d.stop() == 0, d.stderr()
