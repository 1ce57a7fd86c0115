"""``pyvduse fs`` on a host without a kernel that serves it: one-line errors that say what to
do, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_cli import one_line_error, pyvduse


def test_fs_argument_errors(tmp_path: Path) -> None:
    base = ("fs", "--name", "x", "--tag", "t")
    one_line_error(pyvduse(*base, "--dir", str(tmp_path / "nope")), "--dir", "not a directory")
    one_line_error(
        pyvduse("fs", "--name", "x", "--tag", "t" * 37, "--dir", str(tmp_path)), "--tag", "36 bytes"
    )
    one_line_error(pyvduse(*base, "--dir", str(tmp_path), "--queues", "0"), "--queues")
    one_line_error(pyvduse(*base, "--dir", str(tmp_path), "--queue-size", "100"), "power of two")
    one_line_error(pyvduse(*base, "--dir", str(tmp_path), "--fs-arg", "a=1"), "--fs-arg goes with --fs")
    one_line_error(pyvduse(*base, "--fs", "pathlib:Path"), "not a subclass of pyvduse.fs.Filesystem")
    one_line_error(pyvduse(*base, "--fs", "nosuchmodule_xyz:Fs"), "--fs")
    p = pyvduse(*base)
    assert p.returncode == 2 and "--dir" in p.stderr and "--fs" in p.stderr
