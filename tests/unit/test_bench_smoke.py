"""bench/fio_vs_qsd.py: fio JSON parsing and the table without a VM, plus one tiny real run."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def runner() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the bench scripts import each other as top-level modules
    try:
        return importlib.import_module("guest_runner")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def host(runner: ModuleType) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("fio_vs_qsd")
    finally:
        sys.path.remove(str(BENCH))


def fio_output(read: dict[str, Any] | None = None, write: dict[str, Any] | None = None, jobs: int = 1) -> str:
    """A trimmed fio 3.x --output-format=json document."""
    empty = {
        "total_ios": 0,
        "iops": 0.0,
        "bw_bytes": 0,
        "runtime": 0,
        "lat_ns": {"mean": 0.0},
        "clat_ns": {"mean": 0.0},
    }
    job = {
        "jobname": "x",
        "error": 0,
        "read": {**empty, **(read or {})},
        "write": {**empty, **(write or {})},
        "trim": dict(empty),
    }
    return json.dumps({"fio version": "fio-3.33", "jobs": [job] * jobs})


READ = {
    "total_ios": 26310,
    "iops": 2631.05,
    "bw_bytes": 10776780,
    "runtime": 10000,
    "lat_ns": {"mean": 6035933.8},
    "clat_ns": {"mean": 6000000.0, "percentile": {"99.000000": 9109504}},
}


def test_parse_fio_json_read(runner: ModuleType) -> None:
    r = runner.parse_fio_json(fio_output(read=READ))
    assert r.iops == pytest.approx(2631.05)
    assert r.bw_bytes == 10776780
    assert r.total_ios == 26310
    assert r.lat_mean_ns == pytest.approx(6035933.8)
    assert r.lat_p99_ns == 9109504
    assert r.runtime_ms == 10000
    assert r.errors == 0


def test_parse_fio_json_mixed_weights_latency_and_skips_warnings(runner: ModuleType) -> None:
    write = {"total_ios": 100, "iops": 10.0, "bw_bytes": 40960, "runtime": 10000, "lat_ns": {"mean": 2000.0}}
    read = {"total_ios": 300, "iops": 30.0, "bw_bytes": 122880, "runtime": 10000, "lat_ns": {"mean": 1000.0}}
    text = "fio: some warning before the JSON\n" + fio_output(read=read, write=write)
    r = runner.parse_fio_json(text)
    assert r.iops == 40.0
    assert r.total_ios == 400
    assert r.lat_mean_ns == pytest.approx(1250.0)
    assert r.lat_p99_ns is None


def test_parse_fio_json_sums_jobs_and_counts_errors(runner: ModuleType) -> None:
    doc = json.loads(fio_output(read=READ, jobs=2))
    doc["jobs"][1] = {**doc["jobs"][1], "error": 5}
    r = runner.parse_fio_json(json.dumps(doc))
    assert r.total_ios == 2 * 26310
    assert r.iops == pytest.approx(2 * 2631.05)
    assert r.errors == 5


@pytest.mark.parametrize("text", ["", "fio: no output at all", '{"jobs": []}', "{broken"])
def test_parse_fio_json_rejects_garbage(runner: ModuleType, text: str) -> None:
    with pytest.raises(ValueError):
        runner.parse_fio_json(text)


def test_proc_stat_and_diskstats(runner: ModuleType) -> None:
    stat = "172 (qemu storage) da) S 166 0 0 0 -1 4194560 870 0 94 0 9 284 0 0 20 0 2 0 3001 1437077504 1483"
    assert runner.parse_proc_stat_cpu(stat) == 9 + 284
    disk = "    5270        0    42160     1000        7        0       56       10        0  "
    assert runner.parse_diskstats_ios(disk + "1000 1010 0 0 0 0 0 0") == 5277


def test_system_stat(runner: ModuleType) -> None:
    stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 123 0\nctxt 4567\nbtime 1\n"
    assert runner.parse_system_stat(stat) == (100 + 5 + 50 + 3 + 2, 4567)  # no idle, iowait


def test_fio_args(runner: ModuleType) -> None:
    w = runner.WORKLOAD_BY_NAME["randread-4k-2q-qd16x2"]
    args = w.fio_args("/dev/vdb", 10, 0.5)
    assert args[0] == "fio"
    for a in (
        "--filename=/dev/vdb",
        "--ioengine=libaio",
        "--direct=1",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=2",
        "--group_reporting",
        "--time_based",
        "--runtime=10",
        "--ramp_time=500ms",
        "--output-format=json",
    ):
        assert a in args
    assert w.queues == 2
    seq = runner.WORKLOAD_BY_NAME["write-128k-qd8"]
    assert seq.large and "--ramp_time=0" not in seq.fio_args("/dev/vda", 1, 0)


def test_daemon_command_lines_match(runner: ModuleType) -> None:
    ours = runner.our_argv("file", "py-file-2q", 2, "/tmp/x.img")
    assert ours[1:4] == ["-m", "pyvduse", "blk"]
    assert ours[ours.index("--queues") + 1] == "2" and ours[ours.index("--queue-size") + 1] == "256"
    peer = runner.qsd_argv("null", "qsd-null-2q", 2, "/tmp/x.img")
    export = peer[peer.index("--export") + 1]
    for opt in (
        "type=vduse-blk",
        "name=qsd-null-2q",
        "num-queues=2",
        "queue-size=256",
        "writable=on",
        "logical-block-size=512",
    ):
        assert opt in export.split(",")
    assert "driver=null-co" in peer[peer.index("--blockdev") + 1]


def cell(impl: str, backend: str, workload: str, iops: float, **kw: Any) -> dict[str, Any]:
    return {
        "impl": impl,
        "backend": backend,
        "workload": workload,
        "iops": iops,
        "mb_s": iops * 0.128,
        "lat_mean_us": 1e6 / iops,
        "cpu_us_per_io": 100.0,
        **kw,
    }


def test_rows_ratios_and_table(host: ModuleType) -> None:
    cells = [
        cell("pyvduse", "null", "randread-4k-qd1", 900),
        cell("qsd", "null", "randread-4k-qd1", 1800),
        cell("pyvduse", "null", "randread-4k-qd32", 4000),
        cell("qsd", "null", "randread-4k-qd32", 20000),
        cell("pyvduse", "null", "randread-4k-2q-qd16x2", 6000),
        cell("qsd", "null", "randread-4k-2q-qd16x2", 10000),
        cell("pyvduse", "file", "write-128k-qd8", 400),
        cell("qsd", "file", "write-128k-qd8", 1600),
    ]
    rows = host.build_rows(cells)
    assert [(r["backend"], r["workload"]) for r in rows] == [
        ("null", "randread-4k-qd1"),
        ("null", "randread-4k-qd32"),
        ("null", "randread-4k-2q-qd16x2"),
        ("file", "write-128k-qd8"),
    ]
    assert rows[0]["ratio"] == pytest.approx(0.5)
    assert rows[3]["unit"] == "MB/s" and rows[3]["ours"] == pytest.approx(51.2)
    (two,) = host.two_queue_ratios(rows)
    assert two["ours_ratio"] == pytest.approx(1.5) and two["peer_ratio"] == pytest.approx(0.5)

    lines = host.format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["backend", "workload"]
    assert len(lines) == 2 + len(rows)
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule align
    assert "1,111/556" in lines[2]  # iodepth 1: both latencies
    assert "0.50" in lines[2] and "900 IOPS" in lines[2] and "1,800 IOPS" in lines[2]
    assert "51.2 MB/s" in lines[5] and "204.8 MB/s" in lines[5]
    md = host.format_table(rows, markdown=True).splitlines()
    assert md[0].startswith("| backend") and md[1].startswith("|--")


def test_failed_cell_shows_dash(host: ModuleType) -> None:
    rows = host.build_rows(
        [
            cell("pyvduse", "null", "randread-4k-qd16", 100),
            {"impl": "qsd", "backend": "null", "workload": "randread-4k-qd16", "error": "fio exited 1"},
        ]
    )
    assert rows[0]["peer"] is None and rows[0]["ratio"] is None
    assert rows[0]["errors"] == ["fio exited 1"]
    assert " - " in host.format_table(rows).splitlines()[2]


def test_repeated_rounds_give_medians_and_a_paired_ratio(host: ModuleType) -> None:
    """Three rounds: figures are medians, the ratio is the median of per-round ratios (a
    slow round slows both), and the table shows the range of the rounds' ratios."""
    w = "randread-4k-qd16"
    cells = [
        cell("pyvduse", "null", w, 1200, round=0),
        cell("qsd", "null", w, 1000, round=0),
        cell("pyvduse", "null", w, 600, round=1),
        cell("qsd", "null", w, 400, round=1),
        cell("pyvduse", "null", w, 1400, round=2),
        cell("qsd", "null", w, 1300, round=2),
    ]
    (row,) = host.build_rows(cells)
    assert row["ours"] == 1200 and row["peer"] == 1000
    assert row["ratio"] == pytest.approx(1.2)  # of 1.2, 1.5 and 1.077; 1200/1000 by chance
    assert row["ratio_range"] == pytest.approx((1400 / 1300, 1.5))
    assert row["runs"] == 3 and row["our_lat_us"] == pytest.approx(1e6 / 1200)
    assert "1.20 (1.08..1.50)" in host.format_table([row]).splitlines()[2]


