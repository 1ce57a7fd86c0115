"""Microbenchmark of the ring engines on the in-process model driver (no kernel).

Requests per second per core for null requests (FLUSH on the null backend) and 4 KiB reads
copied from RAM, at batch sizes 1, 32 and 256, through each engine:

- python: SplitQueue.pop -> BlkDevice.handle -> push/publish (the reference engine);
- native: the C loop of pyvduse.fastpath, one ``Engine.run`` call per batch (so at batch 1
  the figure includes a Python -> C call and a poll(2) per request).

Then queues in parallel, as the daemon runs them: one thread per queue, each with its own
ring, at batch 256, one queue against as many as the host has cores (at least 2). The
native loop releases the GIL, so its queues add up; the Python engine's share one GIL.

Prints both tables and writes them as JSON.

    python3 bench/ring_engine.py [--seconds 2] [--json bench/results/ring_engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.fastpath import engine as native
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.split import SplitQueue

FEATURES = bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)
PARALLEL_BATCH = 256


def setup(kind: str, batch: int) -> tuple[DriverSplitRing, SplitQueue, BlkDevice, list[int], Arena]:
    num = 256
    arena = Arena(16 << 20)
    drv = DriverSplitRing(arena, num)
    q = SplitQueue(arena.memory, num, drv.desc_addr, drv.avail_addr, drv.used_addr, FEATURES)
    if kind == "null":
        dev = BlkDevice(NullBackend(1 << 30))
        rtype, writable = vb.ReqType.FLUSH, [1]
    else:
        dev = BlkDevice(MemoryBackend(64 << 20))
        rtype, writable = vb.ReqType.IN, [4096, 1]
    # Pre-build one batch of chains and recycle the same descriptors: the bench measures the
    # device side only.
    heads = [drv.add([vb.OUTHDR.pack(rtype, 0, 0)], writable, indirect=True) for _ in range(batch)]
    return drv, q, dev, heads, arena


def run(kind: str, batch: int, seconds: float) -> float:
    drv, q, dev, heads, _ = setup(kind, batch)
    avail = drv.avail_idx
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(batch):
            chain = q.pop()
            assert chain is not None
            q.push(chain.head, dev.handle(0, chain))
        q.publish()
        q.enable_kicks()
        done += batch
        if time.perf_counter() >= end:
            break
        for k, h in enumerate(heads):  # the driver re-offers the same chains
            drv.set_avail_entry(avail + k, h)
        avail = (avail + batch) & 0xFFFF
        drv.set_avail_idx(avail)
    return done / (time.perf_counter() - start)


def run_native(kind: str, batch: int, seconds: float) -> float:
    drv, q, dev, heads, arena = setup(kind, batch)
    # batch divides the queue size, so avail slot s always names heads[s % batch]: fill the
    # avail ring once and let the "driver" only move its index.
    for s in range(q.num):
        drv.set_avail_entry(s, heads[s % batch])
    engine = native.build(
        native.require_plan(dev), 0, q, arena.memory, None, None, lambda i: None, lambda *e: None
    )
    kick, stop = os.eventfd(0), os.eventfd(1)  # run() serves what is there, then returns
    avail = drv.avail_idx
    rounds = 0
    start = time.perf_counter()
    end = start + seconds
    try:
        while True:
            code = engine.run(kick, stop)
            assert code == native.RUN_STOPPED
            rounds += 1
            if rounds % 64 == 0 and time.perf_counter() >= end:
                break
            avail = (avail + batch) & 0xFFFF
            drv.set_avail_idx(avail)
    finally:
        os.close(kick)
        os.close(stop)
    elapsed = time.perf_counter() - start
    done = int(engine.counters()["completed"])
    assert done == rounds * batch, (done, rounds, batch)
    return done / elapsed


#: Engine name -> the function that measures it: (kind, batch, seconds) -> requests/s.
ENGINES: dict[str, Callable[[str, int, float], float]] = {"python": run, "native": run_native}


def run_parallel(engine: Callable[[str, int, float], float], kind: str, queues: int, seconds: float) -> float:
    """Total requests/s of ``queues`` rings served at once, one thread each (as the daemon's
    queue workers), every ring set up before any starts."""
    rates = [0.0] * queues
    start = threading.Barrier(queues)

    def serve(i: int) -> None:
        start.wait()
        rates[i] = engine(kind, PARALLEL_BATCH, seconds)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def parallel_rows(engines: list[str], seconds: float) -> list[dict[str, object]]:
    """One queue against ``max(2, cores)`` queues on their own threads, per engine and kind."""
    queues = max(2, os.cpu_count() or 1)
    rows: list[dict[str, object]] = []
    print(f"\nqueues in parallel (batch {PARALLEL_BATCH}, one thread per queue, {os.cpu_count()} host cores)")
    print(f"{'requests':<10}{'engine':>8}{'1 queue req/s':>16}{f'{queues} queues req/s':>18}{'scaling':>9}")
    for kind in ("null", "4k-copy"):
        for e in engines:
            one = run_parallel(ENGINES[e], kind, 1, seconds)
            many = run_parallel(ENGINES[e], kind, queues, seconds)
            rows.append(
                {
                    "requests": kind,
                    "engine": e,
                    "queues": queues,
                    "one_queue_req_per_s": round(one),
                    "req_per_s": round(many),
                    "scaling": round(many / one, 2),
                }
            )
            print(f"{kind:<10}{e:>8}{one:>16,.0f}{many:>18,.0f}{many / one:>8.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=Path("bench/results/ring_engine.json"))
    args = ap.parse_args()
    engines = ["python"] + (["native"] if native.available() else [])
    rows: list[dict[str, object]] = []
    print(f"{'requests':<10}{'batch':>6}" + "".join(f"{e + ' req/s':>16}" for e in engines))
    for kind in ("null", "4k-copy"):
        for batch in (1, 32, 256):
            row: dict[str, object] = {"requests": kind, "batch": batch}
            line = f"{kind:<10}{batch:>6}"
            for e in engines:
                rate = ENGINES[e](kind, batch, args.seconds)
                row[f"{e}_req_per_s"] = round(rate)
                line += f"{rate:>16,.0f}"
            rows.append(row)
            print(line)
    parallel = parallel_rows(engines, args.seconds)
    if "native" not in engines:
        print("(native engine not built: pip install -e . with gcc and the Python headers)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"batches": rows, "parallel": parallel}, indent=2))


if __name__ == "__main__":
    main()
