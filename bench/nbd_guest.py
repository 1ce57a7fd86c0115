"""Guest half of bench/nbd.py: fio through pyvduse --nbd and qemu-storage-daemon driver=nbd.

Do not run this on a workstation: it starts NBD servers, creates VDUSE devices and writes to
them. bench/nbd.py boots the test VM and runs it there:

    python bench/nbd_guest.py --out bench/results/.guest.json [--seconds 4] [--ramp 1]
                              [--workloads NAME,...] [--servers NAME,...] [--repeat N]
                              [--our-args 'BLK OPTIONS'] [--perf WORKLOAD ...]

Two nbdkit servers of the same kind serve a 1 GiB memory disk on Unix sockets: one plain,
one behind nbdkit's delay filter (every read and write answered 1 ms late; 64 server
threads, so the server is not what limits 64 in flight). Each is exported four times: by
pyvduse with no options but ``--nbd URI`` (``py-defaults``: what a user types), by pyvduse
with the options spelled out and ``--our-args`` (``pyvduse``: ``--queues 1 --queue-size
256``), by qemu-storage-daemon (``--blockdev driver=nbd``, ``--export type=vduse-blk``, one
queue of 256) and by the kernel's own NBD client (``nbd-client -unix`` with ``nbd.ko``: no
VDUSE, no daemon in the data path; the limit). The same fio cell then runs against the four
devices back to back (the order reversed from cell to cell). Per cell: fio's figures, the
serving daemon's CPU time per I/O (none for the kernel's client), the server's, and for
pyvduse the queue depth from ``ctl stats``; with ``--perf WORKLOAD``, that workload's cells
sample the whole guest with perf (where its CPU time went, per task and symbol).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from guest_runner import (
    NODE_TIMEOUT,
    QSD,
    QUEUE_SIZE,
    BenchError,
    Device,
    Workload,
    _log,
    _run,
    _spawn,
    _wait,
    cpu_seconds,
    fio_cell_line,
    guest_info,
    launch_qsd,
    local_fio,
    measure_fio,
    perf_record,
    perf_report,
    stop,
    wait_ready,
)
from slow_disk_guest import ctl, stats_delta

WORKLOADS: tuple[Workload, ...] = (
    *(
        Workload(f"{rw}-4k-qd{depth}", rw, "4k", depth)
        for rw in ("randread", "randwrite")
        for depth in (1, 16, 64)
    ),
    Workload("read-128k-qd8", "read", "128k", 8),
    Workload("write-128k-qd8", "write", "128k", 8),
)
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}
#: Server name -> (nbdkit filters, their parameters), and the delay each request gets (µs).
SERVERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "plain": ((), (), 0),
    "delay-1ms": (("--filter=delay",), ("delay-read=1ms", "delay-write=1ms"), 1000),
}
QUICK_WORKLOADS = ("randread-4k-qd1", "randread-4k-qd16", "randwrite-4k-qd16", "read-128k-qd8")
DISK_MB = 1024
SERVER_THREADS = 64
#: py-defaults: pyvduse with no options but --nbd; pyvduse: with the options spelled out (and
#: --our-args); qsd: qemu-storage-daemon; kernel: nbd-client with nbd.ko.
IMPLS = ("py-defaults", "pyvduse", "qsd", "kernel")
OURS = ("py-defaults", "pyvduse")
OUR_EXTRA: list[str] = []
#: Workloads whose cells are sampled with perf (--perf): the whole guest, every serving side.
PERF_WORKLOADS: list[str] = []
NBD_CLIENT_PACKAGE = "nbd-client"


@dataclasses.dataclass
class KernelClient:
    """One /dev/nbdN the kernel's NBD client serves (nbd-client configured it over netlink
    and exited: the kernel's own threads carry the requests, no process to measure)."""

    server: str
    dev: str
    command: str
    impl: str = "kernel"

    @property
    def name(self) -> str:
        return Path(self.dev).name


def socket_path(work: Path, server: str) -> Path:
    return work / f"{server}.sock"


def uri(work: Path, server: str) -> str:
    return f"nbd+unix:///?socket={socket_path(work, server)}"


