"""Guest half of bench/slow_disk.py: fio on a slow disk, directly and through each daemon.

Do not run this on a workstation: it makes a null_blk device, creates VDUSE devices, attaches
them to the vdpa bus and writes to them. bench/slow_disk.py boots the test VM and runs it there:

    python bench/slow_disk_guest.py --out bench/results/.guest.json [--seconds 4] [--ramp 1]
                                    [--latency-us 250] [--size-mb 16384] [--repeat N]
                                    [--workloads NAME,...] [--modes NAME,...]
                                    [--our-args 'BLK OPTIONS']

A null_blk made through configfs whose every request completes `--latency-us` after it was
submitted (irqmode=2, completion_nsec; memory_backed=0, so no data is kept; hw_queue_depth 256,
so the device is not the limit at iodepth 64) stands in for an SSD. Every mode serves it at
once: the raw device (fio on /dev/nullbN itself: the limit), qemu-storage-daemon
(driver=host_device) with each aio mode, and pyvduse's `blk --file /dev/nullbN` with each
--aio and --cache; one queue of 256 each. Then every workload runs against every mode in turn
(the order reversed from one round to the next). Before each cell the null_blk's page cache
is written back and dropped (BLKFLSBUF), so no buffered mode reads what an earlier cell left.
Per cell it records fio's figures, the serving daemon's CPU time against the I/Os the device
completed (bench/guest_runner.py's accounting) and, for pyvduse, the queue depth and the
daemon's own request latency over the cell from `ctl stats`. A cell whose fio fails is
recorded with the error and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from guest_runner import (
    BLOCK_SIZE,
    QSD,
    QUEUE_SIZE,
    BenchError,
    Device,
    Fio,
    Workload,
    _log,
    _spawn,
    _wait,
    cpu_seconds,
    guest_info,
    launch_qsd,
    local_fio,
    measure_fio,
    stop,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from bench/: pyvduse is the checkout's
    sys.path.append(str(ROOT))

from pyvduse.ops import client  # noqa: E402
from pyvduse.ops.protocol import default_control_path  # noqa: E402

NULLB_ROOT = Path("/sys/kernel/config/nullb")
NULLB_NAME = "nullb0"  # the disk is /dev/nullb0
DEFAULT_LATENCY_US = 250
# Large, so that the buffered modes' page cache holds a small share of what 4k random reads
# touch (memory_backed=0: the size costs nothing).
DEFAULT_SIZE_MB = 16384
NULLB_QUEUE_DEPTH = 256
BLKFLSBUF = 0x1261  # _IO(0x12, 97): write back and drop a block device's page cache
STATS_TIMEOUT = 30.0

EFAULT_NOTE = (
    "direct I/O into VDUSE's bounce pages: the kernel cannot pin them (EFAULT), so every request fails"
)


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way of serving the slow disk: `impl` is raw (fio on the device itself), qsd or
    pyvduse; `options` are qsd's --blockdev options or pyvduse blk's options."""

    name: str
    impl: str
    options: tuple[str, ...] = ()
    expect_failure: str = ""

    @property
    def label(self) -> str:
        if self.impl == "raw":
            return "fio on the device"
        if self.impl == "qsd":
            return ",".join(self.options)
        return " ".join(self.options) or "(no options)"


MODES: tuple[Mode, ...] = (
    Mode("raw", "raw"),
    Mode("qsd-threads", "qsd", ("aio=threads",)),
    Mode("qsd-io_uring", "qsd", ("aio=io_uring",)),
    Mode("qsd-native-direct", "qsd", ("aio=native", "cache.direct=on"), expect_failure=EFAULT_NOTE),
    Mode("py-defaults", "pyvduse"),  # what a user gets: pyvduse blk --file /dev/nullb0
    Mode("py-io_uring", "pyvduse", ("--aio", "io_uring", "--cache", "writeback")),
    Mode("py-io_uring-direct", "pyvduse", ("--aio", "io_uring", "--cache", "none")),
    # Direct I/O straight into the bounce buffer, registered as the daemon's own memory
    # (VDUSE_IOTLB_REG_UMEM), against the copy through aligned buffers of the line above.
    Mode(
        "py-io_uring-direct-umem",
        "pyvduse",
        ("--aio", "io_uring", "--cache", "none", "--bounce-memory", "daemon"),
    ),
    Mode("py-threads", "pyvduse", ("--aio", "threads", "--cache", "writeback")),
    Mode("py-sync", "pyvduse", ("--aio", "sync", "--cache", "writeback")),
)
MODE_BY_NAME = {m.name: m for m in MODES}
IMPLS = ("pyvduse", "qsd", "raw")

