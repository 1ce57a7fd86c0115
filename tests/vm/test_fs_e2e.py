"""virtio-fs served by ``pyvduse fs``, mounted by Linux's own virtiofs driver in the test VM.

Linux 7.3's VDUSE accepts virtio-fs (device id 26); 6.12's refuses it at creation, which
the command says in one line (the first test, on 6.12 only). On 7.3 the mount is driven
with ordinary file operations and compared with the served directory after each step,
then fio writes and verifies a file in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, kernel_series, sh, wait_gone

pytestmark = pytest.mark.vm

REFUSED = "refuses virtio-fs devices"


def refuses_fs() -> bool:
    """Whether this kernel's VDUSE refuses virtio-fs (6.12 does; 6.15 and later accept it)."""
    return kernel_series() == "6.12"


def test_old_kernel_refuses_in_one_line(tmp_path: Path) -> None:
    if not refuses_fs():
        pytest.skip(f"Linux {kernel_series()} accepts virtio-fs")
    p = subprocess.run(
        [sys.executable, "-m", "pyvduse", "fs", "--name", "e2e-fs-old", "--tag", "t", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and REFUSED in lines[0] and "6.15" in lines[0], p.stderr
    assert not os.path.exists("/dev/vduse/e2e-fs-old")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path below ``root``: a file's bytes, None for a directory."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            out[os.path.relpath(os.path.join(dirpath, f), root)] = Path(dirpath, f).read_bytes()
    return out


def test_mount_operations_and_fio_verify(tmp_path: Path) -> None:
    if refuses_fs():
        pytest.skip(f"Linux {kernel_series()}'s VDUSE refuses virtio-fs (6.15 or later accepts it)")
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    (shared / "from-host").write_bytes(b"made on the host\n")
    name = "e2e-fs"
    with Daemon("--tag", "pyfs", "--dir", str(shared), "--queues", "2", name=name, command="fs") as d:
        assert d.ready_line.split() == ["READY", f"name={name}", "tag=pyfs"]
        sh(f"mount -t virtiofs pyfs {mnt}")
        try:
            assert (mnt / "from-host").read_bytes() == b"made on the host\n"
            steps: list[Callable[[], object]] = [
                lambda: (mnt / "a.txt").write_bytes(b"alpha" * 1000),
                lambda: (mnt / "dir").mkdir(),
                lambda: (mnt / "dir" / "b.bin").write_bytes(os.urandom(300_000)),
                lambda: os.rename(mnt / "a.txt", mnt / "dir" / "a2.txt"),
                lambda: (mnt / "dir" / "c").write_bytes(b"c"),
                lambda: os.unlink(mnt / "dir" / "c"),
                lambda: os.symlink("a2.txt", mnt / "dir" / "ln"),
                lambda: os.truncate(mnt / "dir" / "b.bin", 1000),
                lambda: os.chmod(mnt / "dir" / "a2.txt", 0o600),
            ]
            for i, step in enumerate(steps):
                step()
                assert tree(mnt) == tree(shared), f"after step {i}"
            assert sorted(os.listdir(mnt / "dir")) == ["a2.txt", "b.bin", "ln"]
            assert os.readlink(shared / "dir" / "ln") == "a2.txt"
            assert (os.stat(shared / "dir" / "a2.txt").st_mode & 0o777) == 0o600
            # The guest's own escape attempt: a symlink to / is a symlink on the host too,
            # and '..' at the mount's root is the guest's directory above it, not the host's.
            os.symlink("/", mnt / "root")
            assert os.readlink(shared / "root") == "/"
            assert os.path.samefile(mnt / "..", tmp_path)
            fio = sh(
                f"fio --name=verify --filename={mnt}/fio.dat --size=8M --rw=randwrite "
                "--bsrange=4k-64k --ioengine=psync --verify=crc32c --verify_fatal=1 --do_verify=1"
            )
            assert "err= 0" in fio.stdout, fio.stdout[-2000:]
            assert os.path.getsize(shared / "fio.dat") == 8 << 20
            os.unlink(mnt / "fio.dat")
            assert not (shared / "fio.dat").exists()
        finally:
            sh(f"umount {mnt}", check=False)
        assert d.stop() == 0, d.stderr()
    assert wait_gone(f"/dev/vduse/{name}")


def test_hello_filesystem_of_ones_own(tmp_path: Path) -> None:
    """The guide's first filesystem (examples/hello_fs.py), served with --fs, read-only."""
    if refuses_fs():
        pytest.skip(f"Linux {kernel_series()}'s VDUSE refuses virtio-fs (6.15 or later accepts it)")
    hello = Path(__file__).resolve().parents[2] / "examples" / "hello_fs.py"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    name = "e2e-fs-hello"
    with Daemon("--tag", "hello", "--fs", f"{hello}:Hello", "--readonly", name=name, command="fs") as d:
        sh(f"mount -t virtiofs hello {mnt}")
        try:
            assert os.listdir(mnt) == ["hello"]
            assert (mnt / "hello").read_text() == "Hello from Python!\n"
            with pytest.raises(OSError):
                (mnt / "new").write_text("no")
        finally:
            sh(f"umount {mnt}", check=False)
        assert d.stop() == 0, d.stderr()
    assert wait_gone(f"/dev/vduse/{name}")


def _apply(root: Path, op: tuple[str, str, str, int, bytes]) -> int:
    """One operation on ``root`` with os calls; its errno (0: done)."""
    kind, a, b, n, data = op
    pa, pb = root / a, root / b
    try:
        if kind == "create":
            os.close(os.open(pa, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif kind == "write":
            fd = os.open(pa, os.O_WRONLY)
            try:
                os.pwrite(fd, data, n)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif kind == "truncate":
            os.truncate(pa, n)
        elif kind == "mkdir":
            os.mkdir(pa, 0o755)
        elif kind == "unlink":
            os.unlink(pa)
        elif kind == "rmdir":
            os.rmdir(pa)
        elif kind == "rename":
            os.rename(pa, pb)
        elif kind == "link":
            os.link(pa, pb)
        elif kind == "chmod":
            os.chmod(pa, 0o600 | (n & 0o077))
        elif kind == "listdir":
            return len(os.listdir(pa))
    except OSError as e:
        return -(e.errno or 1)
    return 0


def test_random_operations_on_the_mount_match_a_reference(tmp_path: Path) -> None:
    """The same random operations on the mount and on a directory of the guest's tmpfs:
    the same outcome each time, the same tree after every step (2 seeds x 300 steps)."""
    import random

    if refuses_fs():
        pytest.skip(f"Linux {kernel_series()}'s VDUSE refuses virtio-fs (6.15 or later accepts it)")
    shared, mnt, ref = tmp_path / "shared", tmp_path / "mnt", tmp_path / "ref"
    for p in (shared, mnt, ref):
        p.mkdir()
    name = "e2e-fs-random"
    paths = ["a", "b", "d1", "d1/a", "d1/b", "d2", "d2/a", "d1/d3", "d1/d3/a"]
    kinds = ["create", "write", "truncate", "mkdir", "unlink", "rmdir", "rename", "link", "chmod", "listdir"]
    with Daemon("--tag", "rnd", "--dir", str(shared), name=name, command="fs") as d:
        sh(f"mount -t virtiofs rnd {mnt}")
        try:
            for seed in (1, 2):
                rng = random.Random(seed)
                for step in range(300):
                    op = (
                        rng.choice(kinds),
                        rng.choice(paths),
                        rng.choice(paths),
                        rng.randrange(0, 70000),
                        rng.randbytes(rng.randrange(1, 20000)),
                    )
                    if op[0] in ("rename", "link") and (op[2] + "/").startswith(op[1] + "/"):
                        continue  # into itself
                    got, want = _apply(mnt, op), _apply(ref, op)
                    assert got == want, (seed, step, op[:4], got, want)
                    assert tree(mnt) == tree(ref), (seed, step, op[:4])
                assert tree(shared) == tree(ref)
                sh(f"rm -rf {mnt}/* {ref}/*")
        finally:
            sh(f"umount {mnt}", check=False)
        assert d.stop() == 0, d.stderr()
    assert wait_gone(f"/dev/vduse/{name}")
