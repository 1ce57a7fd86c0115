"""fio on a slow disk, directly and through qemu-storage-daemon and pyvduse, in the test VM.

The benchmark of issue 16. In the test VM a null_blk whose every request completes 250 µs
after it was submitted (configfs: irqmode=2, completion_nsec; memory_backed=0,
hw_queue_depth=256) stands in for an SSD. In one run, fio 4k randread and randwrite (libaio,
direct, time-based, one job) at iodepth 1, 16 and 64 against:

- the raw device, fio on /dev/nullb0 itself: the limit;
- qemu-storage-daemon exporting it as vduse-blk (driver=host_device) with aio=threads,
  aio=io_uring and aio=native,cache.direct=on (expected to fail every request: direct I/O
  into VDUSE's bounce pages gets EFAULT);
- pyvduse `blk --file /dev/nullb0` with --aio io_uring (--cache writeback and none),
  --aio threads and --aio sync;

one queue of 256 each. Prints every cell (IOPS, x the raw device, mean latency, the daemon's
CPU µs per I/O, the guest's, our queue depth), a summary per workload (our best mode, the
peer's best, the limit, the ratios) and issue 16's targets at iodepth 16, met or not; writes
it all as JSON with the machine's details.

    python3 bench/slow_disk.py [--seconds 4] [--ramp 1] [--latency-us 250] [--repeat N]
                               [--quick] [--json PATH] [--markdown] [--our-args ARGS]
                               [--workloads NAME,...] [--modes NAME,...]

Needs root (the test VM does). Emulated (TCG) figures: compare the columns with each other,
not with real hardware.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fio_vs_qsd import (
    add_run_options,
    format_grid,
    git_commit,
    host_cpu_model,
    host_cpu_times,
    host_load,
    merge_runs,
    paired_ratio,
    run_guest,
    source_digest,
    steal_share,
    verdict,
)
from guest_runner import QUEUE_SIZE
from slow_disk_guest import (
    DEFAULT_LATENCY_US,
    DEFAULT_SIZE_MB,
    MODE_BY_NAME,
    MODES,
    QUICK_MODES,
    QUICK_WORKLOADS,
    WORKLOAD_BY_NAME,
    WORKLOADS,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "slow_disk.json"
DEFAULT_SECONDS = 4.0
TARGET_DEPTH = 16


@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    text: str
    threshold: float
    iodepth: int = TARGET_DEPTH


TARGETS = (
    Target("vs_raw", f"iodepth {TARGET_DEPTH}: pyvduse's best >= 0.8x the raw device", 0.8),
    Target("vs_peer", f"iodepth {TARGET_DEPTH}: pyvduse's best >= 1.0x the peer's best", 1.0),
    Target("scaling", f"pyvduse iodepth {TARGET_DEPTH} >= 8x its own iodepth 1 (same mode)", 8.0),
    # issue 30: what a user gets with no options
    Target("defaults_vs_raw", "iodepth 1: pyvduse with no options >= 0.6x the raw device", 0.6, 1),
    Target(
        "defaults_vs_raw", f"iodepth {TARGET_DEPTH}: pyvduse with no options >= 0.55x the raw device", 0.55
    ),
)
DEFAULTS_MODE = "py-defaults"


# --------------------------------------------------------------------------- rows


def _iops(cell: dict[str, Any] | None) -> float | None:
    if not cell or "error" in cell or cell.get("iops") is None:
        return None
    return float(cell["iops"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def short_error(text: str) -> str:
    """The gist of a failed cell's error: fio's errno text where it said one."""
    m = re.search(r"io_u error on file \S+: ([^:]+):", text)
    if m:
        return f"fio: {m.group(1).strip()}"
    first = text.strip().splitlines()[0] if text.strip() else "failed"
    return first[:80]


def mode_rows(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Guest cells (one per mode, workload and round) -> one row per (workload, mode), in
    workload then mode order: median figures over the rounds that worked, the ratio to the
    raw device paired by round, and the ratio to the same mode's iodepth-1 row."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["workload"], c["mode"]), []).append(c)
    rows: list[dict[str, Any]] = []
    for w in WORKLOADS:
        raw_runs = groups.get((w.name, "raw"), [])
        for m in MODES:
            runs = groups.get((w.name, m.name))
            if not runs:
                continue
            merged = merge_runs(runs)
            errors = [c["error"] for c in runs if "error" in c]
            rows.append({
                "workload": w.name, "rw": w.rw, "iodepth": w.iodepth,
                "mode": m.name, "impl": m.impl, "label": m.label,
                "iops": _iops(merged),
                "vs_raw": paired_ratio(runs, raw_runs, False) if m.impl != "raw" else None,
                "lat_mean_us": merged.get("lat_mean_us") if "error" not in merged else None,
                "lat_p99_us": merged.get("lat_p99_us") if "error" not in merged else None,
                "cpu_us_per_io": merged.get("cpu_us_per_io") if "error" not in merged else None,
                "guest_cpu_us_per_io": (merged.get("guest_cpu_us_per_io")
                                        if "error" not in merged else None),
                "cpu_util": merged.get("cpu_util") if "error" not in merged else None,
                "depth_mean": merged.get("depth_mean") if "error" not in merged else None,
                "daemon_lat_us": merged.get("daemon_lat_us") if "error" not in merged else None,
                "runs": len(runs) - len(errors),
                "errors": errors,
                "expected_failure": m.expect_failure or None,
            })  # fmt: skip
    by_key = {(r["rw"], r["iodepth"], r["mode"]): r for r in rows}
    for r in rows:
        qd1 = by_key.get((r["rw"], 1, r["mode"]))
        r["vs_qd1"] = _ratio(r["iops"], qd1["iops"]) if qd1 and r["iodepth"] > 1 else None
    return rows


def _best(rows: Sequence[dict[str, Any]], impl: str) -> dict[str, Any] | None:
    measured = [r for r in rows if r["impl"] == impl and r["iops"] is not None]
    return max(measured, key=lambda r: r["iops"]) if measured else None


def summary_rows(rows: Sequence[dict[str, Any]], cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per workload: our best mode, the peer's best mode, the raw device, and the
    ratios (paired by round with the raw device's and the peer's cells)."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        runs.setdefault((c["workload"], c["mode"]), []).append(c)
    out = []
    for w in WORKLOADS:
        mine = [r for r in rows if r["workload"] == w.name]
        if not mine:
            continue
        ours, peer = _best(mine, "pyvduse"), _best(mine, "qsd")
        raw = next((r for r in mine if r["impl"] == "raw"), None)
        defaults = next((r for r in mine if r["mode"] == DEFAULTS_MODE), None)

        def cells_of(row: dict[str, Any] | None, workload: str = w.name) -> list[dict[str, Any]]:
            return runs.get((workload, row["mode"]), []) if row else []

        out.append({
            "workload": w.name, "rw": w.rw, "iodepth": w.iodepth,
            "ours": ours["iops"] if ours else None, "our_mode": ours["mode"] if ours else None,
            "peer": peer["iops"] if peer else None, "peer_mode": peer["mode"] if peer else None,
            "raw": raw["iops"] if raw else None,
            "ours_vs_raw": ours["vs_raw"] if ours else None,
            "defaults": defaults["iops"] if defaults else None,
            "defaults_vs_raw": defaults["vs_raw"] if defaults else None,
            "ours_vs_peer": paired_ratio(cells_of(ours), cells_of(peer), False) if peer else None,
            "peer_vs_raw": peer["vs_raw"] if peer else None,
            "ours_vs_qd1": ours["vs_qd1"] if ours else None,
            "our_cpu_us_per_io": ours["cpu_us_per_io"] if ours else None,
            "peer_cpu_us_per_io": peer["cpu_us_per_io"] if peer else None,
            "our_lat_us": ours["lat_mean_us"] if ours else None,
            "peer_lat_us": peer["lat_mean_us"] if peer else None,
            "raw_lat_us": raw["lat_mean_us"] if raw else None,
            "our_depth": ours["depth_mean"] if ours else None,
        })  # fmt: skip
    return out


def evaluate_targets(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 16's targets at iodepth 16 and issue 30's for the defaults, for randread and
    randwrite apart: the measured figure and whether it met the line (None when the cell was
    not measured)."""
    by_rw = {(s["rw"], s["iodepth"]): s for s in summary}
    out = []
    for t in TARGETS:
        for rw in ("randread", "randwrite"):
            s = by_rw.get((rw, t.iodepth))
            value = None
            if s is not None:
                value = {
                    "vs_raw": s["ours_vs_raw"],
                    "vs_peer": s["ours_vs_peer"],
                    "scaling": s["ours_vs_qd1"],
                    "defaults_vs_raw": s["defaults_vs_raw"],
                }[t.key]
            mode = DEFAULTS_MODE if t.key == "defaults_vs_raw" else (s["our_mode"] if s else None)
            out.append(
                {
                    "target": t.key,
                    "iodepth": t.iodepth,
                    "text": t.text,
                    "rw": rw,
                    "threshold": t.threshold,
                    "value": value,
                    "mode": mode,
                    "met": None if value is None else value >= t.threshold,
                }
            )
    return out


