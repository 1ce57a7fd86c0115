"""The command line's contract on a host without VDUSE: one-line errors, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyvduse.sizes import parse_size

HAS_VDUSE = Path("/dev/vduse/control").exists()


def pyvduse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvduse", *args], capture_output=True, text=True, timeout=60
    )


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
    one_line_error(
        pyvduse("blk", "--name", "x", "--file", str(tmp_path / "nope.img")), "does not exist", "truncate"
    )


def test_size_not_multiple_of_block_size(tmp_path: Path) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(bytes(1000))
    one_line_error(pyvduse("blk", "--name", "x", "--file", str(img)), "multiple of the block size")
    one_line_error(
        pyvduse("blk", "--name", "x", "--null", "1M", "--block-size", "4096", "--queue-size", "100"),
        "power of two",
    )


def test_bad_size_and_name() -> None:
    one_line_error(pyvduse("blk", "--name", "x", "--memory", "12X"), "not a size")
    one_line_error(pyvduse("blk", "--name", "a/b", "--memory", "1M"), "cannot be a device name")


def test_tuning_out_of_range() -> None:
    one_line_error(
        pyvduse("blk", "--name", "x", "--null", "1M", "--publish-us", "-5"),
        "--publish-us -5 must be 0 to 1000000",
    )
    one_line_error(
        pyvduse("blk", "--name", "x", "--null", "1M", "--poll-us", "2000000"),
        "--poll-us 2000000 must be 0 to 1000000",
    )


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
        ["--log-level", "info"],
        ["--mem", "1G", "--", "true"],
    )
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
        "the vduse kernel module is not loaded: run 'modprobe vduse' as root"
    )


def test_one_command_parser_parses_like_the_full_one() -> None:
    from pyvduse.cli.main import build_parser, daemon_command

    assert daemon_command(["--log-level", "info", "blk", "--name", "x"]) == "blk"
    assert daemon_command(["--log-level=info", "ctl", "x", "status"]) == "ctl"
    for argv in ([], ["--version"], ["-h", "blk"], ["--log", "blk"]):  # the full parser
        assert daemon_command(argv) is None, argv
    argv = ["--log-level", "info", "blk", "--name", "x", "--null", "1M", "--queues", "2"]
    assert vars(build_parser().parse_args(argv)) == vars(build_parser("blk").parse_args(argv))
    for command in (None, "testvm", "nonsense"):  # these get every subcommand
        assert build_parser(command).format_help() == build_parser().format_help()
    for words in (["blk", "--help"], ["ctl", "--help"], ["destroy", "--help"]):
        p = pyvduse(*words)
        assert p.returncode == 0 and p.stdout.startswith(f"usage: pyvduse {words[0]}"), p.stderr


def test_daemon_start_imports_only_what_it_needs() -> None:
    """In the test VM every module costs tens of ms; a restart after kill -9 pays them all."""
    code = (
        "import sys\n"
        "from pyvduse.cli.main import build_parser\n"
        "build_parser('blk').parse_args(['blk', '--name', 'x', '--null', '1M'])\n"
        "import pyvduse.cli.blk\n"
        "print(' '.join(sorted(sys.modules)))\n"
        "import pyvduse.transport.kernel.vdpa_netlink\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    daemon, attach = (set(line.split()) for line in p.stdout.splitlines())
    # other commands' modules, --metrics only, ctypes (fallocate binds it on first use)
    for name in (
        "pyvduse.cli.ctl",
        "pyvduse.cli.manage",
        "pyvduse.ops.client",
        "pyvduse.ops.metrics",
        "ctypes",
        "subprocess",
        "pyroute2",
    ):
        assert name not in daemon, name
    # attaching needs pyroute2's netlink client, not all of pyroute2/__init__.py imports
    assert "pyroute2.netlink.generic" in attach
    for name in ("pyroute2.ndb", "pyroute2.iproute", "pyroute2.ipdb", "pyroute2.conntrack"):
        assert name not in attach, name


def test_pyroute2_package_still_whole_when_asked() -> None:
    code = (
        "import pyvduse.transport.kernel.vdpa_netlink\n"
        "import pyroute2\n"
        "from pyroute2 import IPRoute, config\n"
        "assert pyroute2.NetlinkError is pyroute2.netlink.exceptions.NetlinkError\n"
        "try:\n"
        "    pyroute2.no_such_name\n"
        "except AttributeError:\n"
        "    print('ok', IPRoute.__name__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok IPRoute", p.stderr


def test_daemon_bounce_memory_is_not_for_vhost() -> None:
    one_line_error(
        pyvduse("blk", "--name", "x", "--null", "1M", "--bind", "vhost", "--bounce-memory", "daemon"),
        "--bounce-memory",
        "leave it out",
    )


def test_memory_larger_than_the_machine_is_one_line() -> None:
    p = pyvduse("blk", "--name", "x", "--memory", "1024T")
    one_line_error(p, "--memory")
    assert "cannot reserve 1024T" in p.stderr


@pytest.mark.skipif(HAS_VDUSE, reason="this host has the vduse module")
def test_every_block_size_the_device_supports_is_taken() -> None:
    for bs in ("1024", "2048"):  # accepted: the next error is the missing module
        one_line_error(pyvduse("blk", "--name", "x", "--null", "1M", "--block-size", bs), "modprobe vduse")


def test_msg_timeout_and_bounce_size_are_checked_here() -> None:
    one_line_error(
        pyvduse("blk", "--name", "x", "--null", "1M", "--msg-timeout", "1.5"), "whole seconds", "use 2"
    )
    one_line_error(
        pyvduse("blk", "--name", "x", "--null", "1M", "--msg-timeout", "-1"), "must be 0 (forever) to 86400"
    )
    one_line_error(pyvduse("blk", "--name", "x", "--null", "1M", "--msg-timeout", "soon"), "not a number")
    one_line_error(
        pyvduse("blk", "--name", "x", "--null", "1M", "--bounce-size", "512K"),
        "--bounce-size 512K must be 1M to 1G",
    )
    one_line_error(pyvduse("blk", "--name", "x", "--null", "1M", "--bounce-size", "2G"), "must be 1M to 1G")


def test_msg_timeout_parses_whole_seconds() -> None:
    from pyvduse.cli.blk import parse_msg_timeout

    assert parse_msg_timeout(None) is None
    assert parse_msg_timeout("0") == 0
    assert parse_msg_timeout("3.0") == 3


def test_unreadable_image_with_readonly_does_not_say_use_readonly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from pyvduse.cli import blk
    from pyvduse.errors import UserError

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")  # as for a mode-000 image, not root

    monkeypatch.setattr(blk, "FileBackend", refuse)
    img = tmp_path / "locked.img"
    img.write_bytes(bytes(1 << 20))
    for readonly, says in ((True, "no permission to read"), (False, "or use --readonly")):
        args = argparse.Namespace(
            file=str(img), readonly=readonly, cache="writeback", backend=None, backend_arg=None
        )
        with pytest.raises(UserError, match=says) as e:
            blk.make_backend(args)
        assert ("use --readonly" in str(e.value)) is not readonly


def test_help_is_plain_text() -> None:
    p = pyvduse("--help")
    assert p.returncode == 0
    assert "``" not in p.stdout and "pyvduse blk" in p.stdout
