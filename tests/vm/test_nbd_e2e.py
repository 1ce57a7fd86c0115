"""NBD servers as virtio-blk disks on the real kernel: nbdkit and qemu-nbd, over a Unix
socket and TCP on loopback, with their faults (delay, injected errors, a server killed and
restarted, our daemon killed while the server is slow).

Kept lean for CI (each test is tens of seconds under emulation): small fio runs, but each
one 32 deep on two queues, as the issue asks.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, MiB, ctl_result, make_image, sh
from tests.vm.test_crash_e2e import check_fio
from tests.vm.test_inflight_e2e import deepest

pytestmark = pytest.mark.vm

SOCK = "/tmp/nbd-e2e.sock"


class Server:
    """An NBD server process in the guest, restartable with the same arguments."""

    def __init__(self, argv: list[str], *, port: int = 0) -> None:
        self.argv = argv
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/" if self.port else f"nbd+unix:///?socket={SOCK}"

    def start(self) -> None:
        if not self.port:
            Path(SOCK).unlink(missing_ok=True)
        self.log = Path(f"/tmp/nbd-server-{time.monotonic_ns()}.log")
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), text=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if accepts(self.port, SOCK):
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.argv[0]} did not start")

    def revive(self) -> str | None:
        """Start the server again if it died; what it last said, if so. (nbdkit 1.32 can
        die of an assertion, ``raw_send_socket: Assertion `sock >= 0' failed``, when a
        client vanishes while its delay filter holds that client's requests: seen once in
        six kills in the test VM.)"""
        assert self.proc is not None
        if self.proc.poll() is None:
            return None
        said = self.log.read_text()[-500:]
        self.start()
        return said

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def accepts(port: int, sock: str) -> bool:
    """Whether the server listens (its socket file appears before it does)."""
    with socket.socket() if port else socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(("127.0.0.1", port) if port else sock) == 0


@contextlib.contextmanager
def nbd_server(argv: list[str], port: int = 0) -> Iterator[Server]:
    s = Server(argv, port=port)
    try:
        yield s
    finally:
        s.kill()


def nbdkit(*args: str, tcp: bool = False) -> tuple[list[str], int]:
    port = 10809 if tcp else 0
    where = ["-i", "127.0.0.1", "-p", str(port)] if tcp else ["-U", SOCK]
    return ["nbdkit", "-f", *where, *args], port


def fio(dev: str, *extra: str, size: str = "12M", iodepth: int = 32) -> str:
    return (
        f"fio --name=nbd --filename={dev} --direct=1 --ioengine=libaio --bs=4k "
        f"--iodepth={iodepth} --numjobs=2 --offset_increment=32M --size={size} "
        f"--group_reporting {' '.join(extra)}"
    )


#: fio's options for random writes read back and checked, reported in terse form.
VERIFY = (
    "--rw=randwrite --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 "
    "--output-format=terse --terse-version=3"
)


def fio_verify(dev: str) -> None:
    out = sh(fio(dev, VERIFY), timeout=600).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("3;"))
    assert line.split(";")[4] == "0", out[-2000:]


def ext4_round_trip(dev: str, mnt: Path) -> None:
    mnt.mkdir(exist_ok=True)
    sh(f"mkfs.ext4 -q -F {dev}")
    sh(f"mount {dev} {mnt}")
    sh(
        f"for i in $(seq 1 60); do head -c $((RANDOM * 4)) /dev/urandom > {mnt}/f$i; done; "
        f"sync; (cd {mnt} && sha256sum f* > /tmp/nbd-ext4.sums)",
        timeout=600,
    )
    sh(f"umount {mnt}")
    sh(f"e2fsck -fn {dev}")
    sh(f"mount {dev} {mnt}")
    sh(f"cd {mnt} && sha256sum -c --quiet /tmp/nbd-ext4.sums")
    sh(f"umount {mnt}")


@pytest.mark.parametrize("server", ["nbdkit-memory-unix", "qemu-nbd-qcow2-tcp"])
def test_ext4_and_fio_verify_32_deep_on_two_queues(tmp_path: Path, server: str) -> None:
    if server.startswith("nbdkit"):
        argv, port = nbdkit("memory", "128M")
    else:
        image = tmp_path / "disk.qcow2"
        sh(f"qemu-img create -q -f qcow2 {image} 128M")
        argv, port = (
            [
                "qemu-nbd",
                "-t",
                "-e",
                "4",
                "-f",
                "qcow2",
                "--cache=writeback",
                "-b",
                "127.0.0.1",
                "-p",
                "10810",
                str(image),
            ],
            10810,
        )
    name = f"nbd-{server[:8]}"
    with nbd_server(argv, port) as srv, Daemon("--nbd", srv.uri, "--queues", "2", name=name) as d:
        fio_verify(d.dev)
        assert deepest(name) >= 16, ctl_result(name, "stats")
        status = ctl_result(name, "status")
        assert status["backend"] == f"nbd {srv.uri}" and status["capacity"] == 128 * MiB
        assert all(c["state"] == "connected" for c in status["nbd"]["connections"])
        export = status["nbd"]["export"]
        multi = export["can_multi_conn"]
        assert len(status["nbd"]["connections"]) == (2 if multi else 1)
        # a connection per queue: the native loop drives it; one shared: the Python engine
        engine = "native" if multi else "python"
        assert all(q["engine"] == engine for q in status["queues"]), status["queues"]
        ext4_round_trip(d.dev, tmp_path / "mnt")
        assert d.stop() == 0


def test_injected_errors_fail_exactly_those_requests() -> None:
    """nbdkit's error filter fails 3% of reads with EIO: fio sees exactly as many failed
    reads as the server injected and the device counted, and every other read verifies."""
    argv, _ = nbdkit(
        "--filter=error",
        "memory",
        "64M",
        "error=EIO",
        "error-pread-rate=3%",
        "error-pread-file=/tmp/nbd-fail",
    )
    Path("/tmp/nbd-fail").unlink(missing_ok=True)
    with nbd_server(argv) as srv, Daemon("--nbd", srv.uri, "--queues", "2", name="nbd-errors") as d:
        sh(fio(d.dev, "--rw=write --verify=crc32c --do_verify=0"))  # no errors on writes
        Path("/tmp/nbd-fail").touch()
        p = sh(
            fio(
                d.dev, "--rw=write --verify=crc32c --verify_only --continue_on_error=io --output-format=json"
            ),
            check=False,
        )
        Path("/tmp/nbd-fail").unlink()
        report = json.loads(p.stdout[p.stdout.index("{") :])
        fio_errors = sum(job["total_err"] for job in report["jobs"])
        stats = ctl_result("nbd-errors", "stats")
        srv.kill()
        injected = len(re.findall(r"injecting EIO error into pread", srv.log.read_text()))
        assert injected > 10, srv.log.read_text()[-2000:]
        assert fio_errors == injected == stats["total"]["errors"], (fio_errors, injected, stats)
        assert "verify" not in p.stderr.lower() or "bad" not in p.stderr.lower(), p.stderr


def test_the_server_killed_and_restarted_during_fio_verify() -> None:
    image = make_image(Path("/dev/shm/nbd-restart.img"), 96 * MiB)
    argv, _ = nbdkit("file", str(image))
    before = sh("dmesg").stdout
    try:
        with (
            nbd_server(argv) as srv,
            Daemon("--nbd", srv.uri, "--queues", "2", "--nbd-reconnect", "20", name="nbd-restart") as d,
        ):
            p = subprocess.Popen(
                fio(
                    d.dev,
                    VERIFY,
                    size="24M",
                ),
                shell=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(2):
                time.sleep(2.0)
                srv.kill()
                time.sleep(1.5)  # requests wait meanwhile
                srv.start()
            check_fio(p, d)
            conns = ctl_result("nbd-restart", "status")["nbd"]["connections"]
            assert sum(c["reconnects"] for c in conns) >= 2, conns
            assert "back after" in d.stderr()
            assert d.stop() == 0
    finally:
        image.unlink()
    new = sh("dmesg").stdout[len(before) :]
    assert "I/O error" not in new, new[-2000:]


def test_kill9_of_pyvduse_while_the_server_is_slow() -> None:
    image = make_image(Path("/dev/shm/nbd-kill.img"), 96 * MiB)
    argv, _ = nbdkit("--filter=delay", "file", str(image), "delay-read=5ms", "delay-write=5ms")
    args = ("--queues", "2")
    try:
        with nbd_server(argv) as srv:
            full = ("--nbd", srv.uri, *args)
            d = Daemon(*full, name="nbd-kill")
            p = subprocess.Popen(
                fio(
                    d.dev,
                    VERIFY,
                    size="8M",
                    iodepth=16,
                ),
                shell=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(3):
                time.sleep(2.0)
                d.proc.kill()
                d.proc.wait()
                time.sleep(0.5)  # the server sees the connections go (and may die of it)
                said = srv.revive()  # as its user would: the server's death is not ours to test
                if said is not None:
                    print(f"the NBD server died as the daemon's connections went; started again:\n{said}")
                d = Daemon(*full, name="nbd-kill")  # resumes: /dev/vduse/nbd-kill is still there
                assert "resumed" in d.stderr(), d.stderr()
            state = Path("/run/pyvduse/nbd-kill/state").read_bytes()
            assert srv.uri.encode() in state
            check_fio(p, d)
            assert d.stop(signal.SIGTERM) == 0
    finally:
        image.unlink()


def test_resize_with_no_size_reads_the_servers_new_size(tmp_path: Path) -> None:
    image = make_image(tmp_path / "grow.img", 32 * MiB)
    argv, _ = nbdkit("file", str(image))
    with nbd_server(argv) as srv, Daemon("--nbd", srv.uri, name="nbd-grow") as d:
        dev = Path(d.dev).name
        with open(image, "ab") as f:
            f.truncate(48 * MiB)
        result = ctl_result("nbd-grow", "resize")
        assert result["size"] == 48 * MiB
        deadline = time.monotonic() + 10
        while int(Path(f"/sys/block/{dev}/size").read_text()) != 48 * MiB // 512:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        sh(f"dd if=/dev/urandom of={d.dev} bs=1M seek=47 count=1 oflag=direct")
        assert d.stop() == 0
