"""bench/net.py without a VM: iperf3's figures and the table."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def net() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("net")
    finally:
        sys.path.remove(str(BENCH))


def test_figures(net: ModuleType) -> None:
    tcp = {"end": {"sum_received": {"bits_per_second": 2.5e8}}}
    udp = {"end": {"sum": {"packets": 12000, "lost_packets": 2000, "seconds": 5.0}}}
    assert net.figure(tcp, "bits") == 2.5e8
    assert net.figure(udp, "pps") == 2000.0


def test_table(net: ModuleType) -> None:
    tcp = "TCP, 1 stream, into"
    cells = [
        {"test": tcp, "impl": "pyvduse", "value": 2.39e8, "daemon_cpu": 0.84, "guest_cpu": 1.9},
        {"test": tcp, "impl": "veth", "value": 6.78e8, "daemon_cpu": None, "guest_cpu": 1.25},
        {"test": "UDP 64 B, into", "impl": "pyvduse", "value": None, "daemon_cpu": 0.5},
        {"test": "UDP 64 B, into", "impl": "veth", "value": 34828.0, "daemon_cpu": None},
    ]
    lines = net.table(cells).splitlines()
    assert lines[2] == "| TCP, 1 stream, into | 239 Mbit/s | 678 Mbit/s | 0.35 | 84% | 190% / 125% |"
    assert lines[3] == "| UDP 64 B, into | - | 34,828 pps | - | 50% | - / - |"  # a failed cell
    assert len(lines) == 4  # tests that did not run are left out