def test_a_failed_round_is_left_out_of_the_medians(host: ModuleType) -> None:
    w = "randwrite-4k-qd16"
    failed = {"impl": "qsd", "backend": "file", "workload": w, "error": "fio exited 1", "round": 1}
    cells = [
        cell("pyvduse", "file", w, 2000, round=0),
        cell("qsd", "file", w, 1000, round=0),
        cell("pyvduse", "file", w, 3000, round=1),
        failed,
    ]
    (row,) = host.build_rows(cells)
    assert row["peer"] == 1000 and row["ours"] == 2500
    assert row["ratio"] == pytest.approx(2.0)  # round 1 has no pair
    assert row["errors"] == ["fio exited 1"]


def test_steal_share(host: ModuleType) -> None:
    before = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    after = [200, 0, 100, 950, 0, 0, 0, 150, 0, 0]  # 400 ticks, 100 of them stolen
    assert host.steal_share(before, after) == pytest.approx(0.25)
    assert host.steal_share([], after) is None and host.steal_share(before, before) is None
    assert len(host.host_cpu_times()) >= 8
    assert "25% of the host's CPU time stolen" in host.format_notes([], {"host_steal_share": 0.25})


@pytest.mark.boots_vm
@pytest.mark.skipif(os.environ.get("PYVDUSE_IN_VM") == "1", reason="boots a VM from the host")
@pytest.mark.skipif(os.geteuid() != 0, reason="the test VM needs root")
def test_bench_quick_run(tmp_path: Path, host: ModuleType) -> None:
    """Both implementations, both backends, 1 s cells: every figure there and positive."""
    out = tmp_path / "bench.json"
    workloads = [
        "randread-4k-qd1",
        "randwrite-4k-qd16",
        "read-128k-qd8",
        "randread-4k-qd32",
        "randread-4k-2q-qd16x2",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "fio_vs_qsd.py"),
            "--quick",
            "--workloads",
            ",".join(workloads),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["backend"], r["workload"]): r for r in report["rows"]}
    assert set(rows) == {(b, w) for b in ("null", "file") for w in workloads}
    for key, r in rows.items():
        assert not r["errors"], key
        for field in ("ours", "peer", "ratio", "our_cpu_us_per_io", "peer_cpu_us_per_io"):
            assert r[field] is not None and r[field] > 0, (key, field, r[field])
        if r["iodepth"] == 1:
            assert r["our_lat_us"] > 0 and r["peer_lat_us"] > 0
    assert len(report["two_queue_vs_one"]) == 2
    assert all(t["ours_ratio"] > 0 for t in report["two_queue_vs_one"])
    info = report["info"]
    assert info["seconds_per_cell"] == 1 and info["guest"]["guest_kernel"].startswith("6.12")
    assert info["host_cpu"] and info["pyvduse_commit"]
    assert 0 <= info["host_steal_share"] <= 1
    table = proc.stdout
    assert "our CPU µs/IO" in table
    for b, w in rows:
        assert any(line.split()[:2] == [b, w] for line in table.splitlines())


