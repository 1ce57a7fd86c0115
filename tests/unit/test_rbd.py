"""The RBD backend against a real one-OSD Ceph cluster on 127.0.0.1 (pyvduse.testing.ceph):
data in and out of the driver's buffers, many calls in flight, FLUSH/DISCARD/WRITE_ZEROES,
a snapshot read-only, an ``rbd resize`` followed by the device, and one-line errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pyvduse.backend import rbd_binding
from pyvduse.backend.rbd import RbdBackend, RbdError
from pyvduse.backend.rbd_spec import RbdImage
from pyvduse.daemon import Daemon
from pyvduse.device.blk import BlkDevice
from pyvduse.testing.ceph import CephCluster, missing_packages

needs_ceph = pytest.mark.skipif(
    bool(missing_packages()) or not rbd_binding.available(),
    reason="needs Ceph (apt install ceph-mon ceph-osd ceph-common)",
)
MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[CephCluster]:
    c = CephCluster(port=13500 + os.getpid() % 200 * 2).start()
    try:
        yield c
    finally:
        c.stop()


def backend(cluster: CephCluster, image: str, **kw: object) -> RbdBackend:
    return RbdBackend(image, conf=str(cluster.conf), **kw)  # type: ignore[arg-type]


def wait_all(b: RbdBackend, calls: Sequence[tuple[str, tuple[object, ...]]]) -> list[BaseException | None]:
    """Start every call at once, then wait for all of them."""
    out: list[BaseException | None] = [None] * len(calls)
    left = threading.Semaphore(0)

    def finisher(i: int):  # type: ignore[no-untyped-def]
        def done(e: BaseException | None) -> None:
            out[i] = e
            left.release()

        return done

    for i, (call, args) in enumerate(calls):
        b.start(0, call, args, finisher(i))
    for _ in calls:
        assert left.acquire(timeout=60)
    return out


def test_parse() -> None:
    assert RbdImage.parse("rbd/img") == RbdImage("rbd", "img")
    assert RbdImage.parse("p/i@s") == RbdImage("p", "i", "s")
    assert str(RbdImage("p", "i", "s")) == "p/i@s"
    for bad in ("img", "/img", "rbd/", "rbd/a/b", "rbd/img@"):
        with pytest.raises(ValueError, match="POOL/IMAGE"):
            RbdImage.parse(bad)


@needs_ceph
def test_data_many_in_flight_flush_discard_zeroes(cluster: CephCluster) -> None:
    cluster.rbd("create", "--size", "16M", "rbd/data")
    b = backend(cluster, "rbd/data")
    try:
        assert b.size == 16 * MiB and not b.readonly
        blocks = [bytearray(os.urandom(4096)) for _ in range(64)]
        # 64 writes in flight, each of two pieces, then 64 reads into fresh buffers
        writes = [
            ("writev", (i * 8192, [memoryview(blk)[:1000], memoryview(blk)[1000:]]))
            for i, blk in enumerate(blocks)
        ]
        assert wait_all(b, writes) == [None] * 64
        assert wait_all(b, [("flush", ())]) == [None]
        got = [bytearray(4096) for _ in blocks]
        assert wait_all(b, [("readv", (i * 8192, [memoryview(g)])) for i, g in enumerate(got)]) == [None] * 64
        assert got == blocks
        assert wait_all(b, [("write_zeroes", (0, 8192, False)), ("discard", (8192, 8192))]) == [None, None]
        first = bytearray(8192)
        b.readv(0, [memoryview(first)])
        assert first == bytes(8192)
        b.writev(0, [memoryview(b"x" * 512)])  # the plain methods wait
        b.readv(0, [memoryview(first)[:512]])
        assert first[:512] == b"x" * 512
        assert b.in_flight == 0
    finally:
        b.close()


@needs_ceph
def test_a_snapshot_is_served_read_only(cluster: CephCluster) -> None:
    cluster.rbd("create", "--size", "4M", "rbd/snapped")
    b = backend(cluster, "rbd/snapped")
    b.writev(0, [memoryview(b"before" * 100)])
    b.flush()
    b.close()
    cluster.rbd("snap", "create", "rbd/snapped@s1")
    b = backend(cluster, "rbd/snapped")
    b.writev(0, [memoryview(b"after!" * 100)])
    b.close()
    snap = backend(cluster, "rbd/snapped@s1")
    try:
        assert snap.readonly and snap.size_settable() is not None
        buf = bytearray(600)
        snap.readv(0, [memoryview(buf)])
        assert buf == b"before" * 100
        with pytest.raises(OSError) as e:
            snap.writev(0, [memoryview(b"no" * 256)])
        assert e.value.errno == errno.EROFS
    finally:
        snap.close()


@needs_ceph
def test_rbd_resize_is_followed_by_the_device(cluster: CephCluster, tmp_path: Path) -> None:
    cluster.rbd("create", "--size", "4M", "rbd/grows")
    device = BlkDevice(backend(cluster, "rbd/grows"))
    with Daemon(device, "rbd0", model=True, state_dir=tmp_path) as d:
        assert d.size_follower is not None
        cluster.rbd("resize", "--size", "8M", "rbd/grows")
        deadline = time.monotonic() + 30
        while device.capacity_bytes != 8 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert device.capacity_bytes == 8 * MiB
    device.backend.close()


@needs_ceph
def test_errors_are_one_line(cluster: CephCluster, tmp_path: Path) -> None:
    cluster.rbd("create", "--size", "4M", "rbd/there")
    cases = {
        "nopool/there": "no pool 'nopool'",
        "rbd/missing": "has no RBD image 'missing'",
        "rbd/there@nosnap": "has no snapshot 'nosnap'",
    }
    for spec, message in cases.items():
        with pytest.raises(RbdError, match=message) as e:
            backend(cluster, spec)
        assert "\n" not in str(e.value)
    with pytest.raises(RbdError, match="does not exist"):
        RbdBackend("rbd/there", conf=str(tmp_path / "nothing.conf"))
    with pytest.raises(RbdError, match="no option of that name"):
        backend(cluster, "rbd/there", options={"no_such_option": "1"})


@needs_ceph
def test_cephx_keyring_and_a_wrong_key(tmp_path: Path) -> None:
    c = CephCluster(port=13900 + os.getpid() % 50 * 2, cephx=True).start()
    try:
        c.rbd("create", "--size", "4M", "rbd/auth")
        b = RbdBackend("rbd/auth", conf=str(c.conf), options={"keyring": str(c.keyring)})
        b.writev(0, [memoryview(b"k" * 512)])
        b.close()
        wrong = tmp_path / "wrong.keyring"
        text = c.keyring.read_text()
        key = text.split("key = ")[1].split()[0]
        wrong.write_text(text.replace(key, "AQBo6Rdr1H0HCRAAxKj2gzY6JBBy3GyS7ylJYg=="))
        t = time.monotonic()
        with pytest.raises(RbdError, match=r"refused client\.admin|no Ceph monitor answered") as e:
            RbdBackend(
                "rbd/auth", conf=str(c.conf), options={"keyring": str(wrong), "client_mount_timeout": "10"}
            )
        print(e.value, time.monotonic() - t)
        assert "\n" not in str(e.value)
    finally:
        c.stop()


@needs_ceph
def test_the_command_says_what_is_wrong_in_one_line(cluster: CephCluster) -> None:
    for extra, message in (
        (["--rbd", "nopool/x", "--ceph-conf", str(cluster.conf)], "no pool 'nopool'"),
        (["--rbd", "justaname"], "POOL/IMAGE"),
        (["--null", "1M", "--ceph-id", "x"], "are for --rbd"),
        (["--rbd", "rbd/x", "--ceph-option", "novalue"], "KEY=VALUE"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "pyvduse", "blk", "--name", "r0", *extra],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert p.returncode == 2, (extra, p.stderr)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, (extra, p.stderr)
