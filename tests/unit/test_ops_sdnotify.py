"""sd_notify without systemd: a fake $NOTIFY_SOCKET, by path and in the abstract namespace."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvduse.ops import sdnotify
from tests.unit.test_ops_socket import served, short_dir

sock_dir = pytest.fixture(name="sock_dir")(short_dir)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.settimeout(2)
    yield s
    s.close()


def test_path_socket(sock_dir: Path, listener: socket.socket) -> None:
    path = str(sock_dir / "notify")
    listener.bind(path)
    assert sdnotify.notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": path})
    assert listener.recv(4096) == b"READY=1\nSTATUS=ok"


def test_abstract_socket(listener: socket.socket) -> None:
    name = f"pyvduse-test-{os.getpid()}"
    listener.bind("\0" + name)
    assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
    assert listener.recv(4096) == b"STOPPING=1"


def test_no_socket_no_message() -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": ""})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})


def test_unreachable_socket_is_a_warning_not_an_error(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(sock_dir / "gone")})
    assert "cannot notify" in caplog.text


def test_daemon_lifecycle_notifies(
    sock_dir: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(sock_dir / "notify")
    listener.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with served(sock_dir) as (_rig, _drv, ops, _):
        ops.ready("/dev/vdx")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving t0 on /dev/vdx"
        assert ops.shutdown() == 0
        assert listener.recv(4096) == b"STOPPING=1\nSTATUS=stopping t0"


UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "pyvduse-blk@.service"


def test_systemd_unit_template(sock_dir: Path) -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "EnvironmentFile=/etc/pyvduse/%i.conf", "RuntimeDirectoryPreserve=yes"):
        assert line in text.splitlines(), line
    assert "blk --name %i" in text and "--drain-timeout ${DRAIN_TIMEOUT}" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    unit = sock_dir / "pyvduse-blk@disk0.service"
    unit.write_text(text)
    p = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (p.stdout + p.stderr).splitlines() if unit.name in line]
    assert not complaints, complaints
