"""virtio-fs served by ``pyvduse fs`` against bindfs (a C FUSE passthrough over /dev/fuse),
both over the same tmpfs directory, and the directory itself (the limit). Run it in the
test VM (it creates a VDUSE device and mounts it):

    pyvduse testvm --kernel 7.3 -- python3 bench/fs_vs_bindfs.py [--seconds 5]

Prints one table, every row measured in the same run: ours, peer (bindfs), limit (tmpfs),
ratio ours/peer. Needs fio and bindfs (``apt install bindfs``) where the guest sees them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    "seq write 1M (MiB/s)": ("write", "1M", 1, "bw"),
    "seq read 1M (MiB/s)": ("read", "1M", 1, "bw"),
    "rand read 4k qd16 (IOPS)": ("randread", "4k", 16, "iops"),
}
FILE_SIZE = "64M"


def fio(directory: Path, rw: str, bs: str, depth: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "fio",
            "--name=bench",
            f"--directory={directory}",
            f"--size={FILE_SIZE}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={depth}",
            "--ioengine=libaio",
            f"--runtime={seconds}",
            "--time_based",
            "--output-format=json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    job = json.loads(out)["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"bw": side["bw_bytes"] / (1 << 20), "iops": side["iops"]}


def metadata_ops(directory: Path, seconds: float) -> float:
    """Files created, stat'ed and unlinked per second (one of each per file)."""
    deadline = time.monotonic() + seconds
    n = 0
    start = time.monotonic()
    while time.monotonic() < deadline:
        p = directory / f"m{n}"
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
        os.stat(p)
        os.unlink(p)
        n += 1
    return n / (time.monotonic() - start)


def measure(directory: Path, seconds: float) -> dict[str, float]:
    out = {}
    for label, (rw, bs, depth, key) in WORKLOADS.items():
        out[label] = fio(directory, rw, bs, depth, seconds)[key]
    out["create+stat+unlink (files/s)"] = metadata_ops(directory, seconds)
    for f in directory.iterdir():
        f.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    for tool in ("fio", "bindfs"):
        if shutil.which(tool) is None:
            print(f"fs_vs_bindfs: {tool} is not installed: apt install {tool}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="fsbench-") as tmp:
        base = Path(tmp)
        shared, ours, peer = base / "shared", base / "ours", base / "peer"
        for p in (shared, ours, peer):
            p.mkdir()
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyvduse",
                "fs",
                "--name",
                "bench-fs",
                "--tag",
                "bench",
                "--dir",
                str(shared),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert daemon.stdout is not None
        line = daemon.stdout.readline()
        if not line.startswith("READY"):
            print(f"fs_vs_bindfs: pyvduse fs did not start: {line!r}", file=sys.stderr)
            return 1
        try:
            subprocess.run(["mount", "-t", "virtiofs", "bench", str(ours)], check=True)
            subprocess.run(["bindfs", str(shared), str(peer)], check=True)
            results: dict[str, dict[str, float]] = {}
            results["limit"] = measure(shared, args.seconds)
            results["peer"] = measure(peer, args.seconds)
            results["ours"] = measure(ours, args.seconds)
        finally:
            subprocess.run(["umount", str(ours)], check=False)
            subprocess.run(["fusermount", "-u", str(peer)], check=False)
            daemon.terminate()
            daemon.wait(60)
    print(f"{'workload':32} {'ours':>10} {'peer':>10} {'limit':>10} {'ratio':>6}")
    for label in results["ours"]:
        o, pe, lim = (results[k][label] for k in ("ours", "peer", "limit"))
        print(f"{label:32} {o:10.1f} {pe:10.1f} {lim:10.1f} {o / pe if pe else 0:6.2f}")
    print("(ratio = ours / peer; peer = bindfs over /dev/fuse; limit = the tmpfs directory itself)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
