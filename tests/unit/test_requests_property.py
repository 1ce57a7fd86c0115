"""Properties of requests in flight, on the model, with completions in an order hypothesis picks.

A device holds every request it is given; the test completes (or fails) them one by one in
a random order, interleaved with new requests, the driver collecting completions, driver
resets and the unmapping of memory that requests in flight use. Whatever the order:

- every request the driver still waits for is completed exactly once, with what the device
  wrote (the ring drivers raise on a completion for an id that is not in flight);
- a request completed after the reset that dropped it publishes nothing and writes nothing
  the driver can see (its mapping was fenced when the reset was answered);
- a request whose memory was unmapped while it ran completes as failed, and nothing it
  writes after the unmap reaches that memory: not even its failure, so its used length is 0
  (a driver reading a status byte the device says it wrote would read a stale one).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvduse.abi.virtio import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    DeviceId,
    bit,
)
from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
from pyvduse.device.request import Request
from pyvduse.model.arena import CoherentArena
from pyvduse.model.virtio_driver import DriverQueue, VirtioDriver
from pyvduse.ring.chain import Chain
from pyvduse.runtime.tuning import DataPath, QueueTuning
from pyvduse.testing.rig import ModelRig

NUM = 16
FAILED = 0xEE  # what a failed request writes last
COHERENT = 1 << 16  # the unmappable region where some requests keep their buffers


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # abandoned and failed requests are logged
    yield
    logging.disable(logging.NOTSET)


def pattern(tag: bytes, n: int) -> bytes:
    return (tag * (n // len(tag) + 1))[:n]


class Holding(VirtioDevice):
    """Keeps every request until the test completes it: fills its writable buffers with a
    pattern of its readable tag, and returns the length."""

    def __init__(self, packed: bool) -> None:
        super().__init__()
        self.packed = packed
        self.held: list[Request] = []

    def spec(self) -> DeviceSpec:
        f = REQUIRED_FEATURES | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)
        return DeviceSpec(DeviceId.BLOCK, f | (bit(F_RING_PACKED) if self.packed else 0), bytes(64), 1, NUM)

    def submit(self, request: Request) -> None:
        self.held.append(request)

    def write_failure(self, chain: Chain) -> int:
        """As virtio-blk does: a failure byte at the end of the last writable buffer."""
        if chain.writable and len(chain.writable[-1]):
            last = chain.writable[-1]
            last[len(last) - 1] = FAILED
            return 1
        return 0

    @staticmethod
    def serve(request: Request) -> int:
        tag = b"".join(bytes(b) for b in request.chain.readable)
        n = 0
        for w in request.chain.writable:
            w[:] = pattern(tag, len(w))
            n += len(w)
        return n


@dataclass
class Sent:
    ticket: int
    tag: bytes
    writable: list[tuple[int, int]]  # (iova, len)
    generation: int
    coherent: int | None  # the coherent allocation holding its buffers
    fate: str = "pending"  # pending, done, failed, poisoned, dropped


@dataclass
class World:
    rig: ModelRig
    device: Holding
    driver: VirtioDriver = field(init=False)
    queue: DriverQueue = field(init=False)
    coherent: CoherentArena = field(init=False)
    generation: int = 0
    sent: list[Sent] = field(default_factory=list)
    by_request: dict[int, Sent] = field(default_factory=dict)  # id(Request) -> what it is

    def __post_init__(self) -> None:
        self.probe()

    def probe(self) -> None:
        self.driver = VirtioDriver(self.rig.kernel)
        self.driver.probe()
        self.queue = self.driver.queues[0]
        self.coherent = CoherentArena(self.rig.kernel.iova, COHERENT)

    def in_flight(self) -> int:
        """Requests the driver has not collected (each holds a ring slot until then)."""
        return len(self.queue.ring.pending)

    def submit(self, size: int, coherent: bool) -> None:
        if self.in_flight() >= NUM // 2:
            return
        ring = self.queue.ring
        tag = os.urandom(4)
        if coherent:
            saved, ring.arena = ring.arena, self.coherent
        try:
            ticket = self.queue.submit([tag], [size], indirect=True)
        finally:
            if coherent:
                ring.arena = saved
        pending: dict[int, Any] = ring.pending
        writable = next(p[1] for p in pending.values() if p[2][0] == ticket)
        self.sent.append(
            Sent(ticket, tag, writable, self.generation, self.coherent.base if coherent else None)
        )
        deadline = time.monotonic() + 5  # the device has it: each step starts from a known state
        while True:
            got = [r for r in list(self.device.held) if b"".join(bytes(b) for b in r.chain.readable) == tag]
            if got:
                self.by_request[id(got[0])] = self.sent[-1]
                return
            assert time.monotonic() < deadline, "the device was never given the request"
            time.sleep(0.0005)

    def complete(self, k: int, fail: bool) -> None:
        held = self.device.held
        if not held:
            return
        r = held.pop(k % len(held))
        s = self.by_request[id(r)]  # not by its tag: a fenced request reads zeroes
        if fail:
            if s.fate == "pending":
                s.fate = "failed"
            r.fail()
        else:
            if s.fate == "pending":
                s.fate = "done"
            gone = s.fate in ("dropped", "poisoned")  # its memory is no longer the device's
            before = self.frozen_now(s) if gone else b""
            written = Holding.serve(r)
            if gone:
                assert self.frozen_now(s) == before, (
                    "a request wrote into driver memory after the reset or unmap was answered"
                )
            r.complete(written)
        if s.generation == self.generation and s.fate != "dropped":
            self.seen(s)

    def seen(self, s: Sent) -> None:
        """Wait until the driver has collected ``s``'s completion (its data read then), as a
        driver does before it frees a request's buffers: each step starts from a known
        state, and a later unmap cannot change what this request returned."""
        deadline = time.monotonic() + 5
        while s.ticket not in self.queue.done:
            assert time.monotonic() < deadline, "a completed request never reached the driver"
            self.collect()
            time.sleep(0.0005)

    def collect(self) -> None:
        with self.queue.lock:
            for c in self.queue.ring.collect():
                t, c.token = cast(tuple[int, object], c.token)
                self.queue.done[t] = c

    def frozen_now(self, s: Sent) -> bytes:
        return b"".join(self.rig.kernel.iova.read(a, n) for a, n in s.writable)

    def reset(self) -> None:
        self.collect()
        assert self.rig.kernel.reset()  # answered in time even with requests held
        assert not self.rig.kernel.broken
        for s in self.sent:
            if s.generation == self.generation and s.fate == "pending":
                s.fate = "dropped"
        self.generation += 1
        self.probe()

    def unmap(self) -> None:
        base = self.coherent.base
        assert self.rig.kernel.free_coherent(base)
        for s in self.sent:
            if s.coherent == base and s.generation == self.generation and s.fate == "pending":
                s.fate = "poisoned"  # the device had not finished it
        self.coherent = CoherentArena(self.rig.kernel.iova, COHERENT)


def finish(w: World) -> None:
    """Complete everything still held, then check every request's outcome."""
    while w.device.held:
        w.complete(0, fail=False)
    for s in w.sent:
        if s.generation != w.generation:  # dropped by a reset (checked as it completed)
            continue
        c = w.queue.wait(s.ticket, 5)
        data = c.data  # as the driver read it when it collected the completion
        if s.fate == "poisoned":
            # its failure byte went to fenced pages: the used length must not count it
            assert c.length == 0, "a request whose memory was unmapped did not fail"
        elif s.fate == "failed":
            assert c.length == 1 and data[-1] == FAILED
        else:
            assert c.length == sum(n for _, n in s.writable)
            assert data == pattern(s.tag, len(data))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 300), st.booleans()),
        st.tuples(st.just("complete"), st.integers(0, 64), st.booleans()),
        st.tuples(st.just("collect"), st.just(0), st.just(False)),
        st.tuples(st.just("reset"), st.just(0), st.just(False)),
        st.tuples(st.just("unmap"), st.just(0), st.just(False)),
    ),
    max_size=40,
)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=ops)
def test_completions_in_any_order_across_resets_and_unmaps(
    packed: bool, steps: list[tuple[str, int, bool]]
) -> None:
    resets = sum(op == "reset" for op, _, _ in steps)
    unmaps = sum(op == "unmap" for op, _, _ in steps)
    if resets + unmaps > 3:  # each waits out the grace: keep an example short
        steps = [s for s in steps if s[0] not in ("reset", "unmap")]
    device = Holding(packed)
    rig = ModelRig(
        device, msg_timeout=0.2, bounce_size=1 << 20, tuning=QueueTuning(data_path=DataPath.PYTHON)
    )
    with rig:
        w = World(rig, device)
        for op, a, b in steps:
            if op == "submit":
                w.submit(a, b)
            elif op == "complete":
                w.complete(a, b)
            elif op == "collect":
                w.collect()
            elif op == "reset":
                w.reset()
            else:
                w.unmap()
        finish(w)