WORKLOADS: tuple[Workload, ...] = tuple(
    Workload(f"{rw}-4k-qd{depth}", rw, "4k", depth)
    for rw in ("randread", "randwrite")
    for depth in (1, 16, 64)
)
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}

QUICK_WORKLOADS = ("randread-4k-qd1", "randread-4k-qd16")
QUICK_MODES = ("raw", "qsd-threads", "qsd-io_uring", "py-defaults", "py-io_uring", "py-threads")


def device_name(mode: Mode) -> str:
    """The VDUSE/vdpa device name of a mode's daemon."""
    return "sd-" + mode.name.replace("_", "")


# --------------------------------------------------------------------------- null_blk


def nullb_attrs(size_mb: int, latency_us: int) -> dict[str, int]:
    """The configfs attributes of the slow disk, in the order they are written (power last)."""
    attrs = {
        "size": size_mb,
        "blocksize": BLOCK_SIZE,
        "memory_backed": 0,
        "hw_queue_depth": NULLB_QUEUE_DEPTH,
        "submit_queues": 1,
    }
    if latency_us:
        attrs.update(irqmode=2, completion_nsec=latency_us * 1000)
    return attrs


class NullBlk:
    """A null_blk device made through configfs (the test VM loads null_blk with
    nr_devices=0 and mounts configfs)."""

    def __init__(self, name: str, size_mb: int, latency_us: int) -> None:
        self.dir = NULLB_ROOT / name
        if not NULLB_ROOT.is_dir():
            raise BenchError(f"{NULLB_ROOT} is missing: null_blk not loaded or configfs not mounted")
        if self.dir.exists():  # left by an earlier run in this guest
            with suppress(OSError):
                (self.dir / "power").write_text("0")
            self.dir.rmdir()
        self.dir.mkdir()
        try:
            attrs = nullb_attrs(size_mb, latency_us)
            missing = [a for a in attrs if not (self.dir / a).exists()]
            if missing:
                raise BenchError(
                    f"null_blk has no configfs attribute {', '.join(missing)} "
                    f"(it has {', '.join(sorted(p.name for p in self.dir.iterdir()))})"
                )
            for attr, value in attrs.items():
                (self.dir / attr).write_text(str(value))
            (self.dir / "power").write_text("1")
            # Linux 6.12 names the disk after the configfs directory; older ones nullbINDEX.
            index = (self.dir / "index").read_text().strip()
            nodes = [f"/dev/{name}", f"/dev/nullb{index}"]
            _wait(" or ".join(nodes), lambda: any(os.path.exists(n) for n in nodes), 10)
            self.dev = next(n for n in nodes if os.path.exists(n))
            self.config = {a: (self.dir / a).read_text().strip() for a in (*attrs, "power", "index")}
        except BaseException:
            self.close()
            raise

    def flush(self) -> None:
        """Write back and drop the device's page cache (what the buffered modes left)."""
        fd = os.open(self.dev, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, BLKFLSBUF)
        finally:
            os.close(fd)

    def close(self) -> None:
        with suppress(OSError):
            (self.dir / "power").write_text("0")
        with suppress(OSError):
            self.dir.rmdir()


# --------------------------------------------------------------------------- daemons


#: Extra ``pyvduse blk`` options for every pyvduse mode (``--our-args``), for experiments.
OUR_EXTRA: list[str] = []


