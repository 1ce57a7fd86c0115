"""The management socket on the in-process model: protocol, errors, clients, lifecycle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyvduse.backend.memory import MemoryBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.errors import ConfigError
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.ops import protocol
from pyvduse.ops.client import NoDaemon, request
from pyvduse.ops.service import Operations, OpsOptions
from pyvduse.testing.rig import ModelRig

MiB = 1 << 20


def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    d = tempfile.mkdtemp(prefix="ops-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


sock_dir = pytest.fixture(name="sock_dir")(short_dir)


@contextmanager
def served(
    sock_dir: Path, device: BlkDevice | None = None, *, probe: bool = True, **options: object
) -> Iterator[tuple[ModelRig, BlkDriver | None, Operations, threading.Event]]:
    device = device or BlkDevice(MemoryBackend(8 * MiB), BlkOptions(num_queues=2))
    quit_event = threading.Event()
    with ModelRig(device) as rig:
        drv = BlkDriver(rig.kernel) if probe else None
        assert not probe or rig.server.running.wait(10)  # queues start just after DRIVER_OK
        ops = Operations(
            "t0",
            rig.server,
            rig.transport,
            OpsOptions(control=str(sock_dir / "t0.sock"), **options),  # type: ignore[arg-type]
            on_quit=quit_event.set,
        )
        ops.start()
        try:
            yield rig, drv, ops, quit_event
        finally:
            ops.close()


class Conn:
    """A raw client: send bytes, read reply lines."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, object]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out = json.loads(line)
        assert isinstance(out, dict)
        return out

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def error_code(reply: dict[str, object]) -> str:
    err = reply["error"]
    assert isinstance(err, dict) and set(err) == {"code", "message"}, reply
    assert err["code"] in protocol.ERROR_CODES
    return str(err["code"])


def test_status_reports_features_status_queues_and_backend(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, drv, ops, _):
        assert drv is not None
        drv.write(0, b"a" * 4096, queue=0)
        ops.ready("/dev/vdz")
        r = request(ops.control_path, {"cmd": "status"})["result"]
        assert r["name"] == "t0" and r["state"] == "serving" and r["node"] == "/dev/vdz"
        assert r["device"] == "virtio-blk" and r["ring"] == "split"
        assert r["status"] == 0x0F and "DRIVER_OK" in r["status_names"]
        assert {"VERSION_1", "ACCESS_PLATFORM", "FLUSH", "MQ"} <= set(r["feature_names"])
        assert int(r["features"], 16) == drv.virtio.features
        assert r["backend"] == "memory" and r["capacity"] == 8 * MiB and r["block_size"] == 512
        assert [q["index"] for q in r["queues"]] == [0, 1]
        q0 = r["queues"][0]
        assert q0["served"] and q0["size"] == 256
        assert q0["avail_idx"] == q0["last_avail_idx"] == q0["used_idx"] == 1
        assert q0["pending"] == 0 and q0["in_flight"] == 0 and q0["broken"] is None
        assert r["control"] == ops.control_path
        assert (r["vduse_api"], r["vduse_features"]) == (None, [])  # the model is no VDUSE


def test_status_before_the_driver_comes(sock_dir: Path) -> None:
    with served(sock_dir, probe=False) as (_rig, _drv, ops, _):
        r = request(ops.control_path, {"cmd": "status"})["result"]
        assert r["state"] == "starting" and not r["driver_ok"] and r["status"] == 0
        assert r["features"] == "0x0" and not any(q["served"] for q in r["queues"])


def test_stats_count_requests_bytes_errors_and_latency(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, drv, ops, _):
        assert drv is not None
        for i in range(5):
            drv.write(i * 4096, bytes([i]) * 4096, queue=0)
        for i in range(3):
            drv.read(i * 4096, 8192, queue=1)
        drv.flush()  # round robin: on some queue
        status, _, _ = drv.request(77, queue=1)  # unsupported type: an error
        assert status != 0
        with pytest.raises(OSError):
            drv.read(8 * MiB, 512, queue=1)  # out of range: an error
        r = request(ops.control_path, {"cmd": "stats"})["result"]
        q0, q1 = r["queues"]
        assert q0["requests"]["write"] == 5 and q0["bytes_written"] == 5 * 4096
        assert q1["requests"]["read"] == 4 and q1["bytes_read"] == 3 * 8192
        assert q1["requests"]["type_77"] == 1 and q1["errors"] == 2
        t = r["total"]
        assert t["requests"]["flush"] == 1
        assert t["requests_total"] == 5 + 4 + 1 + 1 == t["completed"]
        assert t["in_flight"] == 0
        for q in (q0, q1, t):
            lat = q["latency"]
            assert lat["count"] == q["completed"] and lat["sum_us"] > 0
            assert sum(n for _, n in lat["buckets"]) == lat["count"]
            bounds = [b for b, _ in lat["buckets"]]
            assert bounds == [1 << i for i in range(len(bounds))]