def test_ring_engine_bench_runs(tmp_path: Path) -> None:
    """bench/ring_engine.py on a tiny budget: every engine, kind and batch gives a rate, and
    so do the queues served in parallel."""
    from pyvduse.fastpath import engine as native

    out = tmp_path / "ring.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "ring_engine.py"), "--seconds", "0.05", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["batches"]
    assert [(r["requests"], r["batch"]) for r in rows] == [
        (k, b) for k in ("null", "4k-copy") for b in (1, 32, 256)
    ]
    engines = ["python"] + (["native"] if native.available() else [])
    assert all(r[f"{e}_req_per_s"] > 0 for r in rows for e in engines)
    parallel = report["parallel"]
    assert [(r["requests"], r["engine"]) for r in parallel] == [
        (k, e) for k in ("null", "4k-copy") for e in engines
    ]
    assert all(r["queues"] >= 2 and r["req_per_s"] > 0 and r["one_queue_req_per_s"] > 0 for r in parallel)


# --------------------------------------------------------------------------- bench/slow_disk.py


@pytest.fixture(scope="module")
def slow(host: ModuleType) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("slow_disk")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def slow_guest(slow: ModuleType) -> ModuleType:
    return sys.modules["slow_disk_guest"]


def slow_cell(mode: str, workload: str, iops: float, round: int = 0, **kw: Any) -> dict[str, Any]:
    impl = "raw" if mode == "raw" else ("qsd" if mode.startswith("qsd") else "pyvduse")
    rw, _, qd = workload.split("-")
    cell = {
        "impl": impl,
        "mode": mode,
        "workload": workload,
        "rw": rw,
        "iodepth": int(qd[2:]),
        "iops": iops,
        "lat_mean_us": 1e6 / iops * int(qd[2:]),
        "guest_cpu_us_per_io": 80.0,
        "round": round,
        "cpu_us_per_io": None if impl == "raw" else 40.0,
        "depth_mean": float(qd[2:]) if impl == "pyvduse" else None,
    }
    cell.update(kw)
    return cell


def failed_cell(mode: str, workload: str, round: int = 0) -> dict[str, Any]:
    c = {
        k: v
        for k, v in slow_cell(mode, workload, 1, round).items()
        if k in ("impl", "mode", "workload", "rw", "iodepth", "round")
    }
    c["error"] = (
        "fio exited 1: fio: io_u error on file /dev/vdg: Input/output error: "
        "read offset=15393607680, buflen=4096"
    )
    return c


