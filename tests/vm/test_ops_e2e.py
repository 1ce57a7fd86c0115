"""Operations against the real kernel: live resize, ctl status/stats/quit, metrics, systemd
notifications, and a stalled backend that stalls nothing but its own request.

These run inside the test VM (Linux 6.12 or 7.3 with vduse); on the host they are proxied into it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvduse.cli.main import main
from pyvduse.ops.client import NoDaemon, request
from tests.vm.helpers import Daemon, MiB, ctl, ctl_json, expected_vduse, make_image, sh, wait_gone

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def sectors(dev: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(dev)}/size").read_text())


def test_resize_stats_metrics_notify_and_quit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One daemon's life (Python starts slowly in the emulated guest: few processes)."""
    name = "ops-e2e"
    control = f"/run/pyvduse/{name}.sock"  # the default place
    img = make_image(tmp_path / "grow.img", 64 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))  # as Type=notify does
    with Daemon("--file", str(img), "--queues", "2", "--metrics", "127.0.0.1:9731", name=name) as d:
        assert notify.recv(4096) == f"READY=1\nSTATUS=serving {name} on {d.dev}".encode()
        assert Path(control).is_socket() and Path(control).stat().st_mode & 0o777 == 0o600
        assert sectors(d.dev) == 64 * MiB // 512
        sh(f"mkfs.ext4 -q -F {d.dev}")
        sh(f"mount {d.dev} {mnt}")
        data = os.urandom(3 * MiB)
        (mnt / "before").write_bytes(data)
        sh("sync")
        # grow, as a user would: the kernel sees it live and resize2fs grows the mounted fs
        p = ctl(name, "resize", "128M")
        assert p.returncode == 0, p.stderr
        assert p.stdout == f"{name}: resized from 67108864 to 134217728 bytes (64 MiB -> 128 MiB)\n"
        wait_for("the new capacity in sysfs", lambda: sectors(d.dev) == 128 * MiB // 512)
        assert img.stat().st_size == 128 * MiB
        sh(f"resize2fs {d.dev}")  # online: the filesystem is mounted
        fs = os.statvfs(mnt)
        assert fs.f_blocks * fs.f_frsize > 100 * MiB
        (mnt / "after").write_bytes(data[::-1])
        sh("sync")
        # grown by someone else, then 'resize' with no size
        os.truncate(img, 160 * MiB)
        assert request(control, {"cmd": "resize"}, timeout=60)["result"] == {
            "old_size": 128 * MiB,
            "size": 160 * MiB,
            "changed": True,
        }
        wait_for("the re-read size in sysfs", lambda: sectors(d.dev) == 160 * MiB // 512)
        for req, code in (
            ({"size": "64M"}, "invalid-argument"),  # a shrink without "shrink"
            ({"size": 100000}, "invalid-argument"),
        ):  # not a block multiple
            assert request(control, {"cmd": "resize", **req}, timeout=60)["error"]["code"] == code
        assert sectors(d.dev) == 160 * MiB // 512
        # the data, read back from the device rather than the page cache
        sh("echo 3 > /proc/sys/vm/drop_caches")
        assert hashlib.sha256((mnt / "before").read_bytes()).digest() == hashlib.sha256(data).digest()
        assert (mnt / "after").read_bytes() == data[::-1]
        sh(f"umount {mnt}")
        sh(f"e2fsck -fn {d.dev}")
        # stats after all that I/O, through the command line
        stats = ctl_json(name, "stats")["result"]
        assert isinstance(stats, dict) and len(stats["queues"]) == 2
        total = stats["total"]
        assert total["bytes_written"] >= 6 * MiB and total["bytes_read"] >= 6 * MiB
        assert total["requests"]["write"] > 0 and total["requests"]["read"] > 0
        assert total["requests"]["flush"] > 0 and total["errors"] == 0
        assert total["in_flight"] == 0 and total["latency"]["count"] == total["completed"]
        assert stats["capacity"] == 160 * MiB
        status = request(control, {"cmd": "status"}, timeout=60)["result"]
        assert status["status"] == 0x0F and status["driver_ok"] and status["node"] == d.dev
        assert status["state"] == "serving" and status["backend"] == f"file {img}"
        assert {"VERSION_1", "ACCESS_PLATFORM", "MQ", "FLUSH"} <= set(status["feature_names"])
        assert all(q["served"] and q["in_flight"] == 0 for q in status["queues"])
        # VDUSE API version 1 and the kernel's control features on 7.3; 0 and none on 6.12
        api, offered = expected_vduse()
        assert (status["vduse_api"], status["vduse_features"]) == (api, offered), status
        text = ctl(name, "status").stdout
        assert f"VDUSE     API version {api}, kernel features: {' '.join(offered) or 'none'}\n" in text
        with urllib.request.urlopen("http://127.0.0.1:9731/metrics", timeout=60) as r:
            text = r.read().decode()
        assert f'pyvduse_capacity_bytes{{device="{name}"}} 1.6777216e+08' in text, text[-2000:]
        assert f'pyvduse_written_bytes_total{{device="{name}",queue="0"}}' in text
        # quit, like SIGTERM
        p = ctl(name, "quit")
        assert p.returncode == 0 and p.stdout == f"{name}: stopping\n", p
        assert notify.recv(4096) == f"STOPPING=1\nSTATUS=stopping {name}".encode()
        assert d.proc.wait(timeout=120) == 0, d.stderr()
    notify.close()
    assert wait_gone(f"/dev/vduse/{name}")
    assert not os.path.exists(control)
    with pytest.raises(NoDaemon):
        request(control, {"cmd": "status"})


STALL_OFFSET = MiB

# A daemon whose backend hangs (up to a minute) on reads at STALL_OFFSET while a trigger file
# exists, like a storage server that stopped answering.
STALL_SCRIPT = f"""
import logging, os, sys, time
from pyvduse import BlkDevice, Daemon, FileBackend, OpsOptions, check_kernel

name, image, trigger, control = sys.argv[1:5]

class StallingFile(FileBackend):
    def readv(self, offset, bufs):
        if offset == {STALL_OFFSET}:
            deadline = time.monotonic() + 60
            while os.path.exists(trigger) and time.monotonic() < deadline:
                time.sleep(0.05)
        super().readv(offset, bufs)

logging.basicConfig(level="INFO", stream=sys.stderr, format="pyvduse: %(levelname)s: %(message)s")
check_kernel()
daemon = Daemon(BlkDevice(StallingFile(image)), name,
                ops=OpsOptions(control=control, drain_timeout=2))
daemon.on_ready = lambda d: print(f"READY name={{d.name}} dev={{d.node}}", flush=True)
daemon.run(signals=True)
"""


def test_stalled_backend_stalls_only_its_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "ops-stall"
    img = tmp_path / "stall.img"
    img.write_bytes(os.urandom(4 * MiB))
    expected = img.read_bytes()[STALL_OFFSET : STALL_OFFSET + 4096]
    os.truncate(img, 16 * MiB)
    short = Path(tempfile.mkdtemp(prefix="ops-"))
    control, trigger, out = str(short / "c.sock"), short / "stall-on", short / "out"
    script = short / "stall_daemon.py"
    script.write_text(STALL_SCRIPT)
    log = short / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), name, str(img), str(trigger), control],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    dd: subprocess.Popen[bytes] | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), (line, log.read_text())
        dev = line.split("dev=")[1].strip()
        trigger.touch()
        dd = subprocess.Popen(
            [
                "dd",
                f"if={dev}",
                f"of={out}",
                "bs=4k",
                "count=1",
                f"skip={STALL_OFFSET // 4096}",
                "iflag=direct",
                "status=none",
            ]
        )

        def in_flight() -> bool:
            total = request(control, {"cmd": "stats"}, timeout=10)["result"]["total"]
            return bool(total["in_flight"] == 1)

        wait_for("the read to reach the stalled backend", in_flight)
        # the management socket answers while the queue's worker is stuck (the read is still
        # in flight in the reply: it answered during the stall, not after it)
        reply = request(control, {"cmd": "status"}, timeout=30.0)
        q0 = reply["result"]["queues"][0]
        assert q0["in_flight"] == 1 and not q0["broken"]
        p = ctl(name, "status", control=control)
        assert p.returncode == 0 and "in flight 1" in p.stdout, p
        # the kernel side works: the device is served, not broken, and a config change
        # (capacity, through VDUSE_DEV_SET_CONFIG and the config interrupt) reaches the driver
        assert main(["list"]) == 0
        assert f"{name}\tserved" in capsys.readouterr().out
        assert request(control, {"cmd": "resize", "size": "32M"}, timeout=10)["result"]["changed"]
        wait_for("the new capacity", lambda: sectors(dev) == 32 * MiB // 512)
        assert dd.poll() is None and proc.poll() is None, "the stall should still hold the read"
        # SIGTERM: the drain gives up after --drain-timeout, then the daemon detaches
        proc.send_signal(signal.SIGTERM)
        wait_for("the drain timeout", lambda: "still in flight" in log.read_text())
        trigger.unlink()  # the storage answers again
        assert dd.wait(timeout=120) == 0
        assert out.read_bytes() == expected
        assert proc.wait(timeout=120) == 0, log.read_text()
        assert wait_gone(f"/dev/vduse/{name}")
        assert not os.path.exists(control)
        assert "broken" not in log.read_text()
    finally:
        trigger.unlink(missing_ok=True)
        for p_ in (dd, proc):
            if p_ is not None and p_.poll() is None:
                p_.kill()
                p_.wait()
