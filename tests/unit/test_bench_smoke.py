"""bench/fio_vs_qsd.py: fio JSON parsing and the table without a VM, plus one tiny real run."""

from __future__ import annotations

import importlib
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


def fio_output(read: dict[str, Any] | None = None, write: dict[str, Any] | None = None,
               jobs: int = 1) -> str:
    """A trimmed fio 3.x --output-format=json document."""
    empty = {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "runtime": 0,
             "lat_ns": {"mean": 0.0}, "clat_ns": {"mean": 0.0}}
    job = {"jobname": "x", "error": 0, "read": {**empty, **(read or {})},
           "write": {**empty, **(write or {})}, "trim": dict(empty)}
    return json.dumps({"fio version": "fio-3.33", "jobs": [job] * jobs})


READ = {"total_ios": 26310, "iops": 2631.05, "bw_bytes": 10776780, "runtime": 10000,
        "lat_ns": {"mean": 6035933.8}, "clat_ns": {"mean": 6000000.0,
                                                    "percentile": {"99.000000": 9109504}}}


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
    write = {"total_ios": 100, "iops": 10.0, "bw_bytes": 40960, "runtime": 10000,
             "lat_ns": {"mean": 2000.0}}
    read = {"total_ios": 300, "iops": 30.0, "bw_bytes": 122880, "runtime": 10000,
            "lat_ns": {"mean": 1000.0}}
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
    stat = ("172 (qemu storage) da) S 166 0 0 0 -1 4194560 870 0 94 0 9 284 0 0 20 0 2 0 3001 "
            "1437077504 1483")
    assert runner.parse_proc_stat_cpu(stat) == 9 + 284
    disk = "    5270        0    42160     1000        7        0       56       10        0  "
    assert runner.parse_diskstats_ios(disk + "1000 1010 0 0 0 0 0 0") == 5277


def test_system_stat(runner: ModuleType) -> None:
    stat = ("cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n"
            "intr 123 0\nctxt 4567\nbtime 1\n")
    assert runner.parse_system_stat(stat) == (100 + 5 + 50 + 3 + 2, 4567)  # no idle, iowait


def test_fio_args(runner: ModuleType) -> None:
    w = runner.WORKLOAD_BY_NAME["randread-4k-2q-qd16x2"]
    args = w.fio_args("/dev/vdb", 10, 0.5)
    assert args[0] == "fio"
    for a in ("--filename=/dev/vdb", "--ioengine=libaio", "--direct=1", "--rw=randread",
              "--bs=4k", "--iodepth=16", "--numjobs=2", "--group_reporting", "--time_based",
              "--runtime=10", "--ramp_time=500ms", "--output-format=json"):
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
    for opt in ("type=vduse-blk", "name=qsd-null-2q", "num-queues=2", "queue-size=256",
                "writable=on", "logical-block-size=512"):
        assert opt in export.split(",")
    assert "driver=null-co" in peer[peer.index("--blockdev") + 1]


def cell(impl: str, backend: str, workload: str, iops: float, **kw: Any) -> dict[str, Any]:
    return {"impl": impl, "backend": backend, "workload": workload, "iops": iops,
            "mb_s": iops * 0.128, "lat_mean_us": 1e6 / iops, "cpu_us_per_io": 100.0, **kw}


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
        ("null", "randread-4k-qd1"), ("null", "randread-4k-qd32"),
        ("null", "randread-4k-2q-qd16x2"), ("file", "write-128k-qd8")]
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
    rows = host.build_rows([cell("pyvduse", "null", "randread-4k-qd16", 100),
                            {"impl": "qsd", "backend": "null", "workload": "randread-4k-qd16",
                             "error": "fio exited 1"}])
    assert rows[0]["peer"] is None and rows[0]["ratio"] is None
    assert rows[0]["errors"] == ["fio exited 1"]
    assert " - " in host.format_table(rows).splitlines()[2]


def test_repeated_rounds_give_medians_and_a_paired_ratio(host: ModuleType) -> None:
    """Three rounds: figures are medians, the ratio is the median of per-round ratios (a
    slow round slows both), and the table shows the range of the rounds' ratios."""
    w = "randread-4k-qd16"
    cells = [
        cell("pyvduse", "null", w, 1200, round=0), cell("qsd", "null", w, 1000, round=0),
        cell("pyvduse", "null", w, 600, round=1), cell("qsd", "null", w, 400, round=1),
        cell("pyvduse", "null", w, 1400, round=2), cell("qsd", "null", w, 1300, round=2),
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
    cells = [cell("pyvduse", "file", w, 2000, round=0), cell("qsd", "file", w, 1000, round=0),
             cell("pyvduse", "file", w, 3000, round=1), failed]
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
    workloads = ["randread-4k-qd1", "randwrite-4k-qd16", "read-128k-qd8", "randread-4k-qd32",
                 "randread-4k-2q-qd16x2"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "fio_vs_qsd.py"), "--quick", "--workloads", ",".join(workloads),
         "--json", str(out)],
        capture_output=True, text=True, timeout=1200, check=False,
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
    proc = subprocess.run([sys.executable, str(BENCH / "ring_engine.py"), "--seconds", "0.05",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          check=False, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["batches"]
    assert [(r["requests"], r["batch"]) for r in rows] == [
        (k, b) for k in ("null", "4k-copy") for b in (1, 32, 256)]
    engines = ["python"] + (["native"] if native.available() else [])
    assert all(r[f"{e}_req_per_s"] > 0 for r in rows for e in engines)
    parallel = report["parallel"]
    assert [(r["requests"], r["engine"]) for r in parallel] == [
        (k, e) for k in ("null", "4k-copy") for e in engines]
    assert all(r["queues"] >= 2 and r["req_per_s"] > 0 and r["one_queue_req_per_s"] > 0
               for r in parallel)