def our_argv(mode: Mode, dev: str, serial: str) -> list[str]:
    return [sys.executable, "-m", "pyvduse", "blk", "--name", device_name(mode), "--file", dev,
            "--queues", "1", "--queue-size", str(QUEUE_SIZE), "--block-size", str(BLOCK_SIZE),
            "--serial", serial, *mode.options, *OUR_EXTRA]  # fmt: skip


def qsd_argv(mode: Mode, dev: str, serial: str) -> list[str]:
    # Several daemons open the device at once: QEMU's image locking off.
    node = ",".join(["driver=host_device", "node-name=n0", f"filename={dev}", "locking=off", *mode.options])
    export = (
        f"type=vduse-blk,id=e0,node-name=n0,name={device_name(mode)},writable=on,"
        f"num-queues=1,queue-size={QUEUE_SIZE},logical-block-size={BLOCK_SIZE},"
        f"serial={serial}"
    )
    return [QSD, "--blockdev", node, "--export", export]


def start_ours(mode: Mode, dev: str, serial: str, workdir: Path) -> Device:
    name = device_name(mode)
    argv = our_argv(mode, dev, serial)
    log = workdir / f"{name}.log"
    proc = _spawn(argv, log, stdout=subprocess.PIPE)
    return Device("pyvduse", mode.name, 1, name, proc, log, command=" ".join(argv))


def ctl(name: str, cmd: str) -> dict[str, Any]:
    """One request to our daemon's management socket; its result."""
    reply = client.request(default_control_path(name), {"cmd": cmd}, timeout=STATS_TIMEOUT)
    if "error" in reply:
        raise BenchError(f"ctl {name} {cmd}: {reply['error']}")
    result: dict[str, Any] = reply["result"]
    return result


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Our daemon's queue depth and request latency over one cell, from two `stats` replies
    (one queue: the totals): the mean depth when each request was taken, the depth histogram
    of the cell ({bound: count}, bucket b counting depths in [b/2, b)) and the mean time the
    daemon held a request."""
    d0, d1 = before["total"]["depth"], after["total"]["depth"]
    l0, l1 = before["total"]["latency"], after["total"]["latency"]
    n = d1["count"] - d0["count"]
    hist0 = {int(b): c for b, c in d0["buckets"]}
    hist = {int(b): c - hist0.get(int(b), 0) for b, c in d1["buckets"]}
    completed = l1["count"] - l0["count"]
    return {
        "depth_requests": n,
        "depth_mean": (d1["sum"] - d0["sum"]) / n if n else None,
        "depth_hist": {str(b): c for b, c in sorted(hist.items()) if c},
        "daemon_lat_us": (l1["sum_us"] - l0["sum_us"]) / completed if completed else None,
    }


def our_queue_status(status: dict[str, Any]) -> dict[str, Any]:
    """What `status` says our daemon runs: cache and aio, and each queue's engine and aio."""
    return {
        "aio": status.get("aio"),
        "cache": status.get("cache"),
        "queues": [{"engine": q.get("engine"), "aio": q.get("aio")} for q in status.get("queues", [])],
    }


# --------------------------------------------------------------------------- cells


def _order(modes: Sequence[Mode], k: int) -> list[Mode]:
    """Forward in even rounds, reversed in odd ones: no mode always runs right after another."""
    return list(modes) if k % 2 == 0 else list(reversed(modes))


def _cpu_of(pids: Sequence[int]) -> float:
    """CPU seconds of these processes together (a dead one counts nothing)."""
    total = 0.0
    for pid in pids:
        with suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


