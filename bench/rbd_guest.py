"""Guest half of bench/rbd.py: fio through pyvduse --rbd, qemu-storage-daemon driver=rbd and
the kernel's rbd.ko, on one image of one cluster.

Do not run this on a workstation: it starts a Ceph cluster, creates VDUSE devices, maps an
RBD image and writes to them. bench/rbd.py boots the test VM and runs it there:

    python bench/rbd_guest.py --out bench/results/.guest.json [--seconds 4] [--ramp 1]
                              [--workloads NAME,...] [--repeat N] [--our-args 'BLK OPTIONS']

One cluster (pyvduse.testing.ceph: one monitor, one memstore OSD on 127.0.0.1, no auth) and
one image, every byte written once before the first cell (so reads hit data). The image is
served three ways at once: by pyvduse (``blk --rbd``), by qemu-storage-daemon
(``--blockdev driver=rbd``, ``--export type=vduse-blk``), one queue of 256 each, both with
librbd's defaults (its cache included), and by the kernel's client (``rbd map``, the limit).
Each cell runs fio against the three in turn (ours and the peer's order alternating); the
exclusive lock moves to whichever client writes. Per cell: fio's figures, the serving
daemon's CPU time per I/O, the OSD's, and for pyvduse the queue depth from ``ctl stats``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from guest_runner import (
    QSD,
    QUEUE_SIZE,
    BenchError,
    Device,
    Workload,
    _log,
    _spawn,
    _wait,
    cpu_seconds,
    fio_cell_line,
    guest_info,
    launch_qsd,
    local_fio,
    measure_fio,
    stop,
    wait_ready,
)
from slow_disk_guest import ctl, stats_delta

from pyvduse.testing.ceph import CephCluster

WORKLOADS: tuple[Workload, ...] = (
    *(
        Workload(f"{rw}-4k-qd{depth}", rw, "4k", depth)
        for rw in ("randread", "randwrite")
        for depth in (1, 16)
    ),
    Workload("read-128k-qd8", "read", "128k", 8),
    Workload("write-128k-qd8", "write", "128k", 8),
)
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}
QUICK_WORKLOADS = ("randread-4k-qd1", "randwrite-4k-qd16", "read-128k-qd8")
IMAGE = "rbd/bench"
IMAGE_MB = 256
IMPLS = ("pyvduse", "qsd")
OUR_EXTRA: list[str] = []


def our_argv(conf: Path) -> list[str]:
    return [sys.executable, "-m", "pyvduse", "blk", "--name", "py-rbd", "--rbd", IMAGE,
            "--ceph-conf", str(conf), "--queues", "1", "--queue-size", str(QUEUE_SIZE),
            *OUR_EXTRA]  # fmt: skip


def qsd_argv(conf: Path) -> list[str]:
    pool, image = IMAGE.split("/")
    node = f"driver=rbd,node-name=n0,pool={pool},image={image},conf={conf},user=admin"
    export = (
        f"type=vduse-blk,id=e0,node-name=n0,name=qsd-rbd,writable=on,num-queues=1,queue-size={QUEUE_SIZE}"
    )
    return [QSD, "--blockdev", node, "--export", export]


def map_krbd(cluster: CephCluster) -> str:
    """``rbd map`` the image (no udev in the guest: ``noudev``); its /dev/rbdN."""
    dev: str = cluster.rbd("map", "-o", "noudev", IMAGE).strip()
    _wait(dev, lambda: Path(dev).exists(), 30)
    return dev


def unmap_krbd(cluster: CephCluster, dev: str) -> None:
    """``rbd unmap`` (no udev: ``noudev``); a failure is logged, the results are kept."""
    try:
        cluster.rbd("unmap", "-o", "noudev", dev)
    except (OSError, subprocess.SubprocessError) as e:
        _log(f"rbd unmap {dev}: {e}")


def prefill(cluster: CephCluster) -> None:
    """Every object of the image written once: reads then hit data, not holes."""
    cluster.rbd(
        "bench", "--io-type", "write", "--io-size", "4M", "--io-pattern", "seq",
        "--io-total", f"{IMAGE_MB}M", "--io-threads", "4", IMAGE, timeout=600,
    )  # fmt: skip


def run_one(
    impl: str, dev: str, d: Device | None, w: Workload, osd_pid: int, seconds: float, ramp: float, fio: Any
) -> dict[str, Any]:
    """One fio cell on ``dev``, served by the daemon ``d`` (None: the kernel's client)."""
    cell: dict[str, Any] = {"impl": impl, "workload": w.name, "rw": w.rw, "bs": w.bs, "iodepth": w.iodepth}
    cell["dev"] = dev
    if d is not None and d.proc.poll() is not None:
        cell["error"] = f"the daemon exited ({d.proc.returncode}) before this cell"
        cell["daemon_log"] = d.log_tail()
        return cell
    before = None
    osd0 = cpu_seconds(osd_pid)
    try:
        if impl == "pyvduse" and d is not None:
            before = ctl(d.name, "stats")
        measure_fio(cell, dev, None if d is None else d.pid, w, seconds, ramp, fio)
        if before is not None and d is not None:
            cell.update(stats_delta(before, ctl(d.name, "stats")))
    except Exception as e:  # fio's, the management client's: record, go on
        cell.setdefault("error", f"{type(e).__name__}: {e}")
    ios = cell.get("dev_ios")
    cell["osd_cpu_us_per_io"] = (cpu_seconds(osd_pid) - osd0) / ios * 1e6 if ios else None
    if "error" in cell and d is not None:
        cell["daemon_log"] = d.log_tail()[-1500:]
    return cell


def run_matrix(workloads: list[Workload], *, seconds: float, ramp: float, repeat: int) -> dict[str, Any]:
    started = time.monotonic()
    work = Path("/tmp/rbd-bench")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"info": guest_info(), "cells": [], "devices": []}
    with ExitStack() as stack:
        cluster = CephCluster(work / "ceph").start()
        stack.callback(cluster.stop)  # last (LIFO): after the daemons and the mapping
        t = time.monotonic()
        cluster.rbd("create", "--size", f"{IMAGE_MB}M", IMAGE)
        prefill(cluster)
        result["info"]["cluster_s"] = t - started
        result["info"]["prefill_s"] = time.monotonic() - t
        result["info"]["image_features"] = json.loads(cluster.rbd("info", "--format", "json", IMAGE))[
            "features"
        ]
        argv = our_argv(cluster.conf)
        ours = Device(
            "pyvduse",
            "rbd",
            1,
            "py-rbd",
            _spawn(argv, work / "py-rbd.log", stdout=subprocess.PIPE),
            work / "py-rbd.log",
            command=shlex.join(argv),
        )
        stack.callback(stop, ours)
        fio = local_fio(work)
        wait_ready([ours])
        qsd = launch_qsd("qsd-rbd", qsd_argv(cluster.conf), work, "rbd", 1)
        stack.callback(stop, qsd)
        krbd_dev = map_krbd(cluster)
        stack.callback(unmap_krbd, cluster, krbd_dev)
        assert cluster.osd is not None
        osd_pid = cluster.osd.pid
        # the kernel's client is no process of ours: no daemon, no daemon CPU
        devices: dict[str, tuple[str, Device | None]] = {
            "pyvduse": (ours.dev, ours),
            "qsd": (qsd.dev, qsd),
            "krbd": (krbd_dev, None),
        }
        status = ctl(ours.name, "status")
        result["devices"] = [
            {"impl": "pyvduse", "dev": ours.dev, "command": ours.command,
             "engines": [q.get("engine") for q in status.get("queues", [])]},
            {"impl": "qsd", "dev": qsd.dev, "command": qsd.command},
            {"impl": "krbd", "dev": krbd_dev, "command": f"rbd map -o noudev {IMAGE}"},
        ]  # fmt: skip
        result["setup_s"] = time.monotonic() - started
        _log(f"set up in {result['setup_s']:.1f} s")
        k = 0
        for w in workloads:
            for r in range(repeat):
                order = [*(IMPLS if k % 2 == 0 else IMPLS[::-1]), "krbd"]
                k += 1
                for impl in order:
                    dev, d = devices[impl]
                    cell = run_one(impl, dev, d, w, osd_pid, seconds, ramp, fio)
                    cell["round"] = r
                    result["cells"].append(cell)
                    _log(cell_line(cell))
    result["guest_total_s"] = time.monotonic() - started
    return result


def cell_line(c: dict[str, Any]) -> str:
    return fio_cell_line(f"{c['impl']:8} {c['workload']:17}", c)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--our-args", default="")
    args = p.parse_args(argv)
    OUR_EXTRA[:] = shlex.split(args.our_args)
    try:
        if not Path("/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so").exists():
            raise BenchError("qemu-storage-daemon has no driver=rbd: apt-get install qemu-block-extra")
        workloads = [WORKLOAD_BY_NAME[n] for n in args.workloads.split(",") if n]
        result = run_matrix(workloads, seconds=args.seconds, ramp=args.ramp, repeat=args.repeat)
    except (BenchError, KeyError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        result = {"fatal": f"{type(e).__name__}: {e} {detail}".strip()}
        _log(f"FATAL {result['fatal']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    with suppress(OSError):
        os.sync()
    return 1 if "fatal" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
