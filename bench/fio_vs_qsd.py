"""fio against pyvduse and against QEMU's qemu-storage-daemon (vduse-blk), in the test VM.

Boots the test VM once (pyvduse.testvm) and runs bench/guest_runner.py there: a fio matrix
(libaio, direct, time-based) against pyvduse's `blk` daemon and qemu-storage-daemon's
vduse-blk export, each with a null backend and a raw image on the guest's tmpfs (512 MiB,
written once in full), same queue size (256) and queue count. Prints one table — our IOPS
(MB/s for 128k), the peer's, ours/peer, mean latency at iodepth 1, and each daemon's CPU
time per I/O — and writes it as JSON with the VM and host details.

    python3 bench/fio_vs_qsd.py [--seconds 8] [--repeat N] [--quick] [--json PATH]
    python3 bench/fio_vs_qsd.py --profile /work/scratch/prof.out   # our daemon under cProfile

Needs root (the test VM does). Emulated (TCG) figures: compare the columns with each other,
not with real hardware.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import pstats
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guest_runner import (
    BACKENDS,
    IMAGE_SIZE,
    PROFILE_WORKLOAD,
    QUEUE_SIZE,
    TWO_QUEUE_BASELINE,
    WORKLOAD_BY_NAME,
    WORKLOADS,
)

from pyvduse import testvm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "fio_vs_qsd.json"
# 36 cells x (8 s + 1 s ramp + ~2.5 s of fio start-up under TCG) + ~1 min of boot and daemon
# start-up: about 8 minutes, leaving room under 10 for a machine shared with other VMs.
DEFAULT_SECONDS = 8.0
QUICK_WORKLOADS = (
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd16",
    "write-128k-qd8",
    "randread-4k-2q-qd16x2",
)
COLUMNS = ("backend", "workload", "ours", "peer", "ratio", "lat µs ours/peer",
           "our CPU µs/IO", "peer CPU µs/IO", "guest CPU µs/IO ours/peer")  # fmt: skip
RIGHT = {
    "ours",
    "peer",
    "ratio",
    "lat µs ours/peer",
    "our CPU µs/IO",
    "peer CPU µs/IO",
    "guest CPU µs/IO ours/peer",
}


# --------------------------------------------------------------------------- report


def metric(cell: dict[str, Any] | None, large: bool) -> float | None:
    """A cell's figure: MB/s for large blocks, IOPS otherwise; None for a failed cell."""
    if not cell or "error" in cell:
        return None
    value = cell.get("mb_s" if large else "iops")
    return None if value is None else float(value)


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "not met")