def slow_matrix() -> list[dict[str, Any]]:
    """A full matrix: the raw device 4k/26k/27k (qd1/16/64), ours best with io_uring at
    qd16 reads (24k: 0.92x the device, 8x its own 3k at qd1), writes falling short."""
    figures = {  # mode: (qd1, qd16, qd64) randread, then randwrite
        "raw": ((4000, 26000, 27000), (4000, 26000, 27000)),
        "qsd-threads": ((1800, 1300, 1500), (1700, 1200, 1400)),
        "qsd-io_uring": ((2000, 2600, 2800), (1900, 2500, 2700)),
        "py-defaults": ((2600, 15600, 16000), (2500, 15000, 15500)),
        "py-io_uring": ((3000, 24000, 25000), (3000, 18000, 20000)),
        "py-io_uring-direct": ((2800, 20000, 22000), (2900, 19000, 21000)),
        "py-threads": ((1500, 9000, 9500), (1400, 8000, 9000)),
        "py-sync": ((3100, 3300, 3300), (3000, 3100, 3100)),
    }
    cells = []
    for rw_i, rw in enumerate(("randread", "randwrite")):
        for d_i, qd in enumerate((1, 16, 64)):
            w = f"{rw}-4k-qd{qd}"
            for mode, fig in figures.items():
                cells.append(slow_cell(mode, w, fig[rw_i][d_i]))
            cells.append(failed_cell("qsd-native-direct", w))
    return cells


def test_slow_disk_rows_summary_and_targets(slow: ModuleType) -> None:
    cells = slow_matrix()
    report = slow.build_report({"cells": cells}, {"seconds_per_cell": 4, "repeat": 1})
    rows = report["rows"]
    measured = [m.name for m in slow.MODES if any(c["mode"] == m.name for c in cells)]
    assert len(rows) == 6 * len(measured)  # every workload x mode, failed ones included
    assert [r["mode"] for r in rows[: len(measured)]] == measured
    by = {(r["workload"], r["mode"]): r for r in rows}
    r = by[("randread-4k-qd16", "py-io_uring")]
    assert r["vs_raw"] == pytest.approx(24000 / 26000)
    assert r["vs_qd1"] == pytest.approx(8.0)
    assert by[("randread-4k-qd1", "py-io_uring")]["vs_qd1"] is None
    assert by[("randread-4k-qd16", "raw")]["vs_raw"] is None
    native = by[("randread-4k-qd16", "qsd-native-direct")]
    assert native["iops"] is None and native["errors"] and native["expected_failure"]
    assert slow.unexpected_failures(rows) == []

    summary = {s["workload"]: s for s in report["summary"]}
    s = summary["randread-4k-qd16"]
    assert (s["our_mode"], s["peer_mode"]) == ("py-io_uring", "qsd-io_uring")
    assert s["ours"] == 24000 and s["peer"] == 2600 and s["raw"] == 26000
    assert s["ours_vs_peer"] == pytest.approx(24000 / 2600)
    assert s["ours_vs_qd1"] == pytest.approx(8.0)
    w = summary["randwrite-4k-qd16"]
    assert w["our_mode"] == "py-io_uring-direct" and w["ours_vs_qd1"] == pytest.approx(19000 / 2900)
    assert summary["randread-4k-qd1"]["our_mode"] == "py-sync"  # the best at qd1

    targets = {(t["target"], t["rw"]): t for t in report["targets"]}
    assert targets[("vs_raw", "randread")]["met"] is True  # 0.92x >= 0.8x
    assert targets[("vs_raw", "randwrite")]["met"] is False  # 19k/26k = 0.73x
    assert targets[("vs_peer", "randwrite")]["met"] is True
    assert targets[("scaling", "randread")]["met"] is True  # exactly 8x is met
    assert targets[("scaling", "randwrite")]["met"] is False  # 6.55x
    # issue 30's targets for the row of no options, at iodepth 1 and 16
    defaults = {(t["rw"], t["iodepth"]): t for t in report["targets"] if t["target"] == "defaults_vs_raw"}
    assert defaults[("randread", 1)]["value"] == pytest.approx(2600 / 4000)
    assert defaults[("randread", 1)]["met"] is True and defaults[("randread", 1)]["mode"] == "py-defaults"
    assert defaults[("randread", 16)]["value"] == pytest.approx(0.6) and defaults[("randread", 16)]["met"]
    assert defaults[("randwrite", 1)]["met"] is True  # 0.625x
    assert defaults[("randwrite", 16)]["met"] is True  # 15,000/26,000 = 0.58x
    assert s["defaults"] == 15600 and s["defaults_vs_raw"] == pytest.approx(0.6)

    text = slow.report_text(report)
    cells_table, summary_table, targets_table = text.split("\n\n")[:3]
    lines = cells_table.splitlines()
    assert len(lines) == 2 + len(rows) and len(lines[1]) == max(len(x) for x in lines)
    native_line = next(x for x in lines if "randread-4k-qd16" in x and "qsd-native-direct" in x)
    assert "failed: fio: Input/output error (expected)" in native_line
    assert " - " in native_line
    io_line = next(x for x in lines if x.split()[:2] == ["randread-4k-qd16", "py-io_uring"])
    assert "24,000" in io_line and "0.92x" in io_line and "8.00x" in io_line
    assert "24,000 (py-io_uring)" in summary_table and "2,600 (qsd-io_uring)" in summary_table
    qd1 = next(x for x in summary_table.splitlines() if x.startswith("randread-4k-qd1 "))
    assert "323/500/250" in qd1  # ours (py-sync), the peer's and the device's mean latency
    t = targets_table.splitlines()
    assert "0.92x (py-io_uring) met" in t[2] and "0.73x (py-io_uring-direct) not met" in t[2]
    assert "8.00x (py-io_uring) met" in t[4]
    assert "0.65x (py-defaults) met" in t[5] and "0.60x (py-defaults) met" in t[6]
    qd16 = next(x for x in summary_table.splitlines() if x.startswith("randread-4k-qd16 "))
    assert qd16.split()[1:3] == ["15,600", "0.60x"]  # the defaults' columns come first
    md = slow.report_text(report, markdown=True).split("\n\n")
    assert all(part.startswith("| ") for part in md[:3])


