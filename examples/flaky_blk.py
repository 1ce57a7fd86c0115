"""A virtio-blk device that fails every Nth write: fault injection in a few lines.

Serve it on the real kernel (where the vduse module is loaded):

    python3 examples/flaky_blk.py --name flaky0 --size 64M --every 10

or drive it in-process through the model, as tests/unit/test_example_flaky.py does.
"""

from __future__ import annotations

import argparse
import sys

from pyvduse import BlkDevice, BlkOptions, Chain, MemoryBackend
from pyvduse.abi import virtio_blk as vb


class FlakyBlk(BlkDevice):
    """Like BlkDevice, but every ``every``-th write completes with IOERR and stores nothing."""

    def __init__(self, size: int, every: int, options: BlkOptions | None = None) -> None:
        super().__init__(MemoryBackend(size), options)
        self.every = every
        self.writes = 0
        self.failed = 0

    def handle(self, queue: int, chain: Chain) -> int:
        if chain.error is None and chain.writable and chain.readable:
            rtype = vb.OUTHDR.unpack(chain.read(0, vb.OUTHDR.size))[0]
            if rtype == vb.ReqType.OUT:
                self.writes += 1
                if self.writes % self.every == 0:
                    self.failed += 1
                    last = chain.writable[-1]
                    last[len(last) - 1] = vb.ReqStatus.IOERR  # the status byte
                    return 1
        return super().handle(queue, chain)


def main() -> int:
    from pyvduse import Daemon, PyvduseError, check_kernel, parse_size

    ap = argparse.ArgumentParser(description="serve a block device that fails every Nth write")
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    try:
        check_kernel()
        daemon = Daemon(FlakyBlk(parse_size(args.size), args.every), args.name)
        daemon.on_ready = lambda d: print(f"READY name={d.name} dev={d.node}", flush=True)
        daemon.run(signals=True)  # until SIGINT or SIGTERM
        return 0
    except PyvduseError as e:
        print(f"flaky_blk: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