# --------------------------------------------------------------------------- tables


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if abs(value) < 100 and digits == 0:
        return f"{value:,.1f}"
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


CELL_COLUMNS = (
    "workload",
    "mode",
    "options",
    "IOPS",
    "x raw",
    "x own qd1",
    "lat µs",
    "CPU µs/IO",
    "guest CPU µs/IO",
    "depth",
    "note",
)
CELL_RIGHT = {"IOPS", "x raw", "x own qd1", "lat µs", "CPU µs/IO", "guest CPU µs/IO", "depth"}


def _note(r: dict[str, Any]) -> str:
    if r["errors"]:
        failed = f"failed: {short_error(r['errors'][0])}"
        if r["iops"] is not None:  # some rounds worked
            failed = f"{len(r['errors'])} round(s) {failed}"
        return f"{failed} (expected)" if r["expected_failure"] else failed
    if r["expected_failure"]:
        return "expected to fail, did not"
    return ""


def format_cells(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Every (workload, mode): IOPS and ratios, mean latency, CPU per I/O, our queue depth."""
    body = [
        [
            r["workload"],
            r["mode"],
            r["label"],
            _num(r["iops"]),
            _x(r["vs_raw"]),
            _x(r["vs_qd1"]),
            _num(r["lat_mean_us"]),
            _num(r["cpu_us_per_io"]),
            _num(r["guest_cpu_us_per_io"]),
            _num(r["depth_mean"], 1),
            _note(r),
        ]
        for r in rows
    ]
    return format_grid(CELL_COLUMNS, body, CELL_RIGHT, markdown)


SUMMARY_COLUMNS = (
    "workload",
    "pyvduse defaults",
    "defaults/raw",
    "pyvduse best",
    "peer best",
    "raw (limit)",
    "ours/raw",
    "ours/peer",
    "peer/raw",
    "ours/own qd1",
    "CPU µs/IO ours/peer",
    "lat µs ours/peer/raw",
)
SUMMARY_RIGHT = set(SUMMARY_COLUMNS) - {"workload"}


def format_summary(summary: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    body = []
    for s in summary:
        lat = "-"
        if s["iodepth"] == 1:
            lat = f"{_num(s['our_lat_us'])}/{_num(s['peer_lat_us'])}/{_num(s['raw_lat_us'])}"
        ours = f"{_num(s['ours'])} ({s['our_mode']})" if s["our_mode"] else "-"
        peer = f"{_num(s['peer'])} ({s['peer_mode']})" if s["peer_mode"] else "-"
        body.append(
            [
                s["workload"],
                _num(s.get("defaults")),
                _x(s.get("defaults_vs_raw")),
                ours,
                peer,
                _num(s["raw"]),
                _x(s["ours_vs_raw"]),
                _x(s["ours_vs_peer"]),
                _x(s["peer_vs_raw"]),
                _x(s["ours_vs_qd1"]),
                f"{_num(s['our_cpu_us_per_io'])}/{_num(s['peer_cpu_us_per_io'])}",
                lat,
            ]
        )
    return format_grid(SUMMARY_COLUMNS, body, SUMMARY_RIGHT, markdown)


def format_targets(targets: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    columns = ("target", "randread", "randwrite")
    body = []
    for t in TARGETS:
        line = [t.text]
        for rw in ("randread", "randwrite"):
            e = next(
                x
                for x in targets
                if x["target"] == t.key and x["rw"] == rw and x.get("iodepth", TARGET_DEPTH) == t.iodepth
            )
            figure = "-" if e["value"] is None else f"{e['value']:.2f}x ({e['mode']})"
            line.append(f"{figure} {verdict(e['met'])}")
        body.append(line)
    return format_grid(columns, body, {"randread", "randwrite"}, markdown)


def format_notes(info: dict[str, Any]) -> str:
    guest = info.get("guest", {})
    nullb = info.get("nullb", {})
    latency = int(nullb.get("completion_nsec", 0) or 0) // 1000
    lines = [
        f"slow disk: null_blk {nullb.get('dev', '?')}, {latency} µs completion latency "
        f"(irqmode={nullb.get('irqmode', '?')}), {nullb.get('size', '?')} MB, "
        f"hw_queue_depth {nullb.get('hw_queue_depth', '?')}, memory_backed "
        f"{nullb.get('memory_backed', '?')}; one queue of {info.get('queue_size', '?')} per daemon.",
        "x raw: IOPS over the raw device's in the same round; x own qd1: over the same mode at "
        "iodepth 1; CPU µs/IO: the serving daemon's CPU time (all threads) per I/O the device "
        "completed; guest CPU: both vCPUs, everything; depth: pyvduse's mean queue depth when "
        "it took each request (ctl stats).",
        "Buffered modes (qsd aio=threads/io_uring, pyvduse --cache writeback) go through the "
        "guest's page cache of the null_blk (written back and dropped before each cell): "
        "random reads miss it, random writes are absorbed by it and written back later.",
        f"{info.get('seconds_per_cell', 0):g} s per cell (+{info.get('ramp_seconds', 0):g} s "
        f"ramp), {info.get('repeat', 1)} round(s); guest {guest.get('guest_kernel', '?')}, "
        f"{guest.get('guest_vcpus', '?')} vCPUs, {guest.get('guest_mem_mib', '?')} MiB, QEMU "
        f"TCG on {info.get('host_cpu', '?')}"
        + (
            ""
            if info.get("host_steal_share") is None
            else f" ({info['host_steal_share'] * 100:.0f}% of the host's CPU time stolen)"
        )
        + f"; {guest.get('qsd_version', '?')}; {guest.get('fio_version', '?')}; pyvduse "
        f"{info.get('pyvduse_commit', '?')}"
        + (f" with {info['our_args']}" if info.get("our_args") else "")
        + f"; total {info.get('total_seconds', 0):.0f} s.",
        _others_note(info.get("other_vms")),
    ]
    return "\n".join(lines)


def _others_note(others: dict[str, Any] | None) -> str:
    if not others or not others.get("samples"):
        return "The host was not watched during the run."
    cpu = others.get("others_cpu_share")
    cpu_text = (
        ""
        if cpu is None
        else (f"; {cpu * 100:.0f}% of the host's CPU time went to processes other than this run's VM")
    )
    if not others["max"]:
        return f"No other VM ran on the host during the run{cpu_text}."
    return (
        f"Another VM ran on the host in {others['share_with_others'] * 100:.0f}% of the "
        f"samples (up to {others['max']} at once){cpu_text}: the figures are lower than "
        "on a quiet host."
    )


def report_text(report: dict[str, Any], markdown: bool = False) -> str:
    return "\n\n".join(
        [
            format_cells(report["rows"], markdown),
            format_summary(report["summary"], markdown),
            format_targets(report["targets"], markdown),
            format_notes(report["info"]),
        ]
    )


def build_report(guest: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    rows = mode_rows(guest["cells"])
    summary = summary_rows(rows, guest["cells"])
    return {
        "info": info,
        "rows": rows,
        "summary": summary,
        "targets": evaluate_targets(summary),
        "cells": guest["cells"],
    }


def unexpected_failures(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["errors"] and not r["expected_failure"]]


# --------------------------------------------------------------------------- main


def host_sample() -> tuple[int, int, int, int]:
    """(other QEMUs: those not our own test VM's, the host's busy and total CPU ticks, the
    CPU ticks of our children: the test VM's QEMU and virtiofsd). Our children's time is
    what getrusage says of those already waited for plus the live ones' own: so after the
    VM has ended (and been waited for) it is exact."""
    qemus = live = 0
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text()
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(f[1]) == me:
            live += int(f[11]) + int(f[12])
        elif comm.startswith("qemu-system"):
            qemus += 1
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = live + round((ru.ru_utime + ru.ru_stime) * os.sysconf("SC_CLK_TCK"))
    times = host_cpu_times()
    busy = sum(times) - sum(times[3:5]) if len(times) >= 5 else 0
    return qemus, busy, sum(times), ours


class HostWatch:
    """Samples the host every `period` seconds while the benchmark runs: other VMs, and the
    CPU that went to anything but our test VM (on this 2-core host either moves every
    figure)."""

    def __init__(self, period: float = 10.0) -> None:
        self.samples: list[tuple[int, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while True:
            self.samples.append(host_sample())
            if self._stop.wait(period):
                self.samples.append(host_sample())
                return

    def __enter__(self) -> HostWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        return summarize_host(self.samples)


def summarize_host(samples: Sequence[tuple[int, int, int, int]]) -> dict[str, Any]:
    """How much the host did besides our VM over the samples: the share of samples with
    another VM running, the most at once, and the share of the host's CPU time that went to
    other processes (busy time not spent by our QEMU and virtiofsd)."""
    if not samples:
        return {"samples": 0, "max": 0, "share_with_others": None, "others_cpu_share": None}
    busy = samples[-1][1] - samples[0][1]
    total = samples[-1][2] - samples[0][2]
    ours = samples[-1][3] - samples[0][3]
    return {
        "samples": len(samples),
        "max": max(s[0] for s in samples),
        "share_with_others": sum(1 for s in samples if s[0]) / len(samples),
        "others_cpu_share": max(busy - ours, 0) / total if total > 0 else None,
    }


def vm_timeout(cells: int, seconds: float, ramp: float) -> float:
    """Generous: only a hung guest should reach it."""
    return 900 + 3 * cells * (seconds + ramp + 5)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_options(
        p,
        default_seconds=DEFAULT_SECONDS,
        default_json=DEFAULT_JSON,
        quick="randread at iodepth 1 and 16, modes " + ",".join(QUICK_MODES),
        repeat="rounds of every cell: medians, ratios paired by round (default 1)",
        our_args="extra 'pyvduse blk' options for every pyvduse mode, e.g. '--poll-us 50'",
    )
    p.add_argument("--modes", help="comma-separated subset (default: all, or the quick set)")
    p.add_argument(
        "--latency-us",
        type=int,
        default=DEFAULT_LATENCY_US,
        help=f"null_blk's completion latency (default {DEFAULT_LATENCY_US})",
    )
    p.add_argument(
        "--size-mb", type=int, default=DEFAULT_SIZE_MB, help=f"null_blk's size (default {DEFAULT_SIZE_MB})"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else DEFAULT_SECONDS)
    ramp = args.ramp if args.ramp is not None else (0.0 if args.quick else 1.0)
    workloads = (
        args.workloads.split(",")
        if args.workloads
        else (list(QUICK_WORKLOADS) if args.quick else [w.name for w in WORKLOADS])
    )
    modes = (
        args.modes.split(",")
        if args.modes
        else (list(QUICK_MODES) if args.quick else [m.name for m in MODES])
    )
    unknown = [n for n in workloads if n not in WORKLOAD_BY_NAME]
    unknown += [n for n in modes if n not in MODE_BY_NAME]
    if unknown:
        parser.error(
            f"unknown {', '.join(unknown)}; workloads: {', '.join(WORKLOAD_BY_NAME)}; "
            f"modes: {', '.join(MODE_BY_NAME)}"
        )
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    started = time.monotonic()
    load_before, times_before = host_load(), host_cpu_times()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cells = len(workloads) * len(modes) * args.repeat
    with HostWatch() as watch:
        guest = run_guest(
            [
                "--seconds",
                f"{seconds:g}",
                "--ramp",
                f"{ramp:g}",
                "--workloads",
                ",".join(workloads),
                "--modes",
                ",".join(modes),
                "--latency-us",
                str(args.latency_us),
                "--size-mb",
                str(args.size_mb),
                "--repeat",
                str(args.repeat),
                f"--our-args={args.our_args}",
            ],
            mem=args.mem,
            smp=args.smp,
            timeout=vm_timeout(cells, seconds, ramp),
            runner="slow_disk_guest.py",
            prog="slow_disk",
        )
    info = {
        "date": date,
        "host_cpu": host_cpu_model(),
        "host_cpus": os.cpu_count(),
        "host_load_before": load_before,
        "host_load_after": host_load(),
        "host_steal_share": steal_share(times_before, host_cpu_times()),
        "other_vms": watch.summary(),
        "vm": {"accel": os.environ.get("PYVDUSE_TESTVM_ACCEL", "tcg"), "vcpus": args.smp, "mem": args.mem},
        "guest": guest["info"],
        "nullb": guest.get("nullb", {}),
        "pyvduse_commit": git_commit(),
        "pyvduse_source_sha256": source_digest(),
        "seconds_per_cell": seconds,
        "ramp_seconds": ramp,
        "repeat": args.repeat,
        "latency_us": args.latency_us,
        "our_args": args.our_args,
        "queue_size": QUEUE_SIZE,
        "workloads": workloads,
        "modes": modes,
        "guest_setup_seconds": guest.get("setup_s"),
        "guest_seconds": guest.get("guest_total_s"),
        "total_seconds": time.monotonic() - started,
        "devices": guest.get("devices", []),
    }
    report = build_report(guest, info)
    text = report_text(report, markdown=args.markdown)
    print(text)
    report["table"] = report_text(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")
    failed = unexpected_failures(report["rows"])
    for r in failed:
        print(f"FAILED {r['workload']} {r['mode']}: {r['errors'][0][-500:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
