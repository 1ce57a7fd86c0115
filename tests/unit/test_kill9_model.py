"""kill -9 the real runtime, over and over, while a driver keeps 16 or 64 requests in flight.

The model tests in ``test_crash_recovery_model`` stop a daemon between the steps they name;
this one lets the kernel pick the instruction. A forked child runs ``DeviceServer`` (the same
object ``pyvduse blk`` runs, with its worker threads) over driver memory in a shared
mapping, a state file and an image file; the parent plays virtio-blk: it writes blocks,
reads them back and checks every byte, kicks and waits for interrupts the way Linux does
(event index, re-armed after each round), and SIGKILLs the child at random moments. Each new
child resumes from the state file, like ``pyvduse blk --reconnect``. A lost, repeated or
misplaced completion shows up as a hang (no completion for seconds), a request the driver
never made, or a block that does not read back what was last written to it. The requests
complete out of order: on the Python engine through its thread pool over a file with a disk's
latency, on the native engine through io_uring.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, bit
from pyvduse.backend.file import FileBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.fastpath import engine as native
from pyvduse.model.arena import Arena
from pyvduse.model.packed_driver import DriverPackedRing
from pyvduse.model.split_driver import Completion, DriverSplitRing
from pyvduse.ring.memory import GuestMemory, RegionMap
from pyvduse.runtime.server import DeviceServer
from pyvduse.runtime.state_file import StateFile
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.transport.base import QueueSetup, Transport
from pyvduse.transport.model.iova import FirstFit

NUM = 128  # ring size: small, so the ring wraps often
DEPTHS = (16, 64)  # requests in flight, as fio --iodepth=16 and 64
BLOCK = 4096
BLOCKS = 160
HANG_SECONDS = 10.0
RING_BYTES = 1 << 16  # where the rings live; request buffers come after


class SharedArena(Arena):
    """Driver memory in a MAP_SHARED anonymous mapping, so a forked daemon sees it live.

    Rings come from the arena's bump allocator (once); request buffers are recycled through
    a first-fit heap, since a run makes tens of thousands of requests.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size, buf=memoryview(mmap.mmap(-1, size)))
        self._heap = FirstFit(RING_BYTES, size)

    def alloc_coherent(self, size: int, align: int = 16) -> int:
        iova = super().alloc(size, align)
        assert iova + size <= RING_BYTES
        return iova

    def alloc(self, size: int, align: int = 16) -> int:
        return self._heap.alloc(size, align)

    def free(self, iova: int) -> None:
        self._heap.free(iova)


class ChildTransport(Transport):
    """What the kernel gives a daemon: driver memory, a kick eventfd, an interrupt."""

    def __init__(self, memory: RegionMap, kick: int, irq: int) -> None:
        self._memory, self._kick, self._irq = memory, kick, irq

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    def kick_fd(self, index: int) -> int:
        return self._kick

    def notify(self, index: int) -> None:
        os.eventfd_write(self._irq, 1)

    def set_config(self, offset: int, data: bytes) -> None:
        raise AssertionError("no config changes here")

    def close(self) -> None:
        pass  # the child is killed, never closed


class SlowFile(FileBackend):
    """A file with a disk's latency (0-2 ms a request), so that the Python engine's thread
    pool keeps many requests in flight at every kill."""

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        time.sleep(random.uniform(0, 0.002))
        super().readv(offset, bufs)

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        time.sleep(random.uniform(0, 0.002))
        super().writev(offset, bufs)


@dataclass
class Rig:
    ring: str
    data_path: DataPath
    tmp: Path
    depth: int
    arena: SharedArena = field(init=False)
    options: BlkOptions = field(init=False)
    drv: DriverSplitRing | DriverPackedRing = field(init=False)
    features: int = field(init=False)

    def __post_init__(self) -> None:
        self.arena = SharedArena(RING_BYTES + 8 * self.depth * BLOCK)
        packed = self.ring == "packed"
        self.options = BlkOptions(packed=packed, queue_size=NUM)
        self.features = (
            bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) | (bit(F_RING_PACKED) if packed else 0)
        )
        self.drv = DriverPackedRing(self.arena, NUM) if packed else DriverSplitRing(self.arena, NUM)
        self.image = self.tmp / "disk.img"
        self.image.write_bytes(bytes(BLOCK * BLOCKS))
        self.irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def setup(self) -> QueueSetup:
        d = self.drv
        if isinstance(d, DriverPackedRing):
            return QueueSetup(0, NUM, d.desc_addr, d.driver_addr, d.device_addr, True)
        return QueueSetup(0, NUM, d.desc_addr, d.avail_addr, d.used_addr, True)

    def spawn(self, resume: bool) -> tuple[int, int]:
        """Fork a daemon serving the queue; returns (pid, its kick eventfd)."""
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        pid = os.fork()
        if pid == 0:  # the daemon: serve until killed
            try:
                slow = self.data_path is DataPath.PYTHON  # the native engine takes files only
                backend = (SlowFile if slow else FileBackend)(str(self.image))
                device = BlkDevice(backend, self.options)
                state = StateFile(self.tmp / "state", {"test": 1}, 1, NUM)
                server = DeviceServer(device, state, QueueTuning(data_path=self.data_path))
                server.bind(ChildTransport(self.arena.memory, kick, self.irq))
                device.accept_features(self.features)
                server.driver_ok(self.features, [self.setup()], resume=resume)
                while True:
                    time.sleep(60)
            finally:
                os._exit(1)
        return pid, kick


