"""fio on a Ceph RBD image: pyvduse --rbd against qemu-storage-daemon driver=rbd and the
kernel's rbd.ko, in the test VM.

The benchmark of issue 32. In one run in the test VM, one Ceph cluster (one monitor, one
memstore OSD on 127.0.0.1) and one image are served by pyvduse (``blk --rbd``), by
qemu-storage-daemon (``--blockdev driver=rbd --export type=vduse-blk``) and by the kernel's
own client (``rbd map``: the limit), and fio (libaio, direct, time-based, one job) runs 4k
randread and randwrite at iodepth 1 and 16 and 128k sequential reads and writes at iodepth 8
against each, back to back. It prints one row per workload (ours, the peer's, the ratio, the
kernel's, ours over the kernel's, latency, CPU per I/O of the daemons and of the OSD) and
the issue's targets:

- every cell: ours >= 1.0x qemu-storage-daemon's;
- iodepth 16: ours >= 0.8x the kernel's client.

    python3 bench/rbd.py [--seconds 4] [--ramp 1] [--repeat N] [--quick] [--markdown]
                         [--workloads NAME,...] [--our-args ARGS] [--json PATH]

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
from rbd_guest import IMAGE_MB, QUICK_WORKLOADS, WORKLOAD_BY_NAME, WORKLOADS
from slow_disk import HostWatch, _num, _x

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "rbd.json"
DEFAULT_SECONDS = 4.0
TARGET_DEPTH = 16
TARGET_SHARE_OF_LIMIT = 0.8


def build_rows(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells -> one row per workload, medians over rounds, ratios paired by round."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["workload"], c["impl"]), []).append(c)
    rows = []
    for w in WORKLOADS:
        runs = {impl: groups.get((w.name, impl), []) for impl in ("pyvduse", "qsd", "krbd")}
        if not any(runs.values()):
            continue
        large = w.bs != "4k"
        merged = {impl: merge_runs(r) if r else {} for impl, r in runs.items()}

        def get(impl: str, key: str, merged: dict[str, dict[str, Any]] = merged) -> Any:
            cell = merged[impl]
            return None if "error" in cell else cell.get(key)

        ours = metric(merged["pyvduse"], large)
        rows.append({
            "workload": w.name, "rw": w.rw, "bs": w.bs, "iodepth": w.iodepth,
            "unit": "MB/s" if large else "IOPS",
            "ours": ours, "peer": metric(merged["qsd"], large), "krbd": metric(merged["krbd"], large),
            "ratio": paired_ratio(runs["pyvduse"], runs["qsd"], large) if runs["qsd"] else None,
            "ours_vs_krbd": (
                paired_ratio(runs["pyvduse"], runs["krbd"], large) if runs["krbd"] else None
            ),
            "our_lat_us": get("pyvduse", "lat_mean_us"), "peer_lat_us": get("qsd", "lat_mean_us"),
            "krbd_lat_us": get("krbd", "lat_mean_us"),
            "our_cpu_us_per_io": get("pyvduse", "cpu_us_per_io"),
            "peer_cpu_us_per_io": get("qsd", "cpu_us_per_io"),
            "osd_cpu": {impl: get(impl, "osd_cpu_us_per_io") for impl in runs},
            "our_depth": get("pyvduse", "depth_mean"),
            "errors": [f"{c['impl']}: {c['error']}" for r in runs.values() for c in r if "error" in c],
        })  # fmt: skip
    return rows


def evaluate_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    measured = [r for r in rows if r["ratio"] is not None]
    below = [f"{r['workload']} {r['ratio']:.2f}x" for r in measured if r["ratio"] < 1.0]
    out = [
        {
            "target": "vs_qsd",
            "text": "every cell: ours >= 1.0x qemu-storage-daemon's",
            "value": f"{len(measured) - len(below)} of {len(measured)} cells",
            "met": None if not measured else not below,
            "below": below,
        }
    ]
    for rw in ("randread", "randwrite"):
        r = next(
            (r for r in rows if r["rw"] == rw and r["bs"] == "4k" and r["iodepth"] == TARGET_DEPTH),
            None,
        )
        share = r["ours_vs_krbd"] if r else None
        out.append(
            {
                "target": f"krbd_{rw}",
                "text": f"{rw} 4k iodepth {TARGET_DEPTH}: ours >= {TARGET_SHARE_OF_LIMIT}x the kernel's rbd",
                "value": None if share is None or r is None else f"{share:.2f}x ({r['ours']:,.0f} IOPS)",
                "met": None if share is None else share >= TARGET_SHARE_OF_LIMIT,
            }
        )
    return out


COLUMNS = (
    "workload",
    "ours",
    "qsd",
    "ours/qsd",
    "krbd (limit)",
    "ours/krbd",
    "lat µs ours/qsd/krbd",
    "CPU µs/IO ours/qsd",
    "OSD CPU µs/IO ours/qsd/krbd",
    "depth",
)
RIGHT = set(COLUMNS) - {"workload"}


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} IOPS" if unit == "IOPS" else f"{value:,.1f} MB/s"


def format_rows(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    body = []
    for r in rows:
        lat = (
            f"{_num(r['our_lat_us'])}/{_num(r['peer_lat_us'])}/{_num(r['krbd_lat_us'])}"
            if r["iodepth"] == 1
            else "-"
        )
        osd = "/".join(_num(r["osd_cpu"][i]) for i in ("pyvduse", "qsd", "krbd"))
        body.append([
            r["workload"], _figure(r["ours"], r["unit"]), _figure(r["peer"], r["unit"]),
            _x(r["ratio"]), _figure(r["krbd"], r["unit"]), _x(r["ours_vs_krbd"]), lat,
            f"{_num(r['our_cpu_us_per_io'])}/{_num(r['peer_cpu_us_per_io'])}", osd,
            _num(r["our_depth"], 1),
        ])  # fmt: skip
    return format_grid(COLUMNS, body, RIGHT, markdown)


def format_notes(info: dict[str, Any]) -> str:
    guest = info.get("guest", {})
    steal = info.get("host_steal_share")
    features = ", ".join(guest.get("image_features", [])) or "?"
    return "\n".join(
        [
            f"One image of {info.get('image_mb', '?')} MiB (features: {features}), every byte "
            "written once, on a one-monitor, one-memstore-OSD cluster on the guest's 127.0.0.1 "
            "(no auth), served three ways at once: pyvduse blk --rbd and qemu-storage-daemon "
            "driver=rbd (type=vduse-blk), one queue of 256 each, librbd's defaults (its cache "
            "on) for both; krbd: rbd map (rbd.ko, the limit). CPU µs/IO: the serving daemon's "
            "CPU (all threads) per I/O the device completed; OSD CPU: ceph-osd's over the same "
            "cell; depth: pyvduse's mean queue depth (ctl stats).",
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
        our_args="extra 'pyvduse blk' options for our daemon",
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
    unknown = [n for n in workloads if n not in WORKLOAD_BY_NAME]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}")
    started = time.monotonic()
    load_before, times_before = host_load(), host_cpu_times()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cells = len(workloads) * 3 * args.repeat
    with HostWatch() as watch:
        guest = run_guest(
            [
                "--seconds",
                f"{seconds:g}",
                "--ramp",
                f"{ramp:g}",
                "--workloads",
                ",".join(workloads),
                "--repeat",
                str(args.repeat),
                f"--our-args={args.our_args}",
            ],
            mem=args.mem,
            smp=args.smp,
            timeout=900 + 3 * cells * (seconds + ramp + 5),
            runner="rbd_guest.py",
            prog="rbd",
        )
    info = {
        "date": date, "host_cpu": host_cpu_model(), "host_cpus": os.cpu_count(),
        "host_load_before": load_before, "host_load_after": host_load(),
        "host_steal_share": steal_share(times_before, host_cpu_times()),
        "other_vms": watch.summary(), "guest": guest["info"],
        "pyvduse_commit": git_commit(), "pyvduse_source_sha256": source_digest(),
        "seconds_per_cell": seconds, "ramp_seconds": ramp, "repeat": args.repeat,
        "our_args": args.our_args, "workloads": workloads, "image_mb": IMAGE_MB,
        "devices": guest.get("devices", []), "guest_seconds": guest.get("guest_total_s"),
        "total_seconds": time.monotonic() - started,
    }  # fmt: skip
    report = build_report(guest, info)
    print(report_text(report, markdown=args.markdown))
    report["table"] = report_text(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")
    failed = [r for r in report["rows"] if r["errors"]]
    for r in failed:
        print(f"FAILED {r['workload']}: {r['errors'][0][-500:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
