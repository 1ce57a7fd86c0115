"""``pyvduse ctl``: text and JSON output, exit status, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyvduse.backend.file import FileBackend
from pyvduse.cli import ctl
from pyvduse.cli.main import main
from pyvduse.device.blk import BlkDevice, BlkOptions
from tests.unit.test_ops_socket import served, short_dir

sock_dir = pytest.fixture(name="sock_dir")(short_dir)

MiB = 1 << 20


def pyvduse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvduse", *args], capture_output=True, text=True, timeout=60
    )


def run_ctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["ctl", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_and_stats_text(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with served(sock_dir) as (_rig, drv, ops, _):
        assert drv is not None
        ops.ready("/dev/vdq")
        for i in range(4):
            drv.write(i * 4096, b"w" * 4096, queue=0)
        drv.read(0, 8192, queue=1)
        code, out, err = run_ctl(capsys, "t0", "status", "--control", ops.control_path)
        assert code == 0 and err == ""
        assert out.startswith("t0: serving, virtio-blk on /dev/vdq")
        assert "backend   memory" in out and "capacity  8388608 bytes (8 MiB)" in out
        assert "status    0x0f ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK" in out
        assert "queue 0   size 256, avail 4, taken 4, used 4, in flight 0" in out
        assert "VDUSE" not in out  # the model: no VDUSE API to show
        code, out, err = run_ctl(capsys, "t0", "stats", "--control", ops.control_path)
        assert code == 0 and err == ""
        lines = out.splitlines()
        assert lines[0].startswith(
            "queue 0: 4 requests (write 4); 0 B read, 16 KiB written; 0 errors, 0 bad; 0 in flight"
        )
        assert "latency: mean" in lines[1] and "p99 <=" in lines[1]
        assert any(line.startswith("total: 5 requests") for line in lines)
        assert "latency histogram (all queues):" in lines


def test_json_output_is_the_reply(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        code, out, _ = run_ctl(capsys, "t0", "stats", "--json", "--control", ops.control_path)
        assert code == 0
        reply = json.loads(out)
        assert set(reply) == {"result"} and len(reply["result"]["queues"]) == 2


def test_resize_text_and_error_reply(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = sock_dir / "c.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    device = BlkDevice(FileBackend(str(img)), BlkOptions())
    with served(sock_dir, device) as (_rig, _drv, ops, _):
        code, out, err = run_ctl(capsys, "t0", "resize", "6M", "--control", ops.control_path)
        assert (code, err) == (0, "")
        assert out == "t0: resized from 4194304 to 6291456 bytes (4 MiB -> 6 MiB)\n"
        code, out, err = run_ctl(capsys, "t0", "resize", "--control", ops.control_path)
        assert out == "t0: size unchanged, 6291456 bytes (6 MiB)\n"
        code, out, err = run_ctl(capsys, "t0", "resize", "1M", "--control", ops.control_path)
        assert code == 1 and out == ""
        assert len(err.splitlines()) == 1 and "--shrink" in err and "(invalid-argument)" in err
        code, out, err = run_ctl(capsys, "t0", "resize", "1M", "--json", "--control", ops.control_path)
        assert code == 1 and json.loads(out)["error"]["code"] == "invalid-argument"
        code, out, err = run_ctl(capsys, "t0", "resize", "2M", "--shrink", "--control", ops.control_path)
        assert code == 0 and "-> 2 MiB" in out
    device.backend.close()


def test_quit(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with served(sock_dir) as (_rig, _drv, ops, quit_event):
        code, out, _ = run_ctl(capsys, "t0", "quit", "--control", ops.control_path)
        assert code == 0 and out == "t0: stopping\n" and quit_event.is_set()


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_ctl(capsys, "t0", "status", "5G", "--control", "/nonexistent.sock")
    assert code == 2 and "takes no size" in err
    with pytest.raises(SystemExit):
        main(["ctl", "t0", "explode"])


def test_no_daemon_is_one_line_and_nonzero(sock_dir: Path) -> None:
    path = sock_dir / "nobody.sock"
    p = pyvduse("ctl", "nobody", "status", "--control", str(path))
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"pyvduse: error: no daemon serves nobody: is it running? (socket {path})"
    ]
    p = pyvduse("ctl", "nobody", "stats", "--json")  # the default path
    assert p.returncode != 0
    assert "(socket /run/pyvduse/nobody.sock)" in p.stderr and "Traceback" not in p.stderr


def test_error_reply_exits_nonzero_from_the_command_line(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        p = pyvduse("ctl", "t0", "resize", "64M", "--control", ops.control_path)
        assert p.returncode == 1 and p.stdout == ""
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot be resized" in lines[0] and "(unsupported)" in lines[0]


def test_human_formatting() -> None:
    assert ctl.human_bytes(0) == "0 B"
    assert ctl.human_bytes(1536) == "1.5 KiB"
    assert ctl.human_bytes(1 << 30) == "1 GiB"
    assert ctl.human_us(None) == "-"
    assert ctl.human_us(512) == "512 µs"
    assert ctl.human_us(4096) == "4.096 ms"
    assert ctl.human_us(2_097_152) == "2.09715 s"


def test_status_text_shows_the_vduse_api_and_the_kernels_features() -> None:
    from pyvduse.cli.ctl import render_status

    reply = {
        "name": "d0",
        "state": "serving",
        "device": "virtio-blk",
        "pid": 1,
        "uptime_s": 1.0,
        "status": 15,
        "features": "0x1",
        "queues": [],
    }
    on_7_3 = render_status({**reply, "vduse_api": 1, "vduse_features": ["queue_ready", "suspend"]})
    assert "  VDUSE     API version 1, kernel features: queue_ready suspend\n" in on_7_3
    on_6_12 = render_status({**reply, "vduse_api": 0, "vduse_features": []})
    assert "  VDUSE     API version 0, kernel features: none\n" in on_6_12
