"""Guest half of bench/fio_vs_qsd.py: runs the fio matrix inside the test VM.

Do not run this on a workstation: it creates VDUSE devices, attaches them to the vdpa bus
and writes to them. bench/fio_vs_qsd.py boots the test VM and runs it there:

    python bench/guest_runner.py --out bench/results/.guest.json [--seconds 10] [--ramp 1]
                                 [--workloads NAME,...] [--backends null,file]
                                 [--repeat N] [--profile PATH]

For each backend (null, and a raw image on the guest's tmpfs) it starts pyvduse's
`blk` daemon and QEMU's qemu-storage-daemon (vduse-blk export) with one queue and with two
(same queue size, 256), attaches them all, then runs every workload against ours and the
peer's device in turn (alternating which goes first, so a drift in the machine's load hurts
both alike). Per cell it records fio's figures and the serving daemon's CPU time (utime +
stime from /proc/PID/stat, all threads) against the I/Os the device completed in the same
window (/sys/block/vdX/stat, ramp included, so the CPU window and the I/O count match).

With --profile it instead runs one cell (null, 4k randread iodepth 16) against our daemon
running under cProfile in every thread (bench/profile_daemon.py) and saves the merged
pstats to PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

IMAGE_SIZE = 512 << 20
QUEUE_SIZE = 256
BLOCK_SIZE = 512
READY_TIMEOUT = 300.0  # python startup over uncached virtiofs under TCG is slow
NODE_TIMEOUT = 60.0
QSD = "/usr/bin/qemu-storage-daemon"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve().parent
PROFILE_WORKLOAD = "randread-4k-qd16"


@dataclasses.dataclass(frozen=True)
class Workload:
    """One fio job shape; `queues` is the device's virtqueue count for this workload."""

    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    queues: int = 1

    @property
    def large(self) -> bool:
        """Reported as MB/s rather than IOPS."""
        return self.bs != "4k"

    def fio_args(self, dev: str, seconds: float, ramp: float, fio: str = "fio") -> list[str]:
        args = [
            fio, f"--name={self.name}", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
            f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}",
            f"--numjobs={self.numjobs}", "--group_reporting", "--time_based",
            f"--runtime={_fio_time(seconds)}", "--output-format=json",
        ]  # fmt: skip
        if ramp > 0:
            args.append(f"--ramp_time={_fio_time(ramp)}")
        if self.rw.startswith("rand"):
            args += ["--norandommap", "--randrepeat=0"]
        return args


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randread-4k-qd16", "randread", "4k", 16),
    Workload("randread-4k-qd32", "randread", "4k", 32),
    Workload("randwrite-4k-qd1", "randwrite", "4k", 1),
    Workload("randwrite-4k-qd16", "randwrite", "4k", 16),
    Workload("randwrite-4k-qd32", "randwrite", "4k", 32),
    Workload("read-128k-qd8", "read", "128k", 8),
    Workload("write-128k-qd8", "write", "128k", 8),
    # 2 jobs x iodepth 16 on a 2-queue device: the same 32 in flight as randread-4k-qd32,
    # which is what "2 queues vs our own 1 queue" compares it with.
    Workload("randread-4k-2q-qd16x2", "randread", "4k", 16, numjobs=2, queues=2),
)
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}
TWO_QUEUE_BASELINE = {"randread-4k-2q-qd16x2": "randread-4k-qd32"}
BACKENDS = ("null", "file")
IMPLS = ("pyvduse", "qsd")


def _fio_time(seconds: float) -> str:
    """fio takes plain integers as seconds; fractions go as milliseconds."""
    return f"{seconds:g}" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


# --------------------------------------------------------------------------- parsing


@dataclasses.dataclass
class FioResult:
    """The figures we keep from one fio run (group_reporting: one job; else summed)."""

    iops: float
    bw_bytes: float
    lat_mean_ns: float
    lat_p99_ns: float | None
    total_ios: int
    runtime_ms: float
    errors: int