def test_slow_disk_unexpected_failure_and_missing_cells(slow: ModuleType) -> None:
    cells = [
        slow_cell("raw", "randread-4k-qd1", 4000),
        slow_cell("raw", "randread-4k-qd16", 26000),
        slow_cell("py-io_uring", "randread-4k-qd1", 3000),
        failed_cell("py-io_uring", "randread-4k-qd16"),
        slow_cell("py-threads", "randread-4k-qd16", 9000),
        slow_cell("qsd-threads", "randread-4k-qd16", 1000),
    ]
    report = slow.build_report({"cells": cells}, {})
    (bad,) = slow.unexpected_failures(report["rows"])
    assert (bad["workload"], bad["mode"]) == ("randread-4k-qd16", "py-io_uring")
    s = next(x for x in report["summary"] if x["workload"] == "randread-4k-qd16")
    assert s["our_mode"] == "py-threads" and s["ours_vs_qd1"] is None  # no qd1 of threads
    targets = {(t["target"], t["rw"]): t for t in report["targets"]}
    assert targets[("scaling", "randread")]["met"] is None
    assert targets[("vs_peer", "randread")]["met"] is True
    assert all(targets[(k, "randwrite")]["met"] is None for k in ("vs_raw", "vs_peer", "scaling"))
    text = slow.report_text(report)
    assert "failed: fio: Input/output error" in text and "(expected)" not in text
    assert "- not measured" in text


def test_slow_disk_rounds_pair_with_the_raw_device(slow: ModuleType) -> None:
    w = "randread-4k-qd16"
    cells = [
        slow_cell("raw", w, 20000, 0),
        slow_cell("py-io_uring", w, 18000, 0),
        slow_cell("raw", w, 10000, 1),
        slow_cell("py-io_uring", w, 9000, 1),
        slow_cell("raw", w, 30000, 2),
        failed_cell("py-io_uring", w, 2),
    ]
    (raw, ours) = slow.mode_rows(cells)
    assert raw["iops"] == 20000 and ours["iops"] == pytest.approx(13500)
    assert ours["vs_raw"] == pytest.approx(0.9)  # both paired rounds: 0.9; medians: 0.675
    assert ours["runs"] == 2 and len(ours["errors"]) == 1
    assert "1 round(s) failed" in slow.format_cells([raw, ours]).splitlines()[3]


def test_slow_disk_short_error(slow: ModuleType) -> None:
    assert (
        slow.short_error(
            "fio exited 1: fio: io_u error on file /dev/vdb: Bad address: write offset=0, buflen=4096"
        )
        == "fio: Bad address"
    )
    assert (
        slow.short_error("did not start: timed out after 60 s waiting\nmore")
        == "did not start: timed out after 60 s waiting"
    )