def nbdkit_argv(work: Path, server: str) -> list[str]:
    filters, params, _ = SERVERS[server]
    return [
        "nbdkit",
        "-f",
        "--threads",
        str(SERVER_THREADS),
        "-U",
        str(socket_path(work, server)),
        *filters,
        "memory",
        f"{DISK_MB}M",
        *params,
    ]


def device_name(impl: str, server: str) -> str:
    prefix = {"py-defaults": "pyd", "pyvduse": "py", "qsd": "qsd"}[impl]
    return f"{prefix}-nbd-{server.replace('-', '')}"


def our_argv(work: Path, server: str, impl: str = "pyvduse") -> list[str]:
    """``pyvduse blk`` for one of ours: py-defaults with nothing but --name and --nbd (what
    a user types), pyvduse with the options spelled out and --our-args."""
    argv = [sys.executable, "-m", "pyvduse", "blk", "--name", device_name(impl, server),
            "--nbd", uri(work, server)]  # fmt: skip
    if impl == "pyvduse":
        argv += ["--queues", "1", "--queue-size", str(QUEUE_SIZE), *OUR_EXTRA]
    return argv


def nbd_client_argv(work: Path, server: str, dev: str) -> list[str]:
    """The kernel's NBD client on the same server: one connection (one hardware queue, as
    the daemons have one virtqueue), the same 512-byte logical blocks."""
    return ["nbd-client", "-unix", str(socket_path(work, server)), dev, "-block-size", "512"]


def start_kernel_client(work: Path, server: str, index: int) -> KernelClient:
    """Connect /dev/nbd<index> to the server with nbd-client; wait for its size."""
    if shutil.which("nbd-client") is None:
        raise BenchError(f"nbd-client is not installed: apt-get install {NBD_CLIENT_PACKAGE}")
    if not Path("/sys/block/nbd0").exists():
        _run(["modprobe", "nbd"])
    dev = f"/dev/nbd{index}"
    argv = nbd_client_argv(work, server, dev)
    _run(argv, timeout=60)
    size = Path(f"/sys/block/nbd{index}/size")
    _wait(f"the size of {dev}", lambda: size.exists() and int(size.read_text() or 0) > 0, NODE_TIMEOUT)
    return KernelClient(server, dev, shlex.join(argv))


def stop_kernel_client(k: KernelClient) -> None:
    with suppress(BenchError, OSError, subprocess.SubprocessError):
        _run(["nbd-client", "-d", k.dev], timeout=60)


def qsd_argv(work: Path, server: str) -> list[str]:
    node = f"driver=nbd,node-name=n0,server.type=unix,server.path={socket_path(work, server)}"
    export = (
        f"type=vduse-blk,id=e0,node-name=n0,name={device_name('qsd', server)},"
        f"writable=on,num-queues=1,queue-size={QUEUE_SIZE}"
    )
    return [QSD, "--blockdev", node, "--export", export]


def start_server(work: Path, server: str) -> subprocess.Popen[bytes]:
    sock = socket_path(work, server)
    sock.unlink(missing_ok=True)
    proc = _spawn(nbdkit_argv(work, server), work / f"nbdkit-{server}.log")

    def up() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"nbdkit {server} exited ({proc.returncode})")
        return sock.exists()

    _wait(f"nbdkit {server}", up, 30)
    return proc


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_one(
    d: Device | KernelClient, w: Workload, server: str, server_pid: int, seconds: float, ramp: float, fio: Any
) -> dict[str, Any]:
    cell: dict[str, Any] = {
        "impl": d.impl,
        "server": server,
        "workload": w.name,
        "rw": w.rw,
        "bs": w.bs,
        "iodepth": w.iodepth,
        "dev": d.dev,
        "delay_us": SERVERS[server][2],
    }
    daemon = d if isinstance(d, Device) else None
    if daemon is not None and daemon.proc.poll() is not None:
        cell["error"] = f"the daemon exited ({daemon.proc.returncode}) before this cell"
        cell["daemon_log"] = daemon.log_tail()
        return cell
    before = None
    server0 = cpu_seconds(server_pid)
    perf = None
    data = f"/tmp/nbd-bench/perf-{d.impl}-{server}-{w.name}.data"
    try:
        if d.impl in OURS:
            before = ctl(d.name, "stats")
        if w.name in PERF_WORKLOADS:
            perf = perf_record(data, ramp + seconds)
        measure_fio(cell, d.dev, None if daemon is None else daemon.pid, w, seconds, ramp, fio)
        if perf is not None:
            perf.wait(60)
            cell["perf"] = perf_report(data)
        if before is not None:
            cell.update(stats_delta(before, ctl(d.name, "stats")))
    except (OSError, subprocess.SubprocessError, BenchError) as e:
        cell.setdefault("error", f"{type(e).__name__}: {e}")
    except Exception as e:  # the management client's errors: record, go on
        cell.setdefault("error", f"{type(e).__name__}: {e}")
    ios = cell.get("dev_ios")
    cell["server_cpu_us_per_io"] = (cpu_seconds(server_pid) - server0) / ios * 1e6 if ios else None
    if "error" in cell and daemon is not None:
        cell["daemon_log"] = daemon.log_tail()[-1500:]
    return cell