def _first_json_object(text: str) -> dict[str, Any]:
    """fio may print warnings before its JSON; the object starts at the first '{' line."""
    if text.lstrip().startswith("{"):
        start = text.index("{")
    else:
        start = text.find("\n{") + 1
        if start == 0:
            raise ValueError("no JSON object in fio's output")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as e:
        raise ValueError(f"fio's JSON output does not parse: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("fio's JSON output is not an object")
    return obj


def parse_fio_json(text: str) -> FioResult:
    """fio --output-format=json output -> FioResult, reads and writes added together."""
    data = _first_json_object(text)
    jobs = data.get("jobs")
    if not jobs:
        raise ValueError("fio's JSON output has no jobs")
    iops = bw = 0.0
    ios = errors = 0
    lat_weighted = 0.0
    runtime = 0.0
    p99: float | None = None
    for job in jobs:
        errors += int(job.get("error", 0))
        for direction in ("read", "write", "trim"):
            d = job.get(direction)
            if not d:
                continue
            n = int(d.get("total_ios", 0))
            iops += float(d.get("iops", 0.0))
            bw += float(d.get("bw_bytes", float(d.get("bw", 0)) * 1024))
            runtime = max(runtime, float(d.get("runtime", 0)))
            if n:
                ios += n
                lat = d.get("lat_ns") or d.get("clat_ns") or {}
                lat_weighted += float(lat.get("mean", 0.0)) * n
                pct = (d.get("clat_ns") or {}).get("percentile") or {}
                if "99.000000" in pct:
                    p99 = max(p99 or 0.0, float(pct["99.000000"]))
    return FioResult(
        iops=iops,
        bw_bytes=bw,
        lat_mean_ns=lat_weighted / ios if ios else 0.0,
        lat_p99_ns=p99,
        total_ios=ios,
        runtime_ms=runtime,
        errors=errors,
    )


def parse_proc_stat_cpu(text: str) -> int:
    """utime + stime clock ticks from a /proc/PID/stat line (the comm may hold spaces)."""
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def parse_diskstats_ios(text: str) -> int:
    """Reads + writes completed, from /sys/block/DEV/stat."""
    f = text.split()
    return int(f[0]) + int(f[4])


def parse_system_stat(text: str) -> tuple[int, int]:
    """(busy clock ticks of all CPUs, context switches) from /proc/stat: busy is everything
    but idle and iowait, so it counts fio, the kernel's block and virtio work and the daemon."""
    busy = ctxt = 0
    for line in text.splitlines():
        f = line.split()
        if f and f[0] == "cpu":
            ticks = [int(x) for x in f[1:]]
            busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
        elif f and f[0] == "ctxt":
            ctxt = int(f[1])
    return busy, ctxt


def system_counters() -> tuple[int, int]:
    return parse_system_stat(Path("/proc/stat").read_text())


def cpu_seconds(pid: int) -> float:
    return parse_proc_stat_cpu(Path(f"/proc/{pid}/stat").read_text()) / CLK_TCK


def device_ios(dev: str) -> int:
    return parse_diskstats_ios(Path(f"/sys/block/{Path(dev).name}/stat").read_text())


# --------------------------------------------------------------------------- devices


class BenchError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[guest {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _block_node(name: str) -> str | None:
    for d in Path("/sys/bus/vdpa/devices", name).glob("virtio*/block/*"):
        node = Path("/dev", d.name)
        if node.exists():
            return str(node)
    return None


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@dataclasses.dataclass
class Device:
    """One served block device: which implementation, its daemon's PID and /dev node."""

    impl: str
    backend: str
    queues: int
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    dev: str = ""
    command: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        with suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""


#: Extra ``pyvduse blk`` options for every cell (``--our-args``), to compare configurations.
OUR_EXTRA: list[str] = []


def our_argv(backend: str, name: str, queues: int, image: str, profile: str | None = None) -> list[str]:
    source = ["--null", str(IMAGE_SIZE)] if backend == "null" else ["--file", image]
    blk = ["blk", "--name", name, *source, "--queues", str(queues), "--queue-size", str(QUEUE_SIZE),
           "--block-size", str(BLOCK_SIZE), "--serial", name, *OUR_EXTRA]  # fmt: skip
    if profile:
        return [sys.executable, str(HERE / "profile_daemon.py"), profile, *blk]
    return [sys.executable, "-m", "pyvduse", *blk]


def qsd_argv(backend: str, name: str, queues: int, image: str) -> list[str]:
    if backend == "null":
        node = f"driver=null-co,node-name=n0,read-zeroes=on,size={IMAGE_SIZE}"
    else:
        # Defaults (cache.direct=off, aio=threads) like our buffered preadv/pwritev; the 1- and
        # 2-queue daemons share the image, so QEMU's image locking is off.
        node = f"driver=file,node-name=n0,filename={image},locking=off"
    export = (
        f"type=vduse-blk,id=e0,node-name=n0,name={name},writable=on,num-queues={queues},"
        f"queue-size={QUEUE_SIZE},logical-block-size={BLOCK_SIZE},serial={name}"
    )
    return [QSD, "--blockdev", node, "--export", export]


def _spawn(argv: list[str], log: Path, stdout: int | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        out = err if stdout is None else stdout
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def start_ours(backend: str, queues: int, image: str, workdir: Path, profile: str | None = None) -> Device:
    name = f"py-{backend}-{queues}q"
    argv = our_argv(backend, name, queues, image, profile)
    log = workdir / f"{name}.log"
    proc = _spawn(argv, log, stdout=subprocess.PIPE)
    return Device("pyvduse", backend, queues, name, proc, log, command=shlex.join(argv))


def wait_ready(devices: Sequence[Device], timeout: float = READY_TIMEOUT) -> None:
    """Read each of our daemons' READY line (they start in parallel: imports are slow)."""
    sel = selectors.DefaultSelector()
    buffers: dict[int, bytes] = {}
    pending = {d.name: d for d in devices}
    for d in devices:
        assert d.proc.stdout is not None
        sel.register(d.proc.stdout, selectors.EVENT_READ, d)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no READY from {', '.join(pending)} within {timeout:.0f} s")
            for key, _ in sel.select(remaining):
                d = key.data
                chunk = os.read(key.fd, 4096)
                if not chunk:
                    sel.unregister(key.fileobj)
                    raise BenchError(
                        f"{d.name} exited before READY (status {d.proc.wait()}):\n{d.log_tail()}"
                    )
                buffers[key.fd] = buffers.get(key.fd, b"") + chunk
                m = re.search(rb"READY name=(\S+) dev=(\S+)", buffers[key.fd])
                if m:
                    d.dev = m.group(2).decode()
                    pending.pop(d.name)
                    sel.unregister(key.fileobj)
    finally:
        sel.close()


def start_qsd(backend: str, queues: int, image: str, workdir: Path) -> Device:
    """Start qemu-storage-daemon, wait for its VDUSE device, attach it and find /dev/vdX."""
    name = f"qsd-{backend}-{queues}q"
    return launch_qsd(name, qsd_argv(backend, name, queues, image), workdir, backend, queues)


def launch_qsd(name: str, argv: list[str], workdir: Path, backend: str, queues: int) -> Device:
    """Start qemu-storage-daemon with `argv` (exporting VDUSE device `name`), wait for the
    device, attach it with vdpa and find /dev/vdX."""
    log = workdir / f"{name}.log"
    d = Device("qsd", backend, queues, name, _spawn(argv, log), log, command=shlex.join(argv))

    def created() -> bool:
        if d.proc.poll() is not None:
            raise BenchError(f"qemu-storage-daemon for {name} exited ({d.proc.returncode}):\n{d.log_tail()}")
        return Path("/dev/vduse", name).exists()

    try:
        _wait(f"/dev/vduse/{name}", created, NODE_TIMEOUT)
        _run(["vdpa", "dev", "add", "name", name, "mgmtdev", "vduse"])
        _wait(f"the block device of {name}", lambda: _block_node(name) is not None, NODE_TIMEOUT)
    except BaseException:
        stop(d)  # no daemon left behind by a failed start
        raise
    node = _block_node(name)
    assert node is not None
    d.dev = node
    return d


def stop(d: Device) -> None:
    """Ours: SIGTERM (it detaches itself). qsd: detach with vdpa first, then SIGTERM."""
    if d.impl == "qsd" and Path("/sys/bus/vdpa/devices", d.name).exists():
        with suppress(BenchError):
            _run(["vdpa", "dev", "del", d.name])
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(60)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
    if d.proc.stdout is not None:
        d.proc.stdout.close()


def _run(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def create_image(path: str, size: int = IMAGE_SIZE) -> None:
    """A sparse image of its final size (the daemons read the size when they start)."""
    with open(path, "wb") as f:
        f.truncate(size)


def fill_image(path: str, size: int = IMAGE_SIZE) -> None:
    """Every byte written once (a non-zero pattern), so reads hit data, not holes."""
    chunk = bytes(range(256)) * 4096  # 1 MiB
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[: size - off], off)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Fio:
    """How to start fio: Debian's links 60-odd libraries (ceph, gluster, ICU...), which take
    seconds to load over the uncached virtiofs root, per cell; a copy on tmpfs takes one."""

    path: str = "fio"
    env: dict[str, str] | None = None


def local_fio(workdir: Path) -> Fio:
    """fio and the libraries ldd resolves for it, copied to the guest's tmpfs."""
    system = shutil.which("fio")
    if system is None:
        raise BenchError("fio is not installed")
    try:
        libs = re.findall(r"=>\s+(/\S+)", _run(["ldd", system]))
        lib_dir = workdir / "fio-lib"
        lib_dir.mkdir(exist_ok=True)
        for lib in libs:
            shutil.copy2(lib, lib_dir / Path(lib).name)
        binary = workdir / "fio"
        shutil.copy2(system, binary)
        fio = Fio(str(binary), dict(os.environ, LD_LIBRARY_PATH=str(lib_dir)))
        _run([fio.path, "--version"], env=fio.env)
        return fio
    except (OSError, BenchError) as e:
        _log(f"using {system} from virtiofs (slow to start): {e}")
        return Fio(system)


# --------------------------------------------------------------------------- cells


def run_cell(d: Device, w: Workload, seconds: float, ramp: float, fio: Fio) -> dict[str, Any]:
    """One fio run against d; the daemon's CPU and the device's I/Os over the same window."""
    cell: dict[str, Any] = {
        "impl": d.impl,
        "backend": d.backend,
        "workload": w.name,
        "queues": d.queues,
        "dev": d.dev,
    }
    return measure_fio(cell, d.dev, d.pid, w, seconds, ramp, fio)


def measure_fio(
    cell: dict[str, Any], dev: str, pid: int | None, w: Workload, seconds: float, ramp: float, fio: Fio
) -> dict[str, Any]:
    """Run w on dev and add fio's figures to `cell`, with the CPU time of the daemon `pid`
    (None: no daemon, e.g. the raw device; its CPU figures are then None) and the device's
    I/Os over the same window."""
    argv = w.fio_args(dev, seconds, ramp, fio.path)
    ios0 = device_ios(dev)
    cpu0 = cpu_seconds(pid) if pid is not None else 0.0
    t0 = time.monotonic()
    sys0 = system_counters()
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + ramp + 120, check=False, env=fio.env
    )
    sys1 = system_counters()
    ios1 = device_ios(dev)
    cpu1 = cpu_seconds(pid) if pid is not None else 0.0
    t1 = time.monotonic()
    if proc.returncode != 0:
        cell["error"] = f"fio exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        return cell
    try:
        r = parse_fio_json(proc.stdout)
    except ValueError as e:
        cell["error"] = f"{e}: {proc.stdout[-300:]} {proc.stderr[-300:]}"
        return cell
    if r.errors:
        cell["error"] = f"fio reported {r.errors} error(s)"
    dev_ios = ios1 - ios0
    cpu = cpu1 - cpu0 if pid is not None else None
    guest_cpu = (sys1[0] - sys0[0]) / CLK_TCK
    cell.update(
        iops=r.iops,
        mb_s=r.bw_bytes / 1e6,
        lat_mean_us=r.lat_mean_ns / 1000,
        lat_p99_us=None if r.lat_p99_ns is None else r.lat_p99_ns / 1000,
        fio_ios=r.total_ios,
        dev_ios=dev_ios,
        wall_s=t1 - t0,
        cpu_s=cpu,
        cpu_util=None if cpu is None else cpu / (t1 - t0),
        cpu_us_per_io=cpu / dev_ios * 1e6 if cpu is not None and dev_ios else None,
        # the whole guest (both vCPUs): where the time goes when the daemon is not busy
        guest_cpu_util=guest_cpu / (t1 - t0),
        guest_cpu_us_per_io=guest_cpu / dev_ios * 1e6 if dev_ios else None,
        ctxt_per_io=(sys1[1] - sys0[1]) / dev_ios if dev_ios else None,
    )
    return cell


def perf_record(data: str, seconds: float) -> subprocess.Popen[bytes]:
    """Sample the whole guest with perf (the software clock: TCG has no PMU) for `seconds`,
    into `data`; wait() for it, then perf_report(data)."""
    record = ["perf", "record", "-a", "-e", "cpu-clock", "-F", "499", "-o", data]
    return subprocess.Popen(
        [*record, "--", "sleep", f"{seconds:g}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def perf_report(data: str) -> str:
    """What ``perf record -a`` saw: the share of the guest's CPU time per task, then per task
    and kernel or user symbol, the top lines (those of 1% or more) of each."""
    out = []
    for sort in ("comm", "comm,sym"):
        argv = ["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", sort]
        p = subprocess.run(
            [*argv, "--percent-limit", "1"], capture_output=True, text=True, timeout=300, check=False
        )
        out += [line for line in p.stdout.splitlines() if line.strip() and not line.startswith("#")]
    return "\n".join(out)


def _order(impls: Sequence[str], k: int) -> list[str]:
    """Alternate who goes first from cell to cell."""
    return list(impls) if k % 2 == 0 else list(reversed(impls))


def guest_info() -> dict[str, Any]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    qsd_version = _run([QSD, "--version"]).splitlines()[0]
    fio_version = _run(["fio", "--version"]).strip()
    return {
        "guest_kernel": os.uname().release,
        "guest_vcpus": os.cpu_count(),
        "guest_mem_mib": mem_kb // 1024,
        "python": sys.version.split()[0],
        "qsd_version": qsd_version,
        "fio_version": fio_version,
    }


def _workdir() -> Path:
    """The guest's private tmpfs: the image and the daemons' logs."""
    d = Path("/tmp/fio-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_matrix(
    workloads: Sequence[Workload], backends: Sequence[str], seconds: float, ramp: float, repeat: int = 1
) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {"info": guest_info(), "cells": [], "devices": []}
    queue_counts = sorted({w.queues for w in workloads})
    work = _workdir()
    image = str(work / "disk.img")
    with ExitStack() as stack:
        # Our daemons first, all at once: their start-up (Python imports over the uncached
        # virtiofs root) is the slowest step, so the image fill and fio copy overlap it.
        if "file" in backends:
            create_image(image)
        t = time.monotonic()
        ours = [start_ours(b, q, image, work) for b in backends for q in queue_counts]
        for d in ours:
            stack.callback(stop, d)
        if "file" in backends:
            fill_image(image)
            _log(f"filled the {IMAGE_SIZE >> 20} MiB image on tmpfs ({time.monotonic() - t:.1f} s)")
        fio = local_fio(work)
        _log(f"copied fio and its libraries to tmpfs ({time.monotonic() - t:.1f} s)")
        wait_ready(ours)
        _log(f"{len(ours)} pyvduse daemons ready in {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        peers = []
        for b in backends:
            for q in queue_counts:
                d = start_qsd(b, q, image, work)
                stack.callback(stop, d)
                peers.append(d)
        _log(f"{len(peers)} qemu-storage-daemon devices ready in {time.monotonic() - t:.1f} s")
        devices = {(d.impl, d.backend, d.queues): d for d in ours + peers}
        result["devices"] = [
            {"impl": d.impl, "backend": d.backend, "queues": d.queues, "dev": d.dev, "command": d.command}
            for d in devices.values()
        ]
        result["setup_s"] = time.monotonic() - started
        k = 0
        for w in workloads:
            for b in backends:
                # The repeats of a cell run back to back, ours and the peer's paired in each
                # round, so a round's ratio compares the two under the same machine load.
                for r in range(repeat):
                    for impl in _order(IMPLS, k):
                        d = devices[(impl, b, w.queues)]
                        try:
                            cell = run_cell(d, w, seconds, ramp, fio)
                        except (OSError, subprocess.SubprocessError) as e:  # the daemon died?
                            cell = {
                                "impl": impl,
                                "backend": b,
                                "workload": w.name,
                                "queues": w.queues,
                                "error": f"{type(e).__name__}: {e}",
                                "daemon_log": d.log_tail(),
                            }
                        cell["round"] = r
                        result["cells"].append(cell)
                        _log(_cell_line(cell))
                    k += 1
    result["guest_total_s"] = time.monotonic() - started
    return result


def _cell_line(c: dict[str, Any]) -> str:
    head = f"{c['impl']:8} {c['backend']:5} {c['workload']:22}"
    if "error" in c:
        return f"{head} ERROR {c['error']}"
    return (
        f"{head} {c['iops']:9.0f} IOPS {c['mb_s']:8.1f} MB/s lat {c['lat_mean_us']:8.0f} us  "
        f"cpu {_figure(c, 'cpu_us_per_io')} us/IO ({_figure(c, 'cpu_util', 100)}%)  "
        f"guest {_figure(c, 'guest_cpu_us_per_io')} us/IO "
        f"({_figure(c, 'guest_cpu_util', 100)}%) {_figure(c, 'ctxt_per_io', fmt='.1f')} cs/IO"
    )


def fio_cell_line(head: str, c: dict[str, Any]) -> str:
    """The log line of one fio cell after ``head`` (who served it): its figures, or its error."""
    if "error" in c:
        return f"{head} ERROR: {c['error'][-300:]}"
    return (
        f"{head} {c['iops']:8.0f} IOPS {c['mb_s']:7.1f} MB/s lat {c['lat_mean_us']:7.0f} us "
        f"cpu {_figure(c, 'cpu_us_per_io')} us/IO"
    )


def _figure(c: dict[str, Any], key: str, scale: float = 1, fmt: str = ".0f") -> str:
    """A measured figure for the log line; '-' where it could not be measured (not 0)."""
    value = c.get(key)
    return "-" if value is None else format(value * scale, fmt)


def run_profile(path: str, seconds: float, ramp: float) -> dict[str, Any]:
    """One null 4k randread iodepth 16 cell against our daemon under cProfile."""
    w = WORKLOAD_BY_NAME[PROFILE_WORKLOAD]
    d = start_ours("null", 1, "", _workdir(), profile=path)
    try:
        wait_ready([d])
        cell = run_cell(d, w, seconds, ramp, local_fio(_workdir()))
        _log(_cell_line(cell))
    finally:
        stop(d)
    if d.proc.returncode != 0:
        raise BenchError(f"profiled daemon exited {d.proc.returncode}:\n{d.log_tail()}")
    return {"info": guest_info(), "cells": [cell], "profile": path}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="result JSON (host-visible path)")
    p.add_argument("--seconds", type=float, default=8.0, help="fio runtime per cell")
    p.add_argument("--ramp", type=float, default=1.0, help="fio ramp_time per cell")
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--profile", metavar="PATH", help="profile our daemon for one cell instead")
    p.add_argument("--our-args", default="", help="extra 'pyvduse blk' options for our daemon")
    p.add_argument("--repeat", type=int, default=1, help="runs of every cell (paired rounds)")
    args = p.parse_args(argv)
    OUR_EXTRA[:] = shlex.split(args.our_args)
    try:
        if args.profile:
            result = run_profile(args.profile, args.seconds, args.ramp)
        else:
            workloads = [WORKLOAD_BY_NAME[n] for n in args.workloads.split(",") if n]
            backends = [b for b in args.backends.split(",") if b]
            if not set(backends) <= set(BACKENDS):
                p.error(f"backends are {', '.join(BACKENDS)}")
            result = run_matrix(workloads, backends, args.seconds, args.ramp, args.repeat)
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