def test_slow_disk_guest_commands_and_stats(slow_guest: ModuleType) -> None:
    modes = slow_guest.MODE_BY_NAME
    attrs = slow_guest.nullb_attrs(16384, 250)
    assert attrs["irqmode"] == 2 and attrs["completion_nsec"] == 250000
    assert attrs["hw_queue_depth"] == 256 and attrs["memory_backed"] == 0
    assert "power" not in attrs and "irqmode" not in slow_guest.nullb_attrs(64, 0)
    peer = slow_guest.qsd_argv(modes["qsd-native-direct"], "/dev/nullb0", "sd3")
    node = peer[peer.index("--blockdev") + 1].split(",")
    for opt in ("driver=host_device", "filename=/dev/nullb0", "aio=native", "cache.direct=on", "locking=off"):
        assert opt in node
    export = peer[peer.index("--export") + 1].split(",")
    for opt in (
        "type=vduse-blk",
        "name=sd-qsd-native-direct",
        "num-queues=1",
        "queue-size=256",
        "writable=on",
    ):
        assert opt in export
    ours = slow_guest.our_argv(modes["py-io_uring-direct"], "/dev/nullb0", "sd5")
    assert ours[1:4] == ["-m", "pyvduse", "blk"]
    assert ours[ours.index("--file") + 1] == "/dev/nullb0"
    assert ours[ours.index("--queue-size") + 1] == "256" and ours[ours.index("--queues") + 1] == "1"
    assert ours[-4:] == ["--aio", "io_uring", "--cache", "none"]
    assert all(len(slow_guest.device_name(m)) <= 32 for m in slow_guest.MODES)
    assert set(slow_guest.QUICK_MODES) <= set(modes)
    assert not any(modes[m].expect_failure for m in slow_guest.QUICK_MODES)

    def stats(count: int, total: int, hist: list[list[int]], lat_n: int, lat_us: float) -> Any:
        return {
            "total": {
                "depth": {"count": count, "sum": total, "buckets": hist},
                "latency": {"count": lat_n, "sum_us": lat_us},
            }
        }

    delta = slow_guest.stats_delta(
        stats(10, 10, [[2, 10]], 10, 3000.0), stats(110, 1610, [[2, 10], [16, 40], [32, 60]], 110, 53000.0)
    )
    assert delta["depth_mean"] == pytest.approx(16.0)
    assert delta["depth_hist"] == {"16": 40, "32": 60}
    assert delta["daemon_lat_us"] == pytest.approx(500.0)
    assert slow_guest.stats_delta(stats(5, 5, [], 5, 1.0), stats(5, 5, [], 5, 1.0))["depth_mean"] is None


def test_slow_disk_host_watch(slow: ModuleType) -> None:
    """Other VMs and other processes' share of the host's CPU over the run."""
    samples = [(0, 1000, 4000, 100), (1, 1500, 5000, 300), (0, 2000, 6000, 500)]
    h = slow.summarize_host(samples)
    assert h["max"] == 1 and h["share_with_others"] == pytest.approx(1 / 3)
    assert h["others_cpu_share"] == pytest.approx((1000 - 400) / 2000)
    assert "Another VM ran on the host in 33% of the samples" in slow._others_note(h)
    quiet = slow.summarize_host([(0, 0, 100, 0), (0, 50, 200, 45)])
    assert slow._others_note(quiet) == (
        "No other VM ran on the host during the run; 5% of the "
        "host's CPU time went to processes other than this run's VM."
    )
    assert slow.summarize_host([])["share_with_others"] is None
    qemus, busy, total, ours = slow.host_sample()
    assert total >= busy > 0 and qemus >= 0 and ours >= 0


@pytest.mark.boots_vm
@pytest.mark.skipif(os.environ.get("PYVDUSE_IN_VM") == "1", reason="boots a VM from the host")
@pytest.mark.skipif(os.geteuid() != 0, reason="the test VM needs root")
def test_slow_disk_quick_run(tmp_path: Path, slow: ModuleType, slow_guest: ModuleType) -> None:
    """The slow-disk benchmark's smoke form: every quick cell there, with positive figures,
    and each of our daemons running the engine and aio its mode asks for."""
    out = tmp_path / "slow.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "slow_disk.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["workload"], r["mode"]): r for r in report["rows"]}
    expected = {(w, m) for w in slow_guest.QUICK_WORKLOADS for m in slow_guest.QUICK_MODES}
    assert set(rows) == expected
    for key, r in rows.items():
        if r["expected_failure"]:
            continue
        assert not r["errors"], (key, r["errors"])
        for field in ("iops", "lat_mean_us", "guest_cpu_us_per_io"):
            assert r[field] is not None and r[field] > 0, (key, field)
        if r["impl"] != "raw":
            assert r["vs_raw"] > 0 and r["cpu_us_per_io"] > 0, key
        if r["impl"] == "pyvduse":
            assert r["depth_mean"] >= 1, key
        if r["iodepth"] > 1:
            assert r["vs_qd1"] > 0, key
    (s16,) = [s for s in report["summary"] if s["workload"] == "randread-4k-qd16"]
    assert s16["ours_vs_raw"] > 0 and s16["ours_vs_peer"] > 0 and s16["ours_vs_qd1"] > 0
    targets = [t for t in report["targets"] if t["rw"] == "randread"]
    # every target of the table (issue 16's three, issue 30's two for the defaults), measured
    assert len(targets) == len(slow.TARGETS) and all(t["met"] in (True, False) for t in targets)
    assert {t["mode"] for t in targets if t["target"] == "defaults_vs_raw"} == {"py-defaults"}
    engines = {d["mode"]: d["status"]["queues"] for d in report["info"]["devices"] if d["impl"] == "pyvduse"}
    assert engines["py-io_uring"] == [{"engine": "native", "aio": "io_uring"}]
    assert engines["py-threads"] == [{"engine": "python", "aio": "threads"}]
    info = report["info"]
    assert info["seconds_per_cell"] == 1 and info["guest"]["guest_kernel"].startswith("6.12")
    assert info["nullb"]["completion_nsec"] == "250000" and info["pyvduse_commit"]
    assert info["host_cpu"] and info["guest"]["qsd_version"] and info["guest"]["fio_version"]
    assert "met" in proc.stdout and "pyvduse best" in proc.stdout


