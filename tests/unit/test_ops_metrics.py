"""Prometheus metrics scraped over loopback: the same counters as ``stats``."""

from __future__ import annotations

import builtins
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pyvduse.errors import ConfigError, MissingDependency
from pyvduse.ops import metrics
from pyvduse.ops.client import request
from tests.unit.test_ops_socket import served, short_dir

sock_dir = pytest.fixture(name="sock_dir")(short_dir)

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError((sample, labels))


def test_scrape_matches_stats(sock_dir: Path) -> None:
    with served(sock_dir, metrics="127.0.0.1:0") as (_rig, drv, ops, _):
        assert drv is not None
        address = ops.target.metrics_address
        assert address is not None and address.startswith("127.0.0.1:")
        for i in range(6):
            drv.write(i * 4096, b"m" * 4096, queue=0)
        drv.read(0, 16384, queue=1)
        with pytest.raises(OSError):
            drv.read(1 << 40, 512, queue=1)
        stats = request(ops.control_path, {"cmd": "stats"})["result"]
        fams = scrape(address)
        q0, q1 = stats["queues"]
        assert (
            value(fams, "pyvduse_requests", "pyvduse_requests_total", device="t0", queue="0", type="write")
            == q0["requests"]["write"]
            == 6
        )
        assert (
            value(fams, "pyvduse_written_bytes", "pyvduse_written_bytes_total", queue="0")
            == q0["bytes_written"]
            == 6 * 4096
        )
        assert (
            value(fams, "pyvduse_read_bytes", "pyvduse_read_bytes_total", queue="1")
            == q1["bytes_read"]
            == 16384
        )
        assert (
            value(fams, "pyvduse_request_errors", "pyvduse_request_errors_total", queue="1")
            == q1["errors"]
            == 1
        )
        assert value(fams, "pyvduse_requests_in_flight", "pyvduse_requests_in_flight", queue="0") == 0
        assert value(fams, "pyvduse_capacity_bytes", "pyvduse_capacity_bytes") == 8 << 20
        hist = "pyvduse_request_duration_seconds"
        assert value(fams, hist, hist + "_count", queue="0") == q0["latency"]["count"] == 6
        assert value(fams, hist, hist + "_bucket", queue="0", le="+Inf") == 6
        assert value(fams, hist, hist + "_sum", queue="0") == pytest.approx(q0["latency"]["sum_us"] / 1e6)
        bounds = [
            s.labels["le"]
            for s in fams[hist].samples
            if s.name == hist + "_bucket" and s.labels["queue"] == "0"
        ]
        assert bounds[0] == "1e-06" and bounds[-1] == "+Inf"
        counts = [
            s.value for s in fams[hist].samples if s.name == hist + "_bucket" and s.labels["queue"] == "0"
        ]
        assert counts == sorted(counts)  # cumulative
        depth = "pyvduse_queue_depth"  # sequential requests: each taken alone
        assert value(fams, depth, depth + "_bucket", queue="0", le="1") == 6
        assert value(fams, depth, depth + "_count", queue="0") == q0["depth"]["count"] == 6
        assert value(fams, depth, depth + "_bucket", queue="0", le="+Inf") == 6
        drv.write(0, b"n" * 512, queue=0)  # read at scrape time: the next scrape sees it
        assert (
            value(scrape(address), "pyvduse_requests", "pyvduse_requests_total", queue="0", type="write") == 7
        )
    with pytest.raises(OSError):
        scrape(address)  # closed with the daemon


def test_port_in_use_is_one_line(sock_dir: Path) -> None:
    with served(sock_dir, metrics="127.0.0.1:0") as (_rig, _drv, ops, _):
        taken = ops.target.metrics_address
        assert taken is not None
        sub = sock_dir / "other"
        sub.mkdir()
        with (
            pytest.raises(ConfigError, match=r"cannot serve metrics on 127\.0\.0\.1"),
            served(sub, metrics=taken),
        ):
            pass
        assert not (sub / "t0.sock").exists()  # nothing left behind


def test_parse_address() -> None:
    assert metrics.parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert metrics.parse_address("[::1]:9100") == ("::1", 9100)
    assert metrics.parse_address(":9100") == ("0.0.0.0", 9100)
    for bad in ("127.0.0.1", "127.0.0.1:http", "::1:9100", "x:70000"):
        with pytest.raises(ConfigError, match=r"ADDR:PORT|brackets"):
            metrics.parse_address(bad)


def test_missing_prometheus_client_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_prometheus(name: str, *args: Any, **kw: Any) -> Any:
        if name.startswith("prometheus_client"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(MissingDependency, match=r"pip install 'pyvduse\[metrics\]'"):
        metrics.require_client()


def test_blk_checks_ops_options_before_anything() -> None:
    def one_line(*args: str) -> str:
        p = subprocess.run(
            [sys.executable, "-m", "pyvduse", "blk", "--name", "x", "--null", "1M", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        return lines[0]

    assert "ADDR:PORT" in one_line("--metrics", "9100")
    assert "--drain-timeout" in one_line("--drain-timeout", "-1")
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['prometheus_client'] = None\n"
            "from pyvduse.cli.main import main\n"
            "sys.exit(main(['blk', '--name', 'x', '--null', '1M', "
            "'--metrics', '127.0.0.1:9100']))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["pyvduse: error: --metrics: " + metrics.MISSING]