def test_error_replies(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        c = Conn(ops.control_path)
        c.send(b"this is not json\n")
        assert error_code(c.line()) == "bad-request"
        c.send(b"[1, 2]\n")
        assert error_code(c.line()) == "bad-request"
        c.send(b'{"command": "status"}\n')
        assert error_code(c.line()) == "bad-request"
        c.send(b'{"cmd": 7}\n')
        assert error_code(c.line()) == "bad-request"
        c.send(b'{"cmd": "frobnicate", "id": 9}\n')
        r = c.line()
        assert error_code(r) == "unknown-command" and r["id"] == 9
        assert "status" in r["error"]["message"]  # type: ignore[index]
        c.send(b'{"cmd": "status", "verbose": true}\n')
        assert error_code(c.line()) == "invalid-argument"
        c.send(b'{"cmd": "resize", "size": "12X"}\n')
        assert error_code(c.line()) == "invalid-argument"
        c.send(b'{"cmd": "resize", "size": 1000}\n')
        assert error_code(c.line()) == "unsupported"  # a memory backend
        c.send(b"\n\n")  # blank lines are ignored, the connection still works
        c.send(b'{"cmd": "status", "id": "x"}\n')
        r = c.line()
        assert "result" in r and r["id"] == "x"
        c.close()


def test_overlong_line_is_refused_and_the_client_dropped(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        c = Conn(ops.control_path)
        with contextlib.suppress(OSError):  # the server may drop us while we still send
            c.send(b"x" * (protocol.MAX_LINE + 10))
        with contextlib.suppress(EOFError, OSError):  # or before we read the reply
            assert error_code(c.line()) == "bad-request"
        assert c.closed()
        assert "result" in request(ops.control_path, {"cmd": "status"})  # others unaffected


def test_pipelined_requests_get_replies_in_order(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        c = Conn(ops.control_path)
        reqs = [
            {"cmd": "stats", "id": 1},
            {"cmd": "resize", "size": 1, "id": 2},
            {"cmd": "status", "id": 3},
            {"cmd": "nope", "id": 4},
        ]
        c.send(b"".join(protocol.encode(r) for r in reqs))
        assert [c.line()["id"] for _ in reqs] == [1, 2, 3, 4]
        c.close()


def test_half_closed_client_gets_its_answer(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        c = Conn(ops.control_path)
        c.send(b'{"cmd": "status"}')  # no newline, then end of input (like echo -n | nc)
        c.sock.shutdown(socket.SHUT_WR)
        assert "result" in c.line()
        assert c.closed()


def test_many_clients_at_once(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, drv, ops, _):
        assert drv is not None
        idle = [Conn(ops.control_path) for _ in range(10)]  # connected, saying nothing
        idle[0].send(b'{"cmd": "sta')  # half a request
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                for _ in range(20):
                    assert "result" in request(ops.control_path, {"cmd": "stats", "id": n})
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for i in range(50):
            drv.write(i * 512, b"z" * 512)
        for t in threads:
            t.join()
        assert not errors
        idle[0].send(b'tus"}\n')
        assert "result" in idle[0].line()
        for c in idle:
            c.close()


def test_quit_calls_back_after_replying(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, quit_event):
        assert request(ops.control_path, {"cmd": "quit"}) == {"result": {"stopping": True}}
        assert quit_event.wait(10)
        assert request(ops.control_path, {"cmd": "status"})["result"]["state"] == "stopping"


def test_help_lists_commands(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        cmds = request(ops.control_path, {"cmd": "help"})["result"]["commands"]
        assert {"status", "stats", "resize", "quit"} <= set(cmds)


def test_socket_is_0600_and_removed_on_close(sock_dir: Path) -> None:
    path = sock_dir / "t0.sock"
    with served(sock_dir):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert [p.name for p in sock_dir.iterdir()] == ["t0.sock"]  # no temporary left
    assert not path.exists()
    with pytest.raises(NoDaemon):
        request(str(path), {"cmd": "status"})


def test_stale_socket_is_replaced_live_one_refused(sock_dir: Path) -> None:
    path = sock_dir / "t0.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: left by a killed daemon
    with pytest.raises(NoDaemon):
        request(str(path), {"cmd": "status"})
    with served(sock_dir) as (_rig, _drv, ops, _):
        assert "result" in request(ops.control_path, {"cmd": "status"})
        with pytest.raises(ConfigError, match="another running daemon"), served(sock_dir):
            pass
        assert "result" in request(ops.control_path, {"cmd": "status"})  # still ours
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"), served(sock_dir):
        pass


def test_socket_replaced_by_someone_else_is_not_removed(sock_dir: Path) -> None:
    path = sock_dir / "t0.sock"
    with served(sock_dir):
        path.unlink()
        path.write_text("someone else's")
    assert path.read_text() == "someone else's"


def test_socket_directory_is_created(sock_dir: Path) -> None:
    with ModelRig(BlkDevice(MemoryBackend(MiB))) as rig:
        ops = Operations(
            "t1", rig.server, rig.transport, OpsOptions(control=str(sock_dir / "run" / "t1.sock"))
        )
        ops.start()
        try:
            assert "result" in request(ops.control_path, {"cmd": "status"})
        finally:
            ops.close()


def test_close_is_quick_with_clients_connected(sock_dir: Path) -> None:
    with served(sock_dir) as (_rig, _drv, ops, _):
        c = Conn(ops.control_path)  # connected, never sends, never hangs up
        assert ops.socket is not None and ops.socket._thread is not None
        thread = ops.socket._thread
    # close() ended the socket's thread (it did not give up on it after its join timeout)
    # and hung up on the client
    assert not thread.is_alive()
    assert c.closed()


def test_protocol_helpers() -> None:
    assert protocol.default_control_path("vd0") == "/run/pyvduse/vd0.sock"
    assert protocol.encode({"cmd": "status"}) == b'{"cmd":"status"}\n'
    with pytest.raises(protocol.OpsError) as e:
        protocol.decode_request(b"\xff\xfe")
    assert e.value.code == "bad-request"
    assert protocol.error_reply("failed", "x", 3) == {"error": {"code": "failed", "message": "x"}, "id": 3}