# --------------------------------------------------------------------------- bench/nbd.py


@pytest.fixture(scope="module")
def nbd_bench(slow: ModuleType) -> ModuleType:
    """bench/nbd.py, under another name: ``nbd`` is libnbd's module."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_nbd", BENCH / "nbd.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def nbd_cell(impl: str, server: str, workload: str, figure: float, **kw: Any) -> dict[str, Any]:
    rw, bs, qd = workload.split("-")
    cell = {
        "impl": impl,
        "server": server,
        "workload": workload,
        "rw": rw,
        "bs": bs,
        "iodepth": int(qd[2:]),
        "iops": figure,
        "mb_s": figure * 4096 / 1e6,
        "lat_mean_us": 1e6 / figure * int(qd[2:]),
        "cpu_us_per_io": 50.0,
        "server_cpu_us_per_io": 30.0,
        "round": 0,
    }
    if impl in ("pyvduse", "py-defaults"):
        cell["depth_mean"] = float(qd[2:])
    cell.update(kw)
    return cell


def test_nbd_rows_limits_and_targets(nbd_bench: ModuleType) -> None:
    cells = []
    for server in ("plain", "delay-1ms"):
        for w, defaults, ours, peer, kernel in (
            ("randread-4k-qd1", 500, 900, 600, 700),
            ("randread-4k-qd16", 7000, 13000, 7000, 14000),
            ("randwrite-4k-qd16", 8000, 9000, 10000, 12000),
        ):
            if server == "plain":
                defaults, ours, peer, kernel = defaults * 2, ours * 2, peer * 2, kernel * 2
            cells += [
                nbd_cell("py-defaults", server, w, defaults),
                nbd_cell("pyvduse", server, w, ours),
                nbd_cell("qsd", server, w, peer),
                nbd_cell("kernel", server, w, kernel, cpu_us_per_io=None),
            ]
    rows = nbd_bench.build_rows(cells)
    by = {(r["server"], r["workload"]): r for r in rows}
    assert len(rows) == 6
    r = by[("delay-1ms", "randread-4k-qd16")]
    assert r["limit"] == 16000 and r["ours_vs_limit"] == pytest.approx(13000 / 16000)
    assert r["defaults_vs_limit"] == pytest.approx(7000 / 16000)
    assert r["ratio"] == pytest.approx(13000 / 7000) and by[("plain", "randread-4k-qd1")]["limit"] is None
    assert r["defaults"] == 7000 and r["kernel"] == 14000
    assert r["defaults_vs_peer"] == pytest.approx(1.0) and r["defaults_vs_kernel"] == pytest.approx(0.5)
    assert r["defaults_depth"] == 16 and r["our_cpu_us_per_io"] == 50
    assert by[("plain", "randread-4k-qd1")]["kernel_lat_us"] == pytest.approx(1e6 / 1400)
    targets = {t["target"]: t for t in nbd_bench.evaluate_targets(rows)}
    # issue 30's, for the defaults, on both servers
    for server in ("plain", "delay-1ms"):
        assert targets[f"defaults_vs_peer_{server}_randread_qd1"]["met"] is False  # 0.83x
        assert targets[f"defaults_vs_peer_{server}_randread_qd16"]["met"] is True  # 1.0x
        assert targets[f"defaults_vs_kernel_{server}_randread_qd16"]["met"] is False  # 0.5x
        assert targets[f"defaults_vs_peer_{server}_randwrite_qd16"]["met"] is False  # 0.8x
        assert targets[f"defaults_vs_kernel_{server}_randwrite_qd16"]["met"] is True  # 0.67x
        assert targets[f"defaults_vs_peer_{server}_randwrite_qd1"]["met"] is None  # not run
    assert targets["defaults_vs_kernel_delay-1ms_randread_qd16"]["value"] == "0.50x (7,000 IOPS)"
    # issue 17's, for the options spelled out
    assert targets["vs_peer"]["met"] is False
    assert targets["vs_peer"]["below"] == [
        "plain randwrite-4k-qd16 0.90x",
        "delay-1ms randwrite-4k-qd16 0.90x",
    ]
    assert targets["limit_randread"]["met"] is True and targets["limit_randwrite"]["met"] is False
    text = nbd_bench.report_text({"rows": rows, "targets": list(targets.values()), "info": {"guest": {}}})
    assert "16,000" in text and "1.86x" in text and "not met" in text and "not measured" in text
    assert "defaults/kernel" in text and "0.50x" in text
    assert "delay-1ms randread iodepth 16: defaults >= 0.6x the kernel's NBD client" in text
    failed = nbd_bench.build_rows([nbd_cell("pyvduse", "plain", "randread-4k-qd1", 1, error="fio exited 1")])
    assert failed[0]["ours"] is None and failed[0]["errors"] == ["fio exited 1"]
    assert failed[0]["defaults"] is None and failed[0]["defaults_vs_peer"] is None


@pytest.mark.boots_vm
@pytest.mark.skipif(os.environ.get("PYVDUSE_IN_VM") == "1", reason="boots a VM from the host")
@pytest.mark.skipif(os.geteuid() != 0, reason="the test VM needs root")
def test_nbd_bench_quick_run(tmp_path: Path, nbd_bench: ModuleType) -> None:
    """The NBD benchmark's smoke form: our defaults, ours with options, qemu-storage-daemon
    and the kernel's NBD client on both servers, every figure there, our queues on the native
    loop, issue 30's targets judged."""
    out = tmp_path / "nbd.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "nbd.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["server"], r["workload"]): r for r in report["rows"]}
    quick = sys.modules["nbd_guest"].QUICK_WORKLOADS
    assert set(rows) == {(s, w) for s in ("plain", "delay-1ms") for w in quick}
    for key, r in rows.items():
        assert not r["errors"], key
        for field in ("defaults", "ours", "peer", "kernel", "ratio", "defaults_vs_peer", "defaults_vs_kernel",
                      "defaults_cpu_us_per_io", "our_cpu_us_per_io", "peer_cpu_us_per_io"):  # fmt: skip
            assert r[field] is not None and r[field] > 0, (key, field)
    devices = report["info"]["devices"]
    ours = [d for d in devices if d["impl"] in ("pyvduse", "py-defaults")]
    assert len(ours) == 4 and all(d["engines"] == ["native"] for d in ours), ours
    (defaults,) = [d for d in ours if d["impl"] == "py-defaults" and d["server"] == "plain"]
    assert defaults["command"].split(" -m pyvduse ")[1] == (
        "blk --name pyd-nbd-plain --nbd 'nbd+unix:///?socket=/tmp/nbd-bench/plain.sock'"
    )
    kernel = [d for d in devices if d["impl"] == "kernel"]
    assert sorted(d["dev"] for d in kernel) == ["/dev/nbd0", "/dev/nbd1"], kernel
    targets = {t["target"]: t for t in report["targets"]}
    for server in ("plain", "delay-1ms"):
        for name in (
            f"defaults_vs_peer_{server}_randread_qd1",
            f"defaults_vs_peer_{server}_randread_qd16",
            f"defaults_vs_kernel_{server}_randread_qd16",
            f"defaults_vs_kernel_{server}_randwrite_qd16",
        ):
            assert targets[name]["met"] in (True, False), name
    assert "defaults/kernel" in proc.stdout