class Driver:
    """virtio-blk's part: issue writes and verified reads, wait for interrupts like Linux."""

    def __init__(self, rig: Rig, rng: random.Random) -> None:
        self.rig, self.rng, self.drv = rig, rng, rig.drv
        self.disk = [bytes(BLOCK)] * BLOCKS  # what each block holds once its write completed
        self.busy: set[int] = set()  # blocks with a request in flight
        self.completed = 0
        self.kick_fd = -1

    def submit(self) -> None:
        while len(self.drv.pending) < self.rig.depth:
            block = self.rng.choice([b for b in range(BLOCKS) if b not in self.busy])
            self.busy.add(block)
            sector = block * BLOCK // 512
            if self.rng.random() < 0.5:
                data = self.rng.randbytes(BLOCK)
                self.drv.add(
                    [vb.OUTHDR.pack(vb.ReqType.OUT, 0, sector), data],
                    [1],
                    indirect=True,
                    token=("w", block, data),
                )
            else:
                self.drv.add(
                    [vb.OUTHDR.pack(vb.ReqType.IN, 0, sector)],
                    [BLOCK, 1],
                    indirect=self.rng.random() < 0.8,
                    token=("r", block, None),
                )
        if self.drv.kick_needed():
            os.eventfd_write(self.kick_fd, 1)

    def complete(self, c: Completion) -> None:
        kind, block, data = cast(tuple[str, int, bytes | None], c.token)
        assert c.data[-1:] == b"\0", f"request {kind} {block} failed"
        if kind == "w":
            assert data is not None
            self.disk[block] = data
        else:
            assert c.data[:-1] == self.disk[block], f"block {block} reads back wrong data"
        self.busy.discard(block)
        self.completed += 1

    def reap(self) -> int:
        """One interrupt's work: collect, re-arm (EVENT_IDX), collect what raced the re-arm."""
        n = 0
        while True:
            done = self.drv.collect()
            for c in done:
                self.complete(c)
            n += len(done)
            if isinstance(self.drv, DriverPackedRing):
                self.drv.enable_interrupts()
            else:
                self.drv.set_used_event(self.drv.last_used)
            if not done:
                return n

    def run_until(self, deadline: float, describe: str) -> None:
        """Serve interrupts until ``deadline``; fail if nothing completes for HANG_SECONDS."""
        last = time.monotonic()
        while (now := time.monotonic()) < deadline:
            select.select([self.rig.irq], [], [], min(0.05, deadline - now))
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.rig.irq)
            try:
                progress = self.reap()
            except (KeyError, RuntimeError) as e:  # the model drivers' "not in flight"
                raise AssertionError(f"completion of a request not in flight ({e}) {describe}") from None
            if progress:
                last = time.monotonic()
                self.submit()
            elif time.monotonic() - last > HANG_SECONDS:
                raise AssertionError(f"no completion for {HANG_SECONDS} s: {describe}")


def ring_position(drv: DriverSplitRing | DriverPackedRing) -> str:
    if isinstance(drv, DriverPackedRing):
        return (
            f"driver avail {drv.next_avail}/{drv.avail_wrap} used {drv.next_used}/"
            f"{drv.used_wrap}, {len(drv.pending)} in flight, device event {drv.device_event()}"
        )
    return (
        f"driver avail {drv.avail_idx} last used {drv.last_used} used idx {drv.used_idx()}"
        f", {len(drv.pending)} in flight, avail event {drv.avail_event()}"
    )


RINGS = [("split", DataPath.PYTHON), ("packed", DataPath.PYTHON)]
if native.available():
    RINGS.append(("split", DataPath.NATIVE))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize(("ring", "data_path"), RINGS, ids=lambda v: getattr(v, "value", v))
def test_kill9_under_load_loses_and_repeats_nothing(
    tmp_path: Path, ring: str, data_path: DataPath, depth: int
) -> None:
    rig = Rig(ring, data_path, tmp_path, depth)
    rng = random.Random(9)
    d = Driver(rig, rng)
    pid, d.kick_fd = rig.spawn(resume=False)
    d.submit()
    kills = 0
    try:
        for kills in range(1, 61):
            d.run_until(time.monotonic() + rng.uniform(0.005, 0.08), f"before kill {kills}")
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if rng.random() < 0.3:  # the driver goes on while no daemon serves the queue
                d.reap()
                d.submit()
            os.close(d.kick_fd)
            pid, d.kick_fd = rig.spawn(resume=True)
        d.run_until(time.monotonic() + 0.3, "after the last restart")
        deadline = time.monotonic() + HANG_SECONDS
        d.submit = lambda: None  # type: ignore[method-assign]  # let the ring drain
        while d.drv.pending:
            assert time.monotonic() < deadline, f"requests left in flight: {ring_position(d.drv)}"
            d.run_until(time.monotonic() + 0.05, "draining")
    except AssertionError as e:
        raise AssertionError(
            f"after {kills} kill(s), {d.completed} completed: {e}; {ring_position(d.drv)}"
        ) from None
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert d.completed > 60
    on_disk = rig.image.read_bytes()
    for b in range(BLOCKS):
        assert on_disk[b * BLOCK : (b + 1) * BLOCK] == d.disk[b], f"block {b} on disk"
