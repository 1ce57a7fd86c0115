"""The NBD backend against a server that lies (pyvduse.testing.hostile_nbd), on both engines.

Every reply is matched to the command that asked for it; nothing is resent while its
original may still complete (the server records any command it gets again while the same
one is unanswered on an open connection); a connection that says ESHUTDOWN is replaced;
resends back off and end in IOERR after the reconnect window; the memory the daemon
allocates for a request does not follow what the driver's descriptors say.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import (
    DESC_SIZE,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvduse.backend import nbd as nbd_module
from pyvduse.backend import nbd_binding
from pyvduse.backend.nbd import NbdBackend
from pyvduse.fastpath import engine as native
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.model.split_driver import DriverSplitRing
from pyvduse.model.virtio_driver import DriverQueue
from pyvduse.runtime.native_worker import NativeQueueWorker
from pyvduse.runtime.tuning import DataPath
from pyvduse.testing.hostile_nbd import CMD_READ, Command, HostileNbdServer, Reply
from tests.unit.test_nbd import serve
from tests.unit.test_ops_socket import short_dir

pytestmark = pytest.mark.skipif(
    not nbd_binding.available(), reason="needs libnbd's Python binding (apt install python3-libnbd)"
)
sock_dir = pytest.fixture(name="sock_dir")(short_dir)
MiB = 1 << 20
ESHUTDOWN = 108


@pytest.fixture(params=[DataPath.NATIVE, DataPath.PYTHON], ids=["native", "python"])
def data_path(request: pytest.FixtureRequest) -> DataPath:
    path: DataPath = request.param
    if path is DataPath.NATIVE and not native.nbd_built():
        pytest.skip("the native data path was built without libnbd")
    return path


@pytest.fixture
def server(sock_dir: Path) -> Iterator[HostileNbdServer]:
    with HostileNbdServer(sock_dir / "hostile.sock", size=32 * MiB) as s:
        for i in range(0, len(s.data), 4096):
            s.data[i : i + 4096] = (i // 4096 % 251).to_bytes(1, "little") * 4096
        yield s


def pattern(off: int) -> bytes:
    return (off // 4096 % 251).to_bytes(1, "little") * 4096


def read_ticket(q: DriverQueue, off: int) -> int:
    return q.submit([vb.OUTHDR.pack(vb.ReqType.IN, 0, off // 512)], [4096, 1])


def test_eshutdown_on_one_command_of_a_live_connection_replaces_it_before_any_resend(
    server: HostileNbdServer, data_path: DataPath
) -> None:
    """The server answers one read with ESHUTDOWN and keeps the connection open, with the
    other reads still unanswered: they are sent again only on a new connection, and every
    request gets exactly its own data."""
    told = threading.Event()

    def policy(cmd: Command) -> Reply:
        if cmd.conn == 0 and cmd.kind == CMD_READ and cmd.offset == 28672 and not told.is_set():
            told.set()
            return Reply(error=ESHUTDOWN, delay=0.1)
        return Reply(delay=1.0 if cmd.conn == 0 else 0.0)

    server.policy = policy
    b = NbdBackend(server.uri, reconnect_seconds=10)
    with serve(b, data_path=data_path) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        offsets = [i * 4096 for i in range(8)]
        tickets = {read_ticket(q, off): off for off in offsets}
        for t, off in tickets.items():
            c = q.wait(t, 20)
            assert c.data[-1] == vb.ReqStatus.OK and bytes(c.data[:-1]) == pattern(off)
        assert server.resent_early == [], server.commands
        assert server.connections >= 2, server.commands  # the lying connection was replaced
        # the device serves on, on the new connection
        t = read_ticket(q, 65536)
        assert bytes(q.wait(t, 10).data[:-1]) == pattern(65536)
    b.close()


def test_a_server_that_says_eshutdown_every_time_backs_off_logs_once_then_ioerr(
    server: HostileNbdServer, data_path: DataPath, caplog: pytest.LogCaptureFixture
) -> None:
    server.policy = lambda cmd: Reply(error=ESHUTDOWN) if cmd.kind == CMD_READ else Reply()
    caplog.set_level(logging.WARNING)
    b = NbdBackend(server.uri, reconnect_seconds=1.0)
    with serve(b, data_path=data_path) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        t = read_ticket(q, 0)
        assert q.wait(t, 20).data[-1] == vb.ReqStatus.IOERR
        # backoff: a handful of connections in the 1 s window, not hundreds
        assert server.connections <= 12, server.connections
        assert len(server.commands) <= 12, len(server.commands)
        lost = [r for r in caplog.records if "lost" in r.getMessage()]
        assert 1 <= len(lost) <= 3, [r.getMessage() for r in lost]
        # later requests try again (a new window), and the server now answers them
        server.policy = lambda cmd: Reply()
        t = read_ticket(q, 4096)
        c = q.wait(t, 20)
        assert c.data[-1] == vb.ReqStatus.OK and bytes(c.data[:-1]) == pattern(4096)
    b.close()


def _aliased_read(q: DriverQueue, sector: int, data: int, pieces: int, piece: int) -> int:
    """A read whose ``pieces`` writable descriptors all name the same ``piece`` bytes of
    driver memory at ``data`` (an indirect table: one ring slot)."""
    ring = q.ring
    assert isinstance(ring, DriverSplitRing)
    arena = ring.arena
    hdr = arena.alloc(16)
    arena.write(hdr, vb.OUTHDR.pack(vb.ReqType.IN, 0, sector))
    status = arena.alloc(1)
    bufs = [(hdr, 16, 0)] + [(data, piece, VRING_DESC_F_WRITE)] * pieces + [(status, 1, VRING_DESC_F_WRITE)]
    table = arena.alloc(DESC_SIZE * len(bufs), 16)
    for k, (iova, n, f) in enumerate(bufs):
        f |= VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0
        arena.write(table + DESC_SIZE * k, VRING_DESC.pack(iova, n, f, k + 1))
    with q.lock:
        head = ring.free.pop()
        ring.write_desc(head, table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0)
        ring.pending[head] = ([head], [(status, 1)], (-head - 1, None), [hdr, status, table])
        ring.set_avail_entry(ring.avail_idx, head)
        ring.set_avail_idx(ring.avail_idx + 1)
    q.kernel.kick(q.index)
    return head


def test_the_bounce_memory_of_a_request_does_not_follow_the_drivers_descriptors(
    server: HostileNbdServer, data_path: DataPath
) -> None:
    """Reads that each name the same 1 MiB of driver memory 16 times: what the daemon
    allocates for them stays within its per-request chunk, not 16 MiB each."""
    server.policy = lambda cmd: Reply(delay=0.3)
    b = NbdBackend(server.uri)
    with serve(b, data_path=data_path, queue_size=256) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        data = q.ring.arena.alloc(MiB, 4096)
        requests, pieces = 4, 16
        tracemalloc.start()
        try:
            heads = [_aliased_read(q, 0, data, pieces, MiB) for _ in range(requests)]
            done: set[int] = set()
            while len(done) < len(heads):
                for c in q.ring.collect():
                    assert c.data[-1] == vb.ReqStatus.OK
                    done.add(c.head)
                q.irq.wait(0.05)
                q.irq.clear()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        workers = rig.server.workers.values()
        if data_path is DataPath.NATIVE:
            (w,) = workers
            assert isinstance(w, NativeQueueWorker)
            peak = w.engine.counters()["bounce_peak"]
        assert peak <= requests * 2 * MiB, peak
    b.close()


def test_a_handle_that_died_before_its_thread_drove_it_is_replaced(
    server: HostileNbdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python engine: a send on the queue's worker finds the connection dead (and says
    so) while the connection's thread is about to drive that handle. The thread then meets
    a dead handle; it replaces it and serves on, instead of dying with the requests of the
    queue left waiting for good (seen in the suite under load: 'connection 0's thread
    failed', nbd_aio_get_fd on a handle no longer connected)."""
    original = nbd_module._Connection._serve
    killed: list[int] = []

    def serve_a_dead_handle_first(conn: Any, handle: Any, generation: int) -> None:
        if not killed:  # as _issue does on another thread: the socket dead, the loss said
            killed.append(generation)
            nbd_module._kill(handle)
            with contextlib.suppress(Exception):
                handle.aio_notify_read()
            assert handle.aio_is_dead() or handle.aio_is_closed()
            conn._lost(generation, "killed by the test")
        original(conn, handle, generation)

    monkeypatch.setattr(nbd_module._Connection, "_serve", serve_a_dead_handle_first)
    b = NbdBackend(server.uri, reconnect_seconds=10)
    with serve(b, data_path=DataPath.PYTHON) as rig:
        q = BlkDriver(rig.kernel).virtio.queues[0]
        c = q.wait(read_ticket(q, 8192), 20)
        assert c.data[-1] == vb.ReqStatus.OK and bytes(c.data[:-1]) == pattern(8192)
        assert killed and server.connections >= 2
    b.close()