def run_one(
    mode: Mode,
    w: Workload,
    *,
    disk: NullBlk,
    devices: dict[str, Device],
    start_errors: dict[str, str],
    seconds: float,
    ramp: float,
    fio: Fio,
) -> dict[str, Any]:
    """One cell: `w` on `mode`'s device; never raises for a failure of the thing measured."""
    cell: dict[str, Any] = {
        "impl": mode.impl,
        "mode": mode.name,
        "workload": w.name,
        "iodepth": w.iodepth,
        "rw": w.rw,
    }
    if mode.expect_failure:
        cell["expected_failure"] = mode.expect_failure
    if mode.name in start_errors:
        cell["error"] = f"did not start: {start_errors[mode.name]}"
        return cell
    d = devices.get(mode.name)
    if d is not None and d.proc.poll() is not None:
        cell["error"] = f"the daemon exited ({d.proc.returncode}) before this cell"
        cell["daemon_log"] = d.log_tail()
        return cell
    try:
        disk.flush()
    except OSError as e:
        cell["flush_error"] = str(e)
    before = None
    # The daemons not serving this cell should sleep: their CPU time over it says if not.
    idle = [x.pid for x in devices.values() if x is not d]
    idle0 = _cpu_of(idle)
    try:
        if d is None:
            cell["dev"] = disk.dev
            measure_fio(cell, disk.dev, None, w, seconds, ramp, fio)
        else:
            cell["dev"] = d.dev
            if d.impl == "pyvduse":
                before = ctl(d.name, "stats")
            measure_fio(cell, d.dev, d.pid, w, seconds, ramp, fio)
            if before is not None:
                cell.update(stats_delta(before, ctl(d.name, "stats")))
    except (OSError, subprocess.SubprocessError, BenchError, client.NoDaemon, client.ClientError) as e:
        cell.setdefault("error", f"{type(e).__name__}: {e}")
    cell["idle_daemons_cpu_s"] = _cpu_of(idle) - idle0
    if d is not None and ("error" in cell or d.proc.poll() is not None):
        if d.proc.poll() is not None:
            cell["daemon_exit"] = d.proc.returncode
        cell["daemon_log"] = d.log_tail()[-1500:]
    return cell


def run_matrix(
    modes: Sequence[Mode],
    workloads: Sequence[Workload],
    *,
    seconds: float,
    ramp: float,
    repeat: int,
    latency_us: int,
    size_mb: int,
) -> dict[str, Any]:
    started = time.monotonic()
    work = Path("/tmp/slow-disk-bench")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"info": guest_info(), "cells": [], "devices": []}
    start_errors: dict[str, str] = {}
    devices: dict[str, Device] = {}
    with ExitStack() as stack:
        disk = NullBlk(NULLB_NAME, size_mb, latency_us)
        stack.callback(disk.close)  # after every daemon has stopped (LIFO)
        result["nullb"] = {"dev": disk.dev, **disk.config}
        _log(f"{disk.dev}: null_blk {disk.config}")
        t = time.monotonic()
        # Ours first, all at once (Python's start-up is the slowest step); fio's copy to
        # tmpfs overlaps it.
        ours = {}
        for i, m in enumerate(modes):
            if m.impl == "pyvduse":
                d = start_ours(m, disk.dev, f"sd{i}", work)
                stack.callback(stop, d)
                ours[m.name] = d
        fio = local_fio(work)
        for name, d in ours.items():
            try:
                wait_ready([d])
                devices[name] = d
            except BenchError as e:
                start_errors[name] = str(e)
                _log(f"{name}: {e}")
        _log(f"{len(devices)} of {len(ours)} pyvduse daemons ready in {time.monotonic() - t:.1f} s")
        for i, m in enumerate(modes):
            if m.impl != "qsd":
                continue
            try:
                d = launch_qsd(device_name(m), qsd_argv(m, disk.dev, f"sd{i}"), work, m.name, 1)
            except BenchError as e:
                start_errors[m.name] = str(e)
                _log(f"{m.name}: {e}")
                continue
            stack.callback(stop, d)
            devices[m.name] = d
        for m in modes:
            served = devices.get(m.name)
            entry: dict[str, Any] = {
                "mode": m.name,
                "impl": m.impl,
                "label": m.label,
                "dev": served.dev if served else (disk.dev if m.impl == "raw" else None),
                "command": served.command if served else None,
                "start_error": start_errors.get(m.name),
            }
            if served is not None and served.impl == "pyvduse":
                try:
                    entry["status"] = our_queue_status(ctl(served.name, "status"))
                except (BenchError, client.NoDaemon, client.ClientError) as e:
                    entry["status_error"] = str(e)
            result["devices"].append(entry)
        result["setup_s"] = time.monotonic() - started
        _log(
            f"set up in {result['setup_s']:.1f} s: {len(devices)} daemons, "
            f"{len(start_errors)} failed to start"
        )
        k = 0
        for w in workloads:
            for r in range(repeat):
                for m in _order(modes, k):
                    cell = run_one(
                        m,
                        w,
                        disk=disk,
                        devices=devices,
                        start_errors=start_errors,
                        seconds=seconds,
                        ramp=ramp,
                        fio=fio,
                    )
                    cell["round"] = r
                    result["cells"].append(cell)
                    _log(cell_line(cell))
                k += 1
        for d in devices.values():  # what the daemons said, for the record
            if d.impl == "pyvduse":
                entry = next(e for e in result["devices"] if e["mode"] == d.backend)
                with suppress(BenchError, client.NoDaemon, client.ClientError):
                    entry["final_stats_total"] = ctl(d.name, "stats")["total"]
    for d in devices.values():
        entry = next(e for e in result["devices"] if e["mode"] == d.backend)
        entry["exit_status"] = d.proc.returncode  # after SIGTERM: 0 expected
        if d.proc.returncode != 0:
            entry["log_tail"] = d.log_tail()
    result["guest_total_s"] = time.monotonic() - started
    return result