def run_matrix(
    workloads: list[Workload], servers: list[str], *, seconds: float, ramp: float, repeat: int
) -> dict[str, Any]:
    started = time.monotonic()
    work = Path("/tmp/nbd-bench")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"info": guest_info(), "cells": [], "devices": []}
    with ExitStack() as stack:
        procs = {}
        for s in servers:
            procs[s] = start_server(work, s)
            stack.callback(_stop_server, procs[s])  # after the daemons (LIFO)
        devices: dict[tuple[str, str], Device | KernelClient] = {}
        ours = []
        for s in servers:
            for impl in OURS:
                name = device_name(impl, s)
                argv = our_argv(work, s, impl)
                d = Device(
                    impl,
                    s,
                    1,
                    name,
                    _spawn(argv, work / f"{name}.log", stdout=subprocess.PIPE),
                    work / f"{name}.log",
                    command=shlex.join(argv),
                )
                stack.callback(stop, d)
                ours.append(d)
                devices[(impl, s)] = d
        fio = local_fio(work)
        wait_ready(ours)
        for s in servers:
            d = launch_qsd(device_name("qsd", s), qsd_argv(work, s), work, s, 1)
            stack.callback(stop, d)
            devices[("qsd", s)] = d
        for i, s in enumerate(servers):
            kc = start_kernel_client(work, s, i)
            stack.callback(stop_kernel_client, kc)  # before its server stops (LIFO)
            devices[("kernel", s)] = kc
        for (impl, s), dev in devices.items():
            entry: dict[str, Any] = {"impl": impl, "server": s, "dev": dev.dev, "command": dev.command}
            if impl in OURS:
                status = ctl(dev.name, "status")
                entry["nbd"] = status.get("nbd")
                entry["engines"] = [q.get("engine") for q in status.get("queues", [])]
            result["devices"].append(entry)
        result["setup_s"] = time.monotonic() - started
        _log(f"set up in {result['setup_s']:.1f} s")
        k = 0
        for w in workloads:
            for r in range(repeat):
                for s in servers:
                    order = IMPLS if k % 2 == 0 else IMPLS[::-1]
                    k += 1
                    for impl in order:
                        cell = run_one(devices[(impl, s)], w, s, procs[s].pid, seconds, ramp, fio)
                        cell["round"] = r
                        result["cells"].append(cell)
                        _log(cell_line(cell))
    result["guest_total_s"] = time.monotonic() - started
    return result


def cell_line(c: dict[str, Any]) -> str:
    return fio_cell_line(f"{c['impl']:11} {c['server']:10} {c['workload']:17}", c)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--our-args", default="")
    p.add_argument("--perf", action="append", default=[], metavar="WORKLOAD")
    args = p.parse_args(argv)
    OUR_EXTRA[:] = shlex.split(args.our_args)
    PERF_WORKLOADS[:] = args.perf
    try:
        workloads = [WORKLOAD_BY_NAME[n] for n in args.workloads.split(",") if n]
        servers = [n for n in args.servers.split(",") if n]
        unknown = [n for n in servers if n not in SERVERS]
        if unknown:
            raise BenchError(f"unknown server {', '.join(unknown)}")
        result = run_matrix(workloads, servers, seconds=args.seconds, ramp=args.ramp, repeat=args.repeat)
    except (BenchError, KeyError, OSError, subprocess.SubprocessError) as e:
        result = {"fatal": f"{type(e).__name__}: {e}"}
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
