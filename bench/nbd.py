"""fio through an NBD server: pyvduse --nbd, qemu-storage-daemon and the kernel's NBD client.

The benchmark of issues 17 and 30. In one run in the test VM, two nbdkit memory servers (one
plain, one answering every request 1 ms late through nbdkit's delay filter) are each
exported by pyvduse with no options but ``--nbd URI`` (the defaults: what a user types), by
pyvduse with its options spelled out (``--queues 1 --queue-size 256`` and ``--our-args``:
ours), by qemu-storage-daemon (``--blockdev driver=nbd --export type=vduse-blk``) and by the
kernel's own NBD client (``nbd-client`` with ``nbd.ko``: the limit), and fio (libaio, direct,
time-based, one job) runs 4k randread and randwrite at iodepth 1, 16 and 64 and 128k
sequential reads and writes at iodepth 8 against each, the four back to back. It prints one
row per server and workload (the four figures, the ratios, the limit the delay sets, latency
at iodepth 1, CPU per I/O of the daemons and of the server) and the targets:

- issue 30, on each server, 4k random reads and writes: the defaults >= 1.0x
  qemu-storage-daemon at iodepth 1 and 16, >= 0.6x the kernel's NBD client at 16;
- issue 17: every cell ours >= 1.0x qemu-storage-daemon; iodepth 16 behind the 1 ms delay:
  ours >= 0.8x of 16 requests per millisecond.

    python3 bench/nbd.py [--seconds 4] [--ramp 1] [--repeat N] [--quick] [--markdown]
                         [--workloads NAME,...] [--servers plain,delay-1ms]
                         [--our-args ARGS] [--perf WORKLOAD ...] [--json PATH]

Needs root (the test VM does). Emulated (TCG) figures: compare the columns with each other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fio_vs_qsd import (
    add_run_options,
    format_grid,
    format_verdicts,
    git_commit,
    host_cpu_model,
    host_cpu_times,
    host_load,
    merge_runs,
    metric,
    paired_ratio,
    run_guest,
    source_digest,
    steal_share,
)
from guest_runner import Workload
from nbd_guest import IMPLS, QUICK_WORKLOADS, SERVERS, WORKLOAD_BY_NAME, WORKLOADS
from slow_disk import HostWatch, _num, _x

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "nbd.json"
DEFAULT_SECONDS = 4.0
TARGET_DEPTH = 16
TARGET_SHARE_OF_LIMIT = 0.8
DELAYED = "delay-1ms"
DEFAULTS = "py-defaults"
KERNEL = "kernel"
RWS = ("randread", "randwrite")
#: Issue 30's targets for the defaults: (iodepth, the row's ratio, against whom, the floor).
DEFAULTS_TARGETS = (
    (1, "defaults_vs_peer", "qemu-storage-daemon", 1.0),
    (TARGET_DEPTH, "defaults_vs_peer", "qemu-storage-daemon", 1.0),
    (TARGET_DEPTH, "defaults_vs_kernel", "the kernel's NBD client", 0.6),
)


def limit(server: str, bs: str, iodepth: int) -> float | None:
    """What the server's delay allows at this depth: iodepth requests per delay (IOPS, or
    MB/s for large blocks); None without a delay."""
    delay_us = SERVERS[server][2]
    if not delay_us:
        return None
    per_s = iodepth * 1e6 / delay_us
    return per_s * 128 * 1024 / 1e6 if bs != "4k" else per_s


def _build_row(server: str, w: Workload, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    large = w.bs != "4k"
    merged = {impl: merge_runs(r) if r else {} for impl, r in runs.items()}
    cap = limit(server, w.bs, w.iodepth)
    figure = {impl: metric(m, large) for impl, m in merged.items()}

    def ratio(a: str, b: str) -> float | None:
        return paired_ratio(runs[a], runs[b], large) if runs[a] and runs[b] else None

    def get(impl: str, key: str) -> Any:
        cell = merged[impl]
        return None if "error" in cell else cell.get(key)

    defaults, ours = figure[DEFAULTS], figure["pyvduse"]
    return {
        "server": server, "workload": w.name, "rw": w.rw, "bs": w.bs,
        "iodepth": w.iodepth, "unit": "MB/s" if large else "IOPS",
        "defaults": defaults, "ours": ours, "peer": figure["qsd"], "kernel": figure[KERNEL],
        "defaults_vs_peer": ratio(DEFAULTS, "qsd"), "ratio": ratio("pyvduse", "qsd"),
        "defaults_vs_kernel": ratio(DEFAULTS, KERNEL),
        "limit": cap,
        "defaults_vs_limit": defaults / cap if defaults is not None and cap else None,
        "ours_vs_limit": ours / cap if ours is not None and cap else None,
        "defaults_lat_us": get(DEFAULTS, "lat_mean_us"), "our_lat_us": get("pyvduse", "lat_mean_us"),
        "peer_lat_us": get("qsd", "lat_mean_us"), "kernel_lat_us": get(KERNEL, "lat_mean_us"),
        "defaults_cpu_us_per_io": get(DEFAULTS, "cpu_us_per_io"),
        "our_cpu_us_per_io": get("pyvduse", "cpu_us_per_io"),
        "peer_cpu_us_per_io": get("qsd", "cpu_us_per_io"),
        "server_cpu_defaults": get(DEFAULTS, "server_cpu_us_per_io"),
        "server_cpu_peer": get("qsd", "server_cpu_us_per_io"),
        "server_cpu_kernel": get(KERNEL, "server_cpu_us_per_io"),
        "defaults_depth": get(DEFAULTS, "depth_mean"),
        "errors": [c["error"] for impl in IMPLS for c in runs.get(impl, []) if "error" in c],
    }  # fmt: skip


def build_rows(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells -> one row per (server, workload), medians over rounds, ratios paired by
    round: ours (the options spelled out) and the defaults against qemu-storage-daemon, the
    defaults against the kernel's NBD client."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["server"], c["workload"], c["impl"]), []).append(c)
    rows = []
    for server in SERVERS:
        for w in WORKLOADS:
            runs = {impl: groups.get((server, w.name, impl), []) for impl in IMPLS}
            if any(runs.values()):
                rows.append(_build_row(server, w, runs))
    return rows


def _row(rows: Sequence[dict[str, Any]], server: str, rw: str, iodepth: int) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["server"] == server and r["rw"] == rw and r["bs"] == "4k" and r["iodepth"] == iodepth
        ),
        None,
    )


def evaluate_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 30's for the defaults (against qemu-storage-daemon at iodepth 1 and 16, against
    the kernel's NBD client at 16, on each server, for 4k random reads and writes), then
    issue 17's for the options spelled out."""
    out = []
    for server in SERVERS:
        for rw in RWS:
            for depth, key, peer, floor in DEFAULTS_TARGETS:
                r = _row(rows, server, rw, depth)
                value = r[key] if r else None
                out.append(
                    {
                        "target": f"{key}_{server}_{rw}_qd{depth}",
                        "text": f"{server} {rw} iodepth {depth}: defaults >= {floor:g}x {peer}",
                        "value": None
                        if value is None or r is None
                        else f"{value:.2f}x ({r['defaults']:,.0f} IOPS)",
                        "met": None if value is None else value >= floor,
                    }
                )
    measured = [r for r in rows if r["ratio"] is not None]
    below = [f"{r['server']} {r['workload']} {r['ratio']:.2f}x" for r in measured if r["ratio"] < 1.0]
    out.append(
        {
            "target": "vs_peer",
            "text": "every cell: ours (options spelled out) >= 1.0x qemu-storage-daemon",
            "value": f"{len(measured) - len(below)} of {len(measured)} cells",
            "met": None if not measured else not below,
            "below": below,
        }
    )
    for rw in RWS:
        r = _row(rows, DELAYED, rw, TARGET_DEPTH)
        share = r["ours_vs_limit"] if r else None
        out.append(
            {
                "target": f"limit_{rw}",
                "text": f"{rw} iodepth {TARGET_DEPTH}, 1 ms delay: ours >= "
                f"{TARGET_SHARE_OF_LIMIT}x of {TARGET_DEPTH} requests per ms",
                "value": None if share is None or r is None else f"{share:.2f}x ({r['ours']:,.0f} IOPS)",
                "met": None if share is None else share >= TARGET_SHARE_OF_LIMIT,
            }
        )
    return out