# --------------------------------------------------------------------------- bench/rbd.py


@pytest.fixture(scope="module")
def rbd_bench(slow: ModuleType) -> ModuleType:
    """bench/rbd.py, under another name: ``rbd`` is Ceph's Python module."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_rbd", BENCH / "rbd.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_rbd_rows_ratios_and_targets(rbd_bench: ModuleType) -> None:
    cells = []
    for w, ours, peer, krbd in (
        ("randread-4k-qd1", 900, 600, 1000),
        ("randread-4k-qd16", 8000, 7000, 9000),
        ("randwrite-4k-qd16", 4000, 5000, 6000),
    ):
        for impl, figure in (("pyvduse", ours), ("qsd", peer), ("krbd", krbd)):
            cell = nbd_cell(impl, "rbd", w, figure, osd_cpu_us_per_io=20.0)
            if impl == "krbd":
                cell["cpu_us_per_io"] = None
            cells.append(cell)
    rows = rbd_bench.build_rows(cells)
    by = {r["workload"]: r for r in rows}
    assert len(rows) == 3
    r = by["randread-4k-qd16"]
    assert r["ratio"] == pytest.approx(8000 / 7000) and r["ours_vs_krbd"] == pytest.approx(8000 / 9000)
    assert r["krbd"] == 9000 and r["osd_cpu"] == {"pyvduse": 20.0, "qsd": 20.0, "krbd": 20.0}
    targets = {t["target"]: t for t in rbd_bench.evaluate_targets(rows)}
    assert targets["vs_qsd"]["met"] is False and targets["vs_qsd"]["below"] == ["randwrite-4k-qd16 0.80x"]
    assert targets["krbd_randread"]["met"] is True and targets["krbd_randwrite"]["met"] is False
    text = rbd_bench.report_text({"rows": rows, "targets": list(targets.values()), "info": {"guest": {}}})
    assert "9,000 IOPS" in text and "1.14x" in text and "not met" in text and "ours/krbd" in text
    failed = rbd_bench.build_rows([nbd_cell("krbd", "rbd", "randread-4k-qd1", 1, error="fio exited 1")])
    assert failed[0]["krbd"] is None and failed[0]["errors"] == ["krbd: fio exited 1"]
