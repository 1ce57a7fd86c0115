"""What a user sees when things go wrong, against the real kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, MiB, make_image, sh, wait_gone

pytestmark = pytest.mark.vm


def pyvduse(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "pyvduse", *args], capture_output=True, text=True, timeout=120
    )


def one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode != 0, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_name_taken_leaves_the_first_device_alone(tmp_path: Path) -> None:
    with Daemon("--memory", "16M", name="cli-taken") as d:
        one_line_error(pyvduse("blk", "--name", "cli-taken", "--memory", "1M"), "already exists")
        sh(f"dd if={d.dev} of=/dev/null bs=1M count=1 iflag=direct status=none")
        assert d.stop() == 0
    assert wait_gone("/dev/vduse/cli-taken")


def test_no_permission_leaves_nothing(tmp_path: Path) -> None:
    # A root process without CAP_DAC_OVERRIDE, facing a control node it may not open: what an
    # unprivileged user meets (a plain other uid cannot even read this machine's Python).
    control = "/dev/vduse/control"
    mode = os.stat(control).st_mode & 0o7777
    os.chmod(control, 0)
    try:
        caps = "-dac_override,-dac_read_search"
        p = pyvduse(
            "blk",
            "--name",
            "cli-perm",
            "--memory",
            "1M",
            prefix=("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"),
        )
    finally:
        os.chmod(control, mode)
    one_line_error(p, "no permission", control)
    assert not os.path.exists("/dev/vduse/cli-perm")


def test_killed_daemon_then_destroy_then_serve_again(tmp_path: Path) -> None:
    img = make_image(tmp_path / "k.img", 16 * MiB)
    d = Daemon("--file", str(img), name="cli-killed")
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert os.path.exists("/dev/vduse/cli-killed")
    listing = pyvduse("list").stdout
    assert "cli-killed\torphaned" in listing, listing
    # restarting it with other options is refused (the same options would resume it)
    one_line_error(
        pyvduse("blk", "--name", "cli-killed", "--file", str(img), "--readonly"),
        "configuration differs",
        "pyvduse destroy cli-killed",
    )
    p = pyvduse("destroy", "cli-killed")
    assert p.returncode == 0, p.stderr
    assert not os.path.exists("/dev/vduse/cli-killed")
    with Daemon("--file", str(img), name="cli-killed") as d2:
        assert "cli-killed\tserved" in pyvduse("list").stdout
        one_line_error(pyvduse("destroy", "cli-killed"), "still served")
        assert d2.stop() == 0


def test_ready_line_is_exact(tmp_path: Path) -> None:
    with Daemon("--null", "8M", name="cli-ready") as d:
        assert d.ready_line == f"READY name=cli-ready dev={d.dev}\n"
        assert d.dev.startswith("/dev/vd")
        assert Path(d.dev).is_block_device()
        assert d.stop(signal.SIGINT) == 0
