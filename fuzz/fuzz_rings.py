"""Fuzz the ring engines for as long as asked and report cases per second.

    python3 fuzz/fuzz_rings.py [--seconds 60 | --cases N] [--seed S]

Random inputs are fed to ``fuzz.ring_cases.run_case``, which serves each with the Python
engine and, when the extension is built, with the native loop, and requires both to leave
the same bytes; a failing input is written to ``fuzz/crashes/`` and the run exits 1 (replay
it with ``python3 -c 'from fuzz.ring_cases import run_case; run_case(open(P, "rb").read())'``).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.ring_cases import run_case


def fuzz(seconds: float | None, cases: int | None, seed: int, report: bool = True) -> int:
    rng = random.Random(seed)
    start = time.monotonic()
    n = served = 0
    next_report = start + 5
    while True:
        if cases is not None and n >= cases:
            break
        if seconds is not None and time.monotonic() - start >= seconds:
            break
        data = rng.randbytes(rng.randrange(16, 1024))
        try:
            served += run_case(data)
        except Exception:
            out = Path(__file__).resolve().parent / "crashes"
            out.mkdir(exist_ok=True)
            path = out / f"case-{seed}-{n}.bin"
            path.write_bytes(data)
            traceback.print_exc()
            print(f"failing input saved to {path}", file=sys.stderr)
            return 1
        n += 1
        if report and time.monotonic() >= next_report:
            rate = n / (time.monotonic() - start)
            print(f"{n} cases, {rate:,.0f} cases/s, {served} chains served", flush=True)
            next_report += 5
    elapsed = time.monotonic() - start
    if report:
        print(
            f"done: {n} cases in {elapsed:.1f} s ({n / max(elapsed, 1e-9):,.0f} cases/s), "
            f"{served} chains served, no failures"
        )
    return 0


def main() -> int:
    logging.disable(logging.WARNING)  # bad requests are the point here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--cases", type=int)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    if args.seconds is None and args.cases is None:
        args.seconds = 60.0
    print(f"seed {args.seed}")
    return fuzz(args.seconds, args.cases, args.seed)


if __name__ == "__main__":
    sys.exit(main())