def format_verdicts(targets: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Targets as rows of text, measured value (and the cells below the line), verdict."""
    body = []
    for t in targets:
        extra = f" (below: {', '.join(t['below'])})" if t.get("below") else ""
        body.append([t["text"], f"{t['value'] or '-'}{extra}", verdict(t["met"])])
    return format_grid(("target", "measured", "verdict"), body, set(), markdown)


def merge_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one cell -> one cell: the median of every figure over the runs that
    worked (with one run, that run), or the first error when none did."""
    ok = [c for c in runs if "error" not in c]
    if not ok:
        return dict(runs[0])
    merged = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
            figures = [c[key] for c in ok if isinstance(c.get(key), (int, float))]
            merged[key] = statistics.median(figures)
    merged["runs"] = len(ok)
    return merged


def paired_ratio(ours: Sequence[dict[str, Any]], peer: Sequence[dict[str, Any]], large: bool) -> float | None:
    """Median over rounds of ours/peer within a round (both ran back to back, so under the
    same load), which a drift in the machine's load moves less than a ratio of medians."""
    by_round = {c.get("round", 0): metric(c, large) for c in peer}
    ratios = [
        o / p for c in ours if (o := metric(c, large)) is not None and (p := by_round.get(c.get("round", 0)))
    ]
    return statistics.median(ratios) if ratios else None


def build_rows(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Guest cells (one per implementation and round) -> one row per (backend, workload), in
    matrix order; with several rounds, medians, and the ratio paired by round."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["impl"], c["backend"], c["workload"]), []).append(c)
    rows = []
    for b in BACKENDS:
        for w in WORKLOADS:
            our_runs, peer_runs = groups.get(("pyvduse", b, w.name), []), groups.get(("qsd", b, w.name), [])
            if not our_runs and not peer_runs:
                continue
            ours = merge_runs(our_runs) if our_runs else None
            peer = merge_runs(peer_runs) if peer_runs else None
            o, p = metric(ours, w.large), metric(peer, w.large)
            rows.append({
                "backend": b,
                "workload": w.name,
                "unit": "MB/s" if w.large else "IOPS",
                "ours": o,
                "peer": p,
                "ratio": paired_ratio(our_runs, peer_runs, w.large),
                "runs": len(our_runs),
                "ratio_range": _ratio_range(our_runs, peer_runs, w.large) if len(our_runs) > 1 else None,
                "our_lat_us": (ours or {}).get("lat_mean_us"),
                "peer_lat_us": (peer or {}).get("lat_mean_us"),
                "our_cpu_us_per_io": (ours or {}).get("cpu_us_per_io"),
                "peer_cpu_us_per_io": (peer or {}).get("cpu_us_per_io"),
                "our_cpu_util": (ours or {}).get("cpu_util"),
                "peer_cpu_util": (peer or {}).get("cpu_util"),
                # all of the guest's CPU (fio, kernel, daemon) per I/O, and its use of 2 vCPUs
                "our_guest_cpu_us_per_io": (ours or {}).get("guest_cpu_us_per_io"),
                "peer_guest_cpu_us_per_io": (peer or {}).get("guest_cpu_us_per_io"),
                "our_guest_cpu_util": (ours or {}).get("guest_cpu_util"),
                "peer_guest_cpu_util": (peer or {}).get("guest_cpu_util"),
                "our_ctxt_per_io": (ours or {}).get("ctxt_per_io"),
                "peer_ctxt_per_io": (peer or {}).get("ctxt_per_io"),
                "iodepth": w.iodepth,
                "numjobs": w.numjobs,
                "queues": w.queues,
                "errors": [c["error"] for c in (*our_runs, *peer_runs) if "error" in c],
            })  # fmt: skip
    return rows


def _ratio_range(
    ours: Sequence[dict[str, Any]], peer: Sequence[dict[str, Any]], large: bool
) -> tuple[float, float] | None:
    """The lowest and highest per-round ratio: how far one run alone could have misled."""
    ratios = [r for r in (paired_ratio([c], peer, large) for c in ours) if r is not None]
    return (min(ratios), max(ratios)) if ratios else None


def two_queue_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our 2-queue cell against our own 1-queue cell with the same I/Os in flight."""
    by_key = {(r["backend"], r["workload"]): r for r in rows}
    out = []
    for two, one in TWO_QUEUE_BASELINE.items():
        for b in BACKENDS:
            r2, r1 = by_key.get((b, two)), by_key.get((b, one))
            if r2 is None or r1 is None:
                continue
            ours = r2["ours"] / r1["ours"] if r2["ours"] and r1["ours"] else None
            peer = r2["peer"] / r1["peer"] if r2["peer"] and r1["peer"] else None
            out.append(
                {"backend": b, "workload": two, "baseline": one, "ours_ratio": ours, "peer_ratio": peer}
            )
    return out


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.1f}" if unit == "MB/s" or abs(value) < 100 else f"{value:,.0f}"
    return f"{text} {unit}".rstrip()


def table_cells(row: dict[str, Any]) -> list[str]:
    lat = "-"
    if row["iodepth"] == 1 and row["numjobs"] == 1:
        lat = f"{_num(row['our_lat_us'])}/{_num(row['peer_lat_us'])}"
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
    if row.get("ratio_range"):
        low, high = row["ratio_range"]
        ratio += f" ({low:.2f}..{high:.2f})"
    return [row["backend"], row["workload"], _num(row["ours"], row["unit"]),
            _num(row["peer"], row["unit"]), ratio, lat,
            _num(row["our_cpu_us_per_io"]), _num(row["peer_cpu_us_per_io"]),
            f"{_num(row.get('our_guest_cpu_us_per_io'))}/"
            f"{_num(row.get('peer_guest_cpu_us_per_io'))}"]  # fmt: skip


def format_grid(
    columns: Sequence[str], body: Sequence[Sequence[str]], right: set[str], markdown: bool = False
) -> str:
    """An aligned text (or Markdown) table."""
    widths = [
        max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(columns)
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, columns, strict=True)
        ]
        return f"| {' | '.join(parts)} |" if markdown else "  ".join(parts).rstrip()

    if markdown:
        rule = (
            "|"
            + "|".join(
                ("-" * (w + 1) + ":") if h in right else ("-" * (w + 2))
                for w, h in zip(widths, columns, strict=True)
            )
            + "|"
        )
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(c) for c in body)])


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """One aligned text table (or a Markdown one) of the rows."""
    return format_grid(COLUMNS, [table_cells(r) for r in rows], set(RIGHT), markdown)


def _repeat_note(repeat: int) -> str:
    return f", {repeat} paired rounds each: medians, ratio (lowest..highest round)" if repeat > 1 else ""


def _steal_note(share: float | None) -> str:
    return "" if share is None else f" ({share * 100:.0f}% of the host's CPU time stolen)"


def format_notes(two_q: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = []
    for t in two_q:
        ours = "-" if t["ours_ratio"] is None else f"{t['ours_ratio']:.2f}"
        peer = "-" if t["peer_ratio"] is None else f"{t['peer_ratio']:.2f}"
        lines.append(
            f"{t['backend']}: {t['workload']} vs {t['baseline']} (same 32 in flight): "
            f"ours {ours}x, peer {peer}x"
        )
    guest = info.get("guest", {})
    lines.append(
        f"{info.get('seconds_per_cell', 0):g} s per cell (+{info.get('ramp_seconds', 0):g} s ramp)"
        f"{_repeat_note(info.get('repeat', 1))}; "
        f"guest {guest.get('guest_kernel', '?')}, {guest.get('guest_vcpus', '?')} vCPUs, "
        f"{guest.get('guest_mem_mib', '?')} MiB, QEMU TCG on {info.get('host_cpu', '?')}"
        f"{_steal_note(info.get('host_steal_share'))}; total {info.get('total_seconds', 0):.0f} s"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- host side


def host_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_commit() -> str:
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def source_digest() -> str:
    """sha256 of pyvduse/**/*.py: names the exact code measured when the tree is dirty."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "pyvduse").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def host_load() -> dict[str, Any]:
    """Noise indicators: load average and how many other QEMU processes are running."""
    qemus = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().startswith("qemu-system"):
                    qemus += 1
            except OSError:
                pass
    return {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "qemu_processes": qemus}


def host_cpu_times() -> list[int]:
    """The host's aggregate CPU times from /proc/stat (user, nice, system, idle, iowait, irq,
    softirq, steal, ...), in clock ticks; empty where unreadable."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def steal_share(before: Sequence[int], after: Sequence[int]) -> float | None:
    """How much of the host's CPU time the hypervisor under it took for others (steal), between
    two host_cpu_times(): on a shared cloud machine this, not our code, moves every cell."""
    if len(before) < 8 or len(after) < 8:
        return None
    delta = [a - b for a, b in zip(after[:8], before[:8], strict=True)]
    total = sum(delta)
    return delta[7] / total if total > 0 else None


def run_guest(
    guest_args: list[str],
    *,
    mem: str,
    smp: int,
    timeout: float,
    runner: str = "guest_runner.py",
    prog: str = "fio_vs_qsd",
) -> dict[str, Any]:
    """Boot the VM once, run the guest runner (bench/RUNNER, which takes --out PATH), return
    its JSON (written under bench/results); `prog` names the caller in error messages."""
    out = HERE / "results" / f".guest-{os.getpid()}-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(HERE / runner), "--out", str(out), *guest_args]
    try:
        res = testvm.run(
            shlex.join(argv), cwd=str(ROOT), mem=mem, smp=smp, timeout=timeout, console=sys.stderr
        )
        if not out.exists():
            raise SystemExit(
                f"{prog}: the guest wrote no results (exit {res.exit_code}"
                f"{', timed out' if res.timed_out else ''}); console tail:\n"
                f"{res.output[-3000:]}"
            )
        data: dict[str, Any] = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    if "fatal" in data:
        raise SystemExit(f"{prog}: the guest runner failed: {data['fatal']}")
    return data


def vm_timeout(cells: int, seconds: float, ramp: float) -> float:
    """Generous: only a hung guest should reach it."""
    return 600 + 3 * cells * (seconds + ramp + 5)


def print_profile(path: str, top: int) -> None:
    buf = io.StringIO()
    stats = pstats.Stats(path, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    print(buf.getvalue())


def add_run_options(
    p: argparse.ArgumentParser,
    *,
    default_seconds: float,
    default_json: Path,
    quick: str,
    repeat: str,
    our_args: str,
    markdown: str = "print the tables as Markdown",
) -> None:
    """The options every VM benchmark of bench/ takes (fio's timing, the smoke mode, the
    workloads, the rounds, our daemon's extra options, the JSON, the guest's size); each
    benchmark words what its smoke mode, rounds and daemons are."""
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"fio runtime per cell (default {default_seconds:g}, 1 with --quick)",
    )
    p.add_argument(
        "--ramp", type=float, default=None, help="fio ramp_time per cell (default 1, 0 with --quick)"
    )
    p.add_argument("--quick", action="store_true", help=f"smoke mode: 1 s cells, {quick}")
    p.add_argument("--workloads", help="comma-separated subset (default: all, or the quick set)")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help=repeat)
    p.add_argument("--our-args", default="", metavar="ARGS", help=our_args)
    p.add_argument(
        "--json", type=Path, default=default_json, help=f"default {default_json.relative_to(ROOT)}"
    )
    p.add_argument("--markdown", action="store_true", help=markdown)
    p.add_argument("--mem", default=os.environ.get("TESTVM_MEM", "3G"), help="guest memory (default 3G)")
    p.add_argument("--smp", type=int, default=2, help="guest vCPUs (default 2)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(
        p,
        default_seconds=DEFAULT_SECONDS,
        default_json=DEFAULT_JSON,
        quick="a subset of the workloads",
        repeat="run every cell N times, back to back with the peer's: the table shows "
        "medians and the median per-round ratio with its range (default 1)",
        our_args="extra 'pyvduse blk' options for our daemon, e.g. '--poll-us 50'",
        markdown="print the table as Markdown",
    )
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default null,file)")
    p.add_argument(
        "--profile",
        metavar="PSTATS",
        help="instead: profile our daemon for one "
        f"{PROFILE_WORKLOAD} null cell and print the top functions by tottime",
    )
    p.add_argument("--top", type=int, default=25, help="functions to print with --profile")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else DEFAULT_SECONDS)
    ramp = args.ramp if args.ramp is not None else (0.0 if args.quick else 1.0)
    started = time.monotonic()
    if args.profile:
        prof = Path(args.profile).resolve()
        data = run_guest(
            ["--profile", str(prof), "--seconds", f"{seconds:g}", "--ramp", f"{ramp:g}"],
            mem=args.mem,
            smp=args.smp,
            timeout=vm_timeout(1, seconds, ramp),
        )
        print(f"profiled cell: {json.dumps(data['cells'][0])}")
        workers = Path(f"{prof}.workers")
        if workers.exists():
            print(f"--- queue worker threads only ({workers}; all threads: {prof}) ---")
            print_profile(str(workers), args.top)
        else:
            print_profile(str(prof), args.top)
        print(f"total {time.monotonic() - started:.0f} s")
        return 0
    names = (
        args.workloads.split(",")
        if args.workloads
        else (list(QUICK_WORKLOADS) if args.quick else [w.name for w in WORKLOADS])
    )
    unknown = [n for n in names if n not in WORKLOAD_BY_NAME]
    if unknown:
        _parser().error(f"unknown workloads {', '.join(unknown)}; known: {', '.join(WORKLOAD_BY_NAME)}")
    backends = [b for b in args.backends.split(",") if b]
    if not backends or not set(backends) <= set(BACKENDS):
        _parser().error(f"backends are {', '.join(BACKENDS)}")
    if args.repeat < 1:
        _parser().error("--repeat must be at least 1")
    cells = len(names) * len(backends) * 2 * args.repeat
    load_before, times_before = host_load(), host_cpu_times()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    guest = run_guest(
        [
            "--seconds",
            f"{seconds:g}",
            "--ramp",
            f"{ramp:g}",
            "--workloads",
            ",".join(names),
            "--backends",
            ",".join(backends),
            f"--our-args={args.our_args}",
            "--repeat",
            str(args.repeat),
        ],
        mem=args.mem,
        smp=args.smp,
        timeout=vm_timeout(cells, seconds, ramp),
    )
    rows = build_rows(guest["cells"])
    two_q = two_queue_ratios(rows)
    info = {
        "date": date,
        "host_cpu": host_cpu_model(),
        "host_cpus": os.cpu_count(),
        "host_load_before": load_before,
        "host_load_after": host_load(),
        "host_steal_share": steal_share(times_before, host_cpu_times()),
        "vm": {"accel": os.environ.get("PYVDUSE_TESTVM_ACCEL", "tcg"), "vcpus": args.smp, "mem": args.mem},
        "guest": guest["info"],
        "our_args": args.our_args,
        "pyvduse_commit": git_commit(),
        "pyvduse_source_sha256": source_digest(),
        "seconds_per_cell": seconds,
        "repeat": args.repeat,
        "ramp_seconds": ramp,
        "image_bytes": IMAGE_SIZE,
        "queue_size": QUEUE_SIZE,
        "guest_setup_seconds": guest.get("setup_s"),
        "guest_seconds": guest.get("guest_total_s"),
        "total_seconds": time.monotonic() - started,
        "devices": guest.get("devices", []),
    }
    table = format_table(rows, markdown=args.markdown)
    print(table)
    print(format_notes(two_q, info))
    report = {
        "info": info,
        "rows": rows,
        "two_queue_vs_one": two_q,
        "cells": guest["cells"],
        "table": format_table(rows),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")
    failed = [r for r in rows if r["errors"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
