"""The NBD backend against real nbdkit servers on this host, served through the model.

Skipped where nbdkit or libnbd's Python binding is missing (``.ci/run`` installs both).
The same backend on the real kernel, with qemu-nbd too: tests/vm/test_nbd_e2e.py.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import bit
from pyvduse.backend import nbd_binding, nbd_uri
from pyvduse.backend.nbd import NbdBackend, NbdError
from pyvduse.cli.blk import nbd_options
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.fastpath import engine as native
from pyvduse.model.blk_driver import BlkDriver, BlkIOError
from pyvduse.ops.client import request
from pyvduse.runtime.native_worker import NativeQueueWorker
from pyvduse.runtime.tuning import DataPath
from pyvduse.testing.rig import ModelRig
from tests.unit.test_cli import one_line_error, pyvduse
from tests.unit.test_ops_socket import served, short_dir


def blk_of(rig: ModelRig) -> BlkDevice:
    assert isinstance(rig.device, BlkDevice)
    return rig.device


needs_nbd = pytest.mark.skipif(
    shutil.which("nbdkit") is None or not nbd_binding.available(),
    reason="needs nbdkit and libnbd's Python binding (apt install nbdkit python3-libnbd)",
)
sock_dir = pytest.fixture(name="sock_dir")(short_dir)
MiB = 1 << 20


class Nbdkit:
    """One nbdkit serving on a Unix socket (or TCP on loopback), restartable."""

    def __init__(self, where: Path, *args: str, tcp: bool = False) -> None:
        self.sock = where / "nbd.sock"
        self.args = list(args)
        self.port = _free_port() if tcp else 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def uri(self) -> str:
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/"
        return f"nbd+unix:///?socket={self.sock}"

    def start(self, *args: str) -> None:
        if args:
            self.args = list(args)
        self.sock.unlink(missing_ok=True)
        where = ["-i", "127.0.0.1", "-p", str(self.port)] if self.port else ["-U", str(self.sock)]
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", *where, *self.args], stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _accepts(self.port, self.sock):
                return
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            time.sleep(0.01)
        raise TimeoutError("nbdkit did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stderr(self) -> str:
        self.kill()
        assert self.proc is not None and self.proc.stderr is not None
        return self.proc.stderr.read().decode()


def _accepts(port: int, sock: Path | str) -> bool:
    """Whether the server listens (its socket file appears before it does)."""
    with socket.socket() if port else socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(("127.0.0.1", port) if port else str(sock)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nbdkit(sock_dir: Path) -> Iterator[list[Nbdkit]]:
    servers: list[Nbdkit] = []
    yield servers
    for s in servers:
        s.kill()


ENGINES = [DataPath.NATIVE, DataPath.PYTHON]


def serve(
    backend: NbdBackend, queues: int = 1, data_path: DataPath = DataPath.AUTO, **options: object
) -> ModelRig:
    opts = nbd_options(backend, BlkOptions(num_queues=queues, **options))  # type: ignore[arg-type]
    return ModelRig(BlkDevice(backend, opts), data_path=data_path)


def engines(rig: ModelRig) -> set[str]:
    assert rig.server.running.wait(10)
    return {"native" if isinstance(w, NativeQueueWorker) else "python" for w in rig.server.workers.values()}


# -- without a server ----------------------------------------------------------------------


def test_the_native_nbd_path_is_built_where_ci_requires_it() -> None:
    if os.environ.get("PYVDUSE_REQUIRE_NATIVE") == "1" and Path("/usr/include/libnbd.h").exists():
        assert native.nbd_built(), "pip install did not build pyvduse.fastpath._splitblk_full"


def test_uris_are_checked_and_shown_without_credentials() -> None:
    assert (
        nbd_uri.redact("nbds://alice@disk.example:10810/vol?tls-psk-file=/k.psk")
        == "nbds://disk.example:10810/vol"
    )
    assert (
        nbd_uri.redact("nbds+unix://bob@/e?socket=/run/s.sock&tls-certificates=/c")
        == "nbds+unix:///e?socket=/run/s.sock"
    )
    assert nbd_uri.redact("nbd://[::1]/x") == "nbd://[::1]/x"
    for bad, word in (
        ("http://h/", "not an NBD URI"),
        ("nbd+unix:///e", "socket"),
        ("nbd:///e", "no server"),
    ):
        with pytest.raises(ValueError, match=word):
            nbd_uri.check(bad)


def test_without_libnbd_nbd_says_what_to_install_and_nothing_else_needs_it() -> None:
    code = (
        "import sys\n"
        "import pyvduse.backend.nbd_binding as b\n"
        "b.SYSTEM_DIRS = ()\n"
        "sys.modules['nbd'] = None\n"  # as if no binding were installed anywhere
        "from pyvduse.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "blk", "--name", "x", "--nbd", "nbd://127.0.0.1/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_line_error(p, "apt install python3-libnbd")
    p = pyvduse("blk", "--name", "x", "--null", "1M")  # no VDUSE here: past the backend
    assert "libnbd" not in p.stderr


def test_a_null_daemon_does_not_load_libnbd() -> None:
    code = (
        "import sys\n"
        "from pyvduse.cli.main import build_parser\n"
        "build_parser('blk').parse_args(['blk', '--name', 'x', '--null', '1M'])\n"
        "import pyvduse.cli.blk\n"
        "print('nbd' in sys.modules, 'libnbdmod' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.split() == ["False", "False"]


@needs_nbd
def test_no_server_is_one_line_that_names_the_uri(sock_dir: Path) -> None:
    p = pyvduse("blk", "--name", "x", "--nbd", f"nbd+unix:///?socket={sock_dir}/none.sock")
    one_line_error(p, "cannot connect to nbd+unix:///?socket=", "is the server running")
    p = pyvduse("blk", "--name", "x", "--nbd", "http://example/")
    one_line_error(p, "not an NBD URI")


# -- serving -------------------------------------------------------------------------------


@needs_nbd
@pytest.mark.parametrize("data_path", ENGINES, ids=["native", "python"])
def test_many_requests_in_flight_on_two_queues_over_two_connections(
    sock_dir: Path, nbdkit: list[Nbdkit], data_path: DataPath
) -> None:
    """Writes then reads of random data, 32 in flight per queue, completed out of order."""
    if data_path is DataPath.NATIVE and not native.nbd_built():
        pytest.skip("the native data path was built without libnbd")
    server = Nbdkit(sock_dir, "--filter=delay", "memory", "8M", "rdelay=2ms", "wdelay=2ms")
    nbdkit.append(server)
    backend = NbdBackend(server.uri, connections=2)
    assert len(backend.connections) == 2  # nbdkit memory advertises multi-conn
    with serve(backend, queues=2, data_path=data_path) as rig:
        drv = BlkDriver(rig.kernel)
        assert engines(rig) == {data_path.value}
        writer, reader = drv.virtio.queues
        image = bytearray(2 * MiB)  # the server's memory disk starts zeroed
        for burst in range(8):  # 32 writes in flight on queue 0, then 32 reads on queue 1
            offsets = random.sample(range(0, len(image), 4096), 32)
            pending = {}
            for off in offsets:
                data = os.urandom(4096)
                image[off : off + 4096] = data
                t = writer.submit([vb.OUTHDR.pack(vb.ReqType.OUT, 0, off // 512), data], [1])
                pending[t] = off
            for t in pending:
                assert writer.wait(t, 10).data[-1] == vb.ReqStatus.OK
            pending = {
                reader.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, off // 512)], [4096, 1]): off
                for off in random.sample(range(0, len(image), 4096), 32)
            }
            for t, off in pending.items():
                c = reader.wait(t, 10)
                assert c.data[-1] == vb.ReqStatus.OK, burst
                assert c.data[:-1] == image[off : off + 4096]
        # one request in several pieces: one NBD command through our buffer
        t = reader.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, 0)], [512, 1536, 2048, 1])
        assert bytes(reader.wait(t, 10).data[:-1]) == image[:4096]
        depth = rig.server.queue_counters[1].depth_hist
        assert sum(depth[5:]) > 0  # requests taken with 16 or more in flight
        drv.flush()
        drv.write_zeroes(0, 8192, unmap=False)
        drv.discard(8192, 8192)
        assert drv.read(0, 8192) == bytes(8192)
    backend.close()


@needs_nbd
def test_the_export_decides_what_the_device_offers(sock_dir: Path, nbdkit: list[Nbdkit]) -> None:
    server = Nbdkit(sock_dir, "memory", "4M")
    nbdkit.append(server)
    b = NbdBackend(server.uri)
    device = BlkDevice(b, nbd_options(b, BlkOptions()))
    f = device.offered_features()
    for feature in (vb.F_FLUSH, vb.F_DISCARD, vb.F_WRITE_ZEROES):
        assert f & bit(feature)
    assert not f & bit(vb.F_RO) and device.capacity_bytes == 4 * MiB
    b.close()

    server.kill()
    server.start(
        "-r",
        "--filter=nozero",
        "--filter=multi-conn",
        "--filter=blocksize-policy",
        "memory",
        "4M",
        "zeromode=none",
        "multi-conn-mode=disable",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
    )
    b = NbdBackend(server.uri, connections=4)
    assert len(b.connections) == 1  # no multi-conn: one connection for every queue
    device = BlkDevice(b, nbd_options(b, BlkOptions(num_queues=4)))
    f = device.offered_features()
    assert f & bit(vb.F_RO) and not f & bit(vb.F_WRITE_ZEROES) and not f & bit(vb.F_DISCARD)
    cfg = device.config()
    assert cfg.blk_size == 4096 and cfg.physical_block_exp == 4 and cfg.opt_io_size == 16
    with ModelRig(device) as rig:
        drv = BlkDriver(rig.kernel)
        assert engines(rig) == {"python"}  # queues sharing a connection
        assert drv.read(0, 4096) == bytes(4096)
        with pytest.raises(BlkIOError):
            drv.write(0, b"x" * 4096)
    b.close()


@needs_nbd
def test_a_failing_server_fails_exactly_those_requests(sock_dir: Path, nbdkit: list[Nbdkit]) -> None:
    trigger = sock_dir / "fail"
    server = Nbdkit(
        sock_dir,
        "--filter=error",
        "memory",
        "4M",
        "error=EIO",
        "error-pread-rate=100%",
        f"error-pread-file={trigger}",
    )
    nbdkit.append(server)
    b = NbdBackend(server.uri)
    with serve(b) as rig:
        drv = BlkDriver(rig.kernel)
        drv.write(0, b"k" * 4096)
        trigger.touch()
        with pytest.raises(BlkIOError):
            drv.read(0, 4096)
        drv.write(4096, b"w" * 4096)  # writes still work
        trigger.unlink()
        assert drv.read(0, 8192) == b"k" * 4096 + b"w" * 4096
        assert blk_of(rig).stats.errors == 1
        assert all(c.state == "connected" for c in b.connections)
    b.close()


@needs_nbd
@pytest.mark.parametrize(
    ("tcp", "data_path"),
    [(False, DataPath.AUTO), (True, DataPath.AUTO), (False, DataPath.PYTHON)],
    ids=["unix", "tcp", "unix-python"],
)
def test_a_server_that_comes_back_within_the_window_loses_nothing(
    sock_dir: Path, nbdkit: list[Nbdkit], tcp: bool, data_path: DataPath
) -> None:
    img = sock_dir / "disk.img"
    img.write_bytes(bytes(4 * MiB))
    server = Nbdkit(sock_dir, "file", str(img), tcp=tcp)
    nbdkit.append(server)
    b = NbdBackend(server.uri, reconnect_seconds=10)
    with serve(b, data_path=data_path) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        data = {i: os.urandom(4096) for i in range(64)}
        server.kill()
        tickets = [q.submit([vb.OUTHDR.pack(vb.ReqType.OUT, 0, i * 8), d], [1]) for i, d in data.items()]
        time.sleep(0.5)
        assert b.connections[0].state == "reconnecting"
        server.start()
        for t in tickets:
            assert q.wait(t, 15).data[-1] == vb.ReqStatus.OK
        for i, d in data.items():
            t = q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, i * 8)], [4096, 1])
            c = q.wait(t, 10)
            assert c.data[-1] == vb.ReqStatus.OK and c.data[:-1] == d
        assert blk_of(rig).stats.errors == 0 and b.connections[0].reconnects == 1
    b.close()


@needs_nbd
@pytest.mark.parametrize("data_path", [DataPath.AUTO, DataPath.PYTHON], ids=["auto", "python"])
def test_past_the_window_requests_fail_and_later_ones_reconnect(
    sock_dir: Path, nbdkit: list[Nbdkit], data_path: DataPath, caplog: pytest.LogCaptureFixture
) -> None:
    img = sock_dir / "disk.img"
    img.write_bytes(b"d" * MiB)
    server = Nbdkit(sock_dir, "file", str(img))
    nbdkit.append(server)
    b = NbdBackend(server.uri, reconnect_seconds=0.5)
    with serve(b, data_path=data_path) as rig:
        drv = BlkDriver(rig.kernel)
        server.kill()
        with caplog.at_level(logging.ERROR, logger="pyvduse.backend.nbd"), pytest.raises(BlkIOError):
            drv.read(0, 512)
        assert "no server within 0.5 s" in caplog.text  # it failed when the window ended
        server.start()
        assert drv.read(0, 512) == b"d" * 512
        # the server comes back with another disk: refused, the device fails I/O
        server.kill()
        img.write_bytes(b"e" * 2 * MiB)
        server.start()
        with pytest.raises(BlkIOError):
            drv.read(0, 512)
        assert b.connections[0].refused >= 1
    b.close()


@needs_nbd
def test_tls_with_a_psk_and_no_credentials_anywhere(
    sock_dir: Path, nbdkit: list[Nbdkit], caplog: pytest.LogCaptureFixture
) -> None:
    psk = sock_dir / "keys.psk"
    psk.write_text(f"alice:{os.urandom(16).hex()}\n")
    server = Nbdkit(sock_dir, "--tls=require", f"--tls-psk={psk}", "memory", "1M")
    nbdkit.append(server)
    uri = f"nbds+unix://alice@/?socket={server.sock}&tls-psk-file={psk}"
    with pytest.raises(NbdError):  # the server insists on TLS
        NbdBackend(f"nbd+unix:///?socket={server.sock}")
    caplog.set_level(logging.INFO)
    b = NbdBackend(uri)
    with serve(b) as rig:
        drv = BlkDriver(rig.kernel)
        drv.write(0, b"t" * 512)
        assert drv.read(0, 512) == b"t" * 512
        identity = str(rig.device.identity())
        server.kill()
        server.start()
        assert drv.read(0, 512) == bytes(512)  # a new memory disk of the same size
    b.close()
    shown = identity + caplog.text + str(b.status())
    assert "psk" not in shown and "alice" not in shown and "nbds+unix:///?socket=" in shown


@needs_nbd
def test_resize_with_no_size_rereads_the_export(sock_dir: Path, nbdkit: list[Nbdkit]) -> None:
    img = sock_dir / "disk.img"
    img.write_bytes(bytes(MiB))
    server = Nbdkit(sock_dir, "file", str(img))
    nbdkit.append(server)
    b = NbdBackend(server.uri)
    device = BlkDevice(b, nbd_options(b, BlkOptions()))
    with served(sock_dir, device) as (_rig, drv, ops, _):
        assert drv is not None
        with open(img, "ab") as f:
            f.truncate(3 * MiB)
        r = request(ops.control_path, {"cmd": "resize"})
        assert r == {"result": {"old_size": MiB, "size": 3 * MiB, "changed": True}}
        assert drv.capacity == 3 * MiB
        drv.write(3 * MiB - 512, b"n" * 512)  # past the old end: the server takes it
        assert drv.read(3 * MiB - 512, 512) == b"n" * 512
        r = request(ops.control_path, {"cmd": "resize", "size": "4M"})
        assert r["error"]["code"] == "unsupported"
        status = request(ops.control_path, {"cmd": "status"})["result"]
        assert status["nbd"]["connections"][0]["state"] == "connected"
        # a reconnect now expects the new size
        server.kill()
        server.start()
        assert drv.read(3 * MiB - 512, 512) == b"n" * 512
    b.close()


@needs_nbd
def test_close_with_the_server_gone_does_not_wait(sock_dir: Path, nbdkit: list[Nbdkit]) -> None:
    server = Nbdkit(sock_dir, "memory", "1M")
    nbdkit.append(server)
    b = NbdBackend(server.uri, reconnect_seconds=60)
    server.kill()
    errors: list[BaseException | None] = []
    b.start(0, "readv", (0, [memoryview(bytearray(512))]), errors.append)
    time.sleep(0.2)
    b.close()
    # failed by close itself (ESHUTDOWN), not by the end of the 60 s window (EIO)
    assert len(errors) == 1 and isinstance(errors[0], OSError) and errors[0].errno == errno.ESHUTDOWN
    assert b.connections[0].state == "closed"


@needs_nbd
def test_a_reset_with_commands_at_a_hung_server_abandons_them_and_serves_on(
    sock_dir: Path, nbdkit: list[Nbdkit]
) -> None:
    """The driver resets the device while the server holds reads for 3 s: the queue gives
    them the grace period (also the one Python serves inline), drops them (their memory
    fenced), answers in time, and the backend serves on."""
    server = Nbdkit(sock_dir, "--filter=delay", "memory", "4M", "delay-read=3")
    nbdkit.append(server)
    b = NbdBackend(server.uri)
    opts = nbd_options(b, BlkOptions())
    with ModelRig(BlkDevice(b, opts), msg_timeout=2.0) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        for i in range(8):
            q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, i * 8)], [4096, 1])
        time.sleep(0.3)
        rig.kernel.set_status(0)  # the driver resets the device
        assert not rig.kernel.broken  # answered within msg_timeout (2 s), not after 3 s
    m = memoryview(bytearray(512))
    b.readv(0, [m])  # the backend serves on, on a connection of its own
    b.close()