def _fig(c: dict[str, Any], key: str, fmt: str = ".0f") -> str:
    v = c.get(key)
    return "-" if v is None else format(v, fmt)


def cell_line(c: dict[str, Any]) -> str:
    head = f"{c['mode']:19} {c['workload']:17}"
    if "error" in c:
        tag = "expected failure" if c.get("expected_failure") else "ERROR"
        return f"{head} {tag}: {c['error'][-300:]}"
    return (
        f"{head} {c['iops']:8.0f} IOPS lat {c['lat_mean_us']:7.0f} us  "
        f"cpu {_fig(c, 'cpu_us_per_io')} us/IO  guest {_fig(c, 'guest_cpu_us_per_io')} us/IO  "
        f"depth {_fig(c, 'depth_mean', '.1f')}  daemon lat {_fig(c, 'daemon_lat_us')} us  "
        f"idle daemons {_fig(c, 'idle_daemons_cpu_s', '.2f')} s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="result JSON (host-visible path)")
    p.add_argument("--seconds", type=float, default=4.0, help="fio runtime per cell")
    p.add_argument("--ramp", type=float, default=1.0, help="fio ramp_time per cell")
    p.add_argument("--latency-us", type=int, default=DEFAULT_LATENCY_US, help="null_blk's completion latency")
    p.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB, help="null_blk's size")
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    p.add_argument("--modes", default=",".join(m.name for m in MODES))
    p.add_argument("--repeat", type=int, default=1, help="rounds of every cell")
    p.add_argument("--our-args", default="", help="extra 'pyvduse blk' options for our daemons")
    args = p.parse_args(argv)
    OUR_EXTRA[:] = shlex.split(args.our_args)
    try:
        workloads = [WORKLOAD_BY_NAME[n] for n in args.workloads.split(",") if n]
        modes = [MODE_BY_NAME[n] for n in args.modes.split(",") if n]
        result = run_matrix(
            modes,
            workloads,
            seconds=args.seconds,
            ramp=args.ramp,
            repeat=args.repeat,
            latency_us=args.latency_us,
            size_mb=args.size_mb,
        )
    except (BenchError, KeyError, OSError, subprocess.SubprocessError) as e:
        result = {"fatal": f"{type(e).__name__}: {e}"}
        _log(f"FATAL {result['fatal']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    return 1 if "fatal" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