COLUMNS = (
    "server",
    "workload",
    "defaults",
    "ours",
    "qsd",
    "kernel",
    "defaults/qsd",
    "ours/qsd",
    "defaults/kernel",
    "limit",
    "defaults/limit",
    "lat µs defaults/ours/qsd/kernel",
    "CPU µs/IO defaults/ours/qsd",
    "server CPU µs/IO defaults/qsd/kernel",
    "depth",
)
RIGHT = set(COLUMNS) - {"server", "workload"}
CPU_KEYS = ("defaults_cpu_us_per_io", "our_cpu_us_per_io", "peer_cpu_us_per_io")
SERVER_CPU_KEYS = ("server_cpu_defaults", "server_cpu_peer", "server_cpu_kernel")


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if unit == "IOPS" else f"{value:,.1f} MB/s"


def format_rows(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    body = []
    for r in rows:
        lat = (
            "/".join(_num(r[k]) for k in ("defaults_lat_us", "our_lat_us", "peer_lat_us", "kernel_lat_us"))
            if r["iodepth"] == 1
            else "-"
        )
        body.append([
            r["server"], r["workload"], _figure(r["defaults"], r["unit"]), _figure(r["ours"], r["unit"]),
            _figure(r["peer"], r["unit"]), _figure(r["kernel"], r["unit"]), _x(r["defaults_vs_peer"]),
            _x(r["ratio"]), _x(r["defaults_vs_kernel"]), _figure(r["limit"], r["unit"]),
            _x(r["defaults_vs_limit"]), lat,
            "/".join(_num(r[k]) for k in CPU_KEYS), "/".join(_num(r[k]) for k in SERVER_CPU_KEYS),
            _num(r["defaults_depth"], 1),
        ])  # fmt: skip
    return format_grid(COLUMNS, body, RIGHT, markdown)


def format_notes(info: dict[str, Any]) -> str:
    guest = info.get("guest", {})
    steal = info.get("host_steal_share")
    return "\n".join(
        [
            f"nbdkit memory {info.get('disk_mb', '?')} MiB on a Unix socket in the guest, "
            f"{info.get('server_threads', '?')} threads; '{DELAYED}': nbdkit --filter=delay "
            "delay-read=1ms delay-write=1ms. defaults: pyvduse blk --name N --nbd URI; ours: "
            "the same with --queues 1 --queue-size 256 (and --our-args); qsd: driver=nbd, "
            "type=vduse-blk, one queue of 256; kernel: nbd-client -unix with nbd.ko, one "
            "connection. IOPS (MB/s for 128k). limit: iodepth requests per ms behind the delay. "
            "CPU µs/IO: the serving daemon's CPU (all threads) per I/O the device completed; "
            "server CPU: nbdkit's over the same cell; depth: the defaults' mean queue depth "
            "(ctl stats).",
            f"{info.get('seconds_per_cell', 0):g} s per cell (+{info.get('ramp_seconds', 0):g} s "
            f"ramp), {info.get('repeat', 1)} round(s); guest {guest.get('guest_kernel', '?')}, "
            f"{guest.get('guest_vcpus', '?')} vCPUs, QEMU TCG on {info.get('host_cpu', '?')}"
            + ("" if steal is None else f" ({steal * 100:.0f}% stolen)")
            + f"; {guest.get('qsd_version', '?')}; {guest.get('fio_version', '?')}; pyvduse "
            f"{info.get('pyvduse_commit', '?')}"
            + (f" with {info['our_args']}" if info.get("our_args") else "")
            + f"; total {info.get('total_seconds', 0):.0f} s.",
        ]
    )


def report_text(report: dict[str, Any], markdown: bool = False) -> str:
    return "\n\n".join(
        [
            format_rows(report["rows"], markdown),
            format_verdicts(report["targets"], markdown),
            format_notes(report["info"]),
        ]
    )


def build_report(guest: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    rows = build_rows(guest["cells"])
    return {"info": info, "rows": rows, "targets": evaluate_targets(rows), "cells": guest["cells"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_options(
        p,
        default_seconds=DEFAULT_SECONDS,
        default_json=DEFAULT_JSON,
        quick="workloads " + ",".join(QUICK_WORKLOADS),
        repeat="rounds of every cell: medians, ratios paired by round (default 1)",
        our_args="extra 'pyvduse blk' options for our daemons",
    )
    p.add_argument("--servers", default=",".join(SERVERS), help="plain, delay-1ms or both")
    p.add_argument(
        "--perf",
        action="append",
        default=[],
        metavar="WORKLOAD",
        help="sample the whole guest with perf (cpu-clock) during this workload's cells, each "
        "serving side's, and print where the CPU time went (repeatable)",
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
    servers = args.servers.split(",")
    unknown = [n for n in [*workloads, *args.perf] if n not in WORKLOAD_BY_NAME]
    unknown += [n for n in servers if n not in SERVERS]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}")
    started = time.monotonic()
    load_before, times_before = host_load(), host_cpu_times()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cells = len(workloads) * len(servers) * len(IMPLS) * args.repeat
    with HostWatch() as watch:
        guest = run_guest(
            [
                "--seconds",
                f"{seconds:g}",
                "--ramp",
                f"{ramp:g}",
                "--workloads",
                ",".join(workloads),
                "--servers",
                ",".join(servers),
                "--repeat",
                str(args.repeat),
                f"--our-args={args.our_args}",
                *(f"--perf={name}" for name in args.perf),
            ],
            mem=args.mem,
            smp=args.smp,
            timeout=900 + 3 * cells * (seconds + ramp + 5),
            runner="nbd_guest.py",
            prog="nbd",
        )
    from nbd_guest import DISK_MB, SERVER_THREADS

    info = {
        "date": date, "host_cpu": host_cpu_model(), "host_cpus": os.cpu_count(),
        "host_load_before": load_before, "host_load_after": host_load(),
        "host_steal_share": steal_share(times_before, host_cpu_times()),
        "other_vms": watch.summary(), "guest": guest["info"],
        "pyvduse_commit": git_commit(), "pyvduse_source_sha256": source_digest(),
        "seconds_per_cell": seconds, "ramp_seconds": ramp, "repeat": args.repeat,
        "our_args": args.our_args, "workloads": workloads, "servers": servers,
        "disk_mb": DISK_MB, "server_threads": SERVER_THREADS,
        "devices": guest.get("devices", []), "guest_seconds": guest.get("guest_total_s"),
        "total_seconds": time.monotonic() - started,
    }  # fmt: skip
    report = build_report(guest, info)
    print(report_text(report, markdown=args.markdown))
    for c in report["cells"]:
        if c.get("perf"):
            what = f"{c['impl']} {c['server']} {c['workload']} round {c.get('round', 0)}"
            print(f"\nperf, {what}:\n{c['perf']}")
    report["table"] = report_text(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")
    failed = [r for r in report["rows"] if r["errors"]]
    for r in failed:
        print(f"FAILED {r['server']} {r['workload']}: {r['errors'][0][-500:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
