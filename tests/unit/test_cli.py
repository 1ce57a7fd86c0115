"""The command line's contract on a host without VDUSE: one-line errors, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyvduse.sizes import parse_size

HAS_VDUSE = Path("/dev/vduse/control").exists()


def pyvduse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvduse", *args], capture_output=True,
                          text=True, timeout=60)


def one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> None:
    assert p.returncode != 0
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.skipif(HAS_VDUSE, reason="this host has the vduse module")
def test_no_module_says_modprobe() -> None:
    one_line_error(pyvduse("blk", "--name", "x", "--memory", "1M"), "modprobe vduse")


def test_missing_file(tmp_path: Path) -> None:
    one_line_error(pyvduse("blk", "--name", "x", "--file", str(tmp_path / "nope.img")),
                   "does not exist", "truncate")


def test_size_not_multiple_of_block_size(tmp_path: Path) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(bytes(1000))
    one_line_error(pyvduse("blk", "--name", "x", "--file", str(img)), "multiple of the block size")
    one_line_error(pyvduse("blk", "--name", "x", "--null", "1M", "--block-size", "4096",
                           "--queue-size", "100"), "power of two")


def test_bad_size_and_name() -> None:
    one_line_error(pyvduse("blk", "--name", "x", "--memory", "12X"), "not a size")
    one_line_error(pyvduse("blk", "--name", "a/b", "--memory", "1M"), "cannot be a device name")


def test_sizes() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 65536
    assert parse_size("1g") == 1 << 30
    assert parse_size("2GiB") == 2 << 30
    with pytest.raises(ValueError):
        parse_size("-1")


def test_testvm_options_reach_its_own_parser() -> None:
    from pyvduse.cli.main import split_testvm

    assert split_testvm(["testvm", "--prepare"]) == ([], ["--prepare"])
    assert split_testvm(["--log-level", "info", "testvm", "--mem", "1G", "--", "true"]) == (
        ["--log-level", "info"], ["--mem", "1G", "--", "true"])
    assert split_testvm(["blk", "--name", "testvm"]) is None
    p = pyvduse("testvm", "--help")
    assert p.returncode == 0 and "--prepare" in p.stdout and "--mem" in p.stdout


def test_missing_module_hint_knows_whether_modprobe_can_work(tmp_path: Path) -> None:
    import os

    from pyvduse.transport.kernel.control import missing_module_hint

    assert "pyvduse testvm" in missing_module_hint(tmp_path)
    dep = tmp_path / os.uname().release / "modules.dep"
    dep.parent.mkdir(parents=True)
    dep.write_text("kernel/drivers/vdpa/vdpa_user/vduse.ko.xz: kernel/drivers/vdpa/vdpa.ko.xz\n")
    assert missing_module_hint(tmp_path) == (
        "the vduse kernel module is not loaded: run 'modprobe vduse' as root")
