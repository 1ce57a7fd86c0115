"""``Daemon(..., model=True)`` is for anyone: no root, nothing written under /run/pyvduse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvduse import BlkDevice, BlkDriver, Daemon, MemoryBackend
from pyvduse.runtime.state_file import DEFAULT_STATE_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_a_model_daemon_keeps_no_state_unless_asked(tmp_path: Path) -> None:
    name = f"model-{os.getpid()}"
    with Daemon(BlkDevice(MemoryBackend(1 << 20)), name, model=True) as daemon:
        BlkDriver(daemon.kernel).write(0, b"m" * 512)
        assert daemon.state_dir is None
        assert not (DEFAULT_STATE_DIR / name).exists()
        assert daemon.stats()["total"]["bytes_written"] == 512
    with Daemon(BlkDevice(MemoryBackend(1 << 20)), name, model=True, state_dir=tmp_path) as daemon:
        assert (tmp_path / name / "state").exists()  # given one: it is used


CODE = """
from pyvduse import BlkDevice, BlkDriver, Daemon, MemoryBackend
with Daemon(BlkDevice(MemoryBackend(1 << 20)), "nobody0", model=True) as d:
    disk = BlkDriver(d.kernel)
    disk.write(0, b"n" * 512)
    assert disk.read(0, 512) == b"n" * 512
print("ok")
"""


def reachable_by_anyone(path: Path, mode: int = 0o001) -> bool:
    """Whether any user may run (``mode`` 0o004: read) ``path``: every directory above it
    searchable."""
    path = path.resolve()
    return bool(path.stat().st_mode & mode) and all(p.stat().st_mode & 0o001 for p in path.parents)


def an_interpreter_for_anyone() -> str | None:
    for candidate in (sys.executable, f"/usr/bin/python3.{sys.version_info.minor}"):
        if Path(candidate).exists() and reachable_by_anyone(Path(candidate)):
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_model_daemon_runs_as_an_ordinary_user() -> None:
    python = an_interpreter_for_anyone()
    if python is None or not reachable_by_anyone(ROOT / "pyvduse" / "__init__.py", 0o004):
        pytest.skip("no Python and checkout another user can run")
    p = subprocess.run(
        [python, "-c", CODE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"},
        user=65534,
        group=65534,
        extra_groups=[],
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
