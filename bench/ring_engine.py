"""Microbenchmark of the ring engine on the in-process model driver (no kernel, no threads).

Requests per second per core through SplitQueue.pop -> BlkDevice.handle -> push/publish, for
null requests (FLUSH on the null backend) and 4 KiB reads copied from RAM, at batch sizes 1,
32 and 256. Prints a table and writes it as JSON.

    python3 bench/ring_engine.py [--seconds 2] [--json bench/results/ring_engine.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvduse.backend.memory import MemoryBackend
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkDevice
from pyvduse.model.arena import Arena
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.ring.split import SplitQueue

FEATURES = bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC)


def run(kind: str, batch: int, seconds: float) -> float:
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

    def make() -> int:
        return drv.add([vb.OUTHDR.pack(rtype, 0, 0)], writable, indirect=True)

    # Pre-build one batch of chains and recycle the same descriptors: the bench measures the
    # device side only.
    heads = [make() for _ in range(batch)]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=Path("bench/results/ring_engine.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'requests':<10}{'batch':>6}{'req/s/core':>14}")
    for kind in ("null", "4k-copy"):
        for batch in (1, 32, 256):
            rate = run(kind, batch, args.seconds)
            rows.append({"requests": kind, "batch": batch, "req_per_s": round(rate)})
            print(f"{kind:<10}{batch:>6}{rate:>14,.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
