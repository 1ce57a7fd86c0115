"""The README's first command runs examples/quickstart.sh in the test VM: keep it true."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.vm


def test_quickstart_serves_an_image_and_leaves_it_clean(tmp_path: Path) -> None:
    img = tmp_path / "demo.img"
    p = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh"), str(img)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "READY name=demo0 dev=/dev/vd" in p.stdout, p.stdout
    assert "daemon exited cleanly" in p.stdout and f"image {img}: ext4 clean" in p.stdout, p.stdout
    assert not Path("/dev/vduse/demo0").exists()
    # the engine users run: the native one, whatever the build lacks (io_uring: sync I/O)
    assert "(native data path)" in p.stderr and "served by the Python engine" not in p.stderr, p.stderr
