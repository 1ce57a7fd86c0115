"""A block device whose every read waits, like a disk across a network: an asyncio backend.

Each read sleeps ``delay`` seconds on the runtime's event loop before it returns its data,
so one queue keeps as many reads waiting as the driver sends (a queue that served one
request at a time would manage 1/delay of them per second). Serve it on the real kernel:

    python3 examples/laggy_blk.py --name laggy0 --size 64M --delay-ms 2

or drive it in-process through the model, as tests/unit/test_example_laggy.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pyvduse import BlkDevice, BlkOptions, MemoryBackend


class LaggyBackend(MemoryBackend):
    """RAM behind a slow link: reads are coroutines that wait ``delay`` seconds."""

    def __init__(self, size: int, delay: float) -> None:
        super().__init__(size)
        self.delay = delay
        self.waiting = 0  # reads waiting right now
        self.most_waiting = 0

    async def readv(self, offset: int, bufs: list[memoryview]) -> None:
        self.waiting += 1  # all on the event loop's thread: no lock needed
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await asyncio.sleep(self.delay)
            MemoryBackend.readv(self, offset, bufs)
        finally:
            self.waiting -= 1


def main() -> int:
    from pyvduse import Daemon, PyvduseError, check_kernel, parse_size

    ap = argparse.ArgumentParser(description="serve a block device whose reads are slow")
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--delay-ms", type=float, default=2.0)
    args = ap.parse_args()
    try:
        check_kernel()
        backend = LaggyBackend(parse_size(args.size), args.delay_ms / 1000)
        daemon = Daemon(BlkDevice(backend, BlkOptions()), args.name)
        daemon.on_ready = lambda d: print(f"READY name={d.name} dev={d.node}", flush=True)
        daemon.run(signals=True)  # until SIGINT or SIGTERM
        return 0
    except PyvduseError as e:
        print(f"laggy_blk: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
