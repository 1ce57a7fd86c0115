"""Ceph RBD images as virtio-blk disks on the real kernel: ``pyvduse blk --rbd`` against a
one-monitor, one-OSD cluster on the guest's 127.0.0.1 (pyvduse.testing.ceph, with cephx),
started once for the module: ext4, a snapshot read-only, ``rbd resize``
followed by the driver, an OSD restart and kill -9 of the daemon under fio verify, one-line
errors, and (last: it ends the OSD) a cluster gone for good.

Kept small for CI (the guest is emulated): 64 MiB images, fio runs of a few MiB, one
restart and one kill.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvduse.testing.ceph import CephCluster
from tests.vm.helpers import Daemon, MiB, ctl_result, sh
from tests.vm.test_crash_e2e import check_fio
from tests.vm.test_nbd_e2e import ext4_round_trip

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def cluster() -> Iterator[CephCluster]:
    c = CephCluster(cephx=True).start()
    try:
        yield c
    finally:
        c.stop()


def image(cluster: CephCluster, name: str, size_mib: int = 64) -> str:
    cluster.rbd("create", "--size", f"{size_mib}M", f"rbd/{name}")
    return f"rbd/{name}"


def serve(cluster: CephCluster, spec: str, name: str, *extra: str) -> Daemon:
    return Daemon("--rbd", spec, "--ceph-conf", str(cluster.conf), "--queues", "2", *extra, name=name)


def fio(dev: str, size: str, iodepth: int = 16) -> str:
    """Random writes read back and checked, two jobs 32 MiB apart, in fio's terse form."""
    return (
        f"fio --name=rbd --filename={dev} --direct=1 --ioengine=libaio --bs=4k "
        f"--iodepth={iodepth} --numjobs=2 --offset_increment=32M --size={size} --group_reporting "
        "--rw=randwrite --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 "
        "--output-format=terse --terse-version=3"
    )


def start_fio(dev: str, size: str) -> subprocess.Popen[bytes]:
    """fio in the background, at most 200 IOPS a job: still running seconds later however fast
    the machine (under emulation it does not reach that)."""
    return subprocess.Popen(
        f"{fio(dev, size)} --rate_iops=200", shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_for(ready: object, what: str, timeout: float = 60) -> None:
    assert callable(ready)
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_ext4(cluster: CephCluster, tmp_path: Path) -> None:
    """(fio verify on an image: the OSD restart and kill -9 tests, which also run it.)"""
    spec = image(cluster, "e2e")
    with serve(cluster, spec, "rbd-e2e") as d:
        status = ctl_result("rbd-e2e", "status")
        assert status["capacity"] == 64 * MiB and not status.get("readonly"), status
        ext4_round_trip(d.dev, tmp_path / "mnt")
        assert d.stop() == 0


def test_a_snapshot_is_served_read_only(cluster: CephCluster, tmp_path: Path) -> None:
    before = tmp_path / "before.img"
    sh(f"head -c {16 * MiB} /dev/urandom > {before}")
    cluster.rbd("import", str(before), "rbd/snapped")
    cluster.rbd("snap", "create", "rbd/snapped@s1")
    with (
        serve(cluster, "rbd/snapped", "rbd-head") as head,
        serve(cluster, "rbd/snapped@s1", "rbd-snap") as snap,
    ):
        sh(f"dd if=/dev/urandom of={head.dev} bs=1M count=4 oflag=direct status=none")
        dev = Path(snap.dev).name
        assert Path(f"/sys/block/{dev}/ro").read_text().strip() == "1"
        assert ctl_result("rbd-snap", "status")["capacity"] == 16 * MiB
        write = sh(f"dd if=/dev/zero of={snap.dev} bs=4k count=1 oflag=direct status=none", check=False)
        assert write.returncode != 0, write
        sh(f"cmp {snap.dev} {before}")  # the snapshot's data, not the head's new writes
        assert sh(f"cmp -n {4 * MiB} {head.dev} {before}", check=False).returncode != 0
        assert snap.stop() == 0 and head.stop() == 0


def test_rbd_resize_is_seen_by_the_driver(cluster: CephCluster) -> None:
    spec = image(cluster, "grows", 32)
    with serve(cluster, spec, "rbd-grow") as d:
        size = Path(f"/sys/block/{Path(d.dev).name}/size")
        assert int(size.read_text()) == 32 * MiB // 512
        cluster.rbd("resize", "--size", "48M", spec)
        wait_for(lambda: int(size.read_text()) == 48 * MiB // 512, f"{size} stayed {size.read_text()}")
        sh(f"dd if=/dev/urandom of={d.dev} bs=1M seek=47 count=1 oflag=direct status=none")
        assert d.stop() == 0


def test_an_osd_restart_under_fio_verify(cluster: CephCluster) -> None:
    spec = image(cluster, "osdrestart")
    before = sh("dmesg").stdout
    with serve(cluster, spec, "rbd-osd") as d:
        p = start_fio(d.dev, "6M")
        time.sleep(2.0)
        assert p.poll() is None, "fio ended before the OSD restarted: give it more to write"
        cluster.restart_osd()  # requests wait meanwhile
        check_fio(p, d)
        assert d.stop() == 0
    new = sh("dmesg").stdout[len(before) :]
    assert "I/O error" not in new, new[-2000:]


def test_kill9_of_the_daemon_under_fio_verify(cluster: CephCluster) -> None:
    """The next daemon resumes the device and resubmits what was in flight; its first write
    waits for the dead client's exclusive lock to be broken (the test cluster's
    ``osd_client_watch_timeout`` is 5 s)."""
    spec = image(cluster, "kill9")
    d = serve(cluster, spec, "rbd-kill")
    p = start_fio(d.dev, "4M")
    time.sleep(2.0)
    assert p.poll() is None, "fio ended before the kill: give it more to write"
    d.proc.kill()
    d.proc.wait()
    d = serve(cluster, spec, "rbd-kill")  # /dev/vduse/rbd-kill is still there
    assert "resumed" in d.stderr(), d.stderr()
    check_fio(p, d)
    assert d.stop(signal.SIGTERM) == 0


def test_bad_pool_image_conf_and_key_are_one_line_exit_2(cluster: CephCluster, tmp_path: Path) -> None:
    spec = image(cluster, "there", 4)
    wrong = tmp_path / "wrong.keyring"
    text = cluster.keyring.read_text()
    key = text.split("key = ")[1].split()[0]
    wrong.write_text(text.replace(key, "AQBo6Rdr1H0HCRAAxKj2gzY6JBBy3GyS7ylJYg=="))
    conf = ("--ceph-conf", str(cluster.conf))
    cases = [
        (["--rbd", "nopool/there", *conf], "no pool 'nopool'"),
        (["--rbd", "rbd/missing", *conf], "has no RBD image 'missing'"),
        (["--rbd", spec, "--ceph-conf", str(tmp_path / "nothing.conf")], "does not exist"),
        (
            [
                "--rbd",
                spec,
                *conf,
                "--ceph-option",
                f"keyring={wrong}",
                "--ceph-option",
                "client_mount_timeout=10",
            ],
            "client.admin",
        ),
    ]
    procs = [  # at once: each is a Python start, seconds under emulation
        subprocess.Popen(
            [sys.executable, "-m", "pyvduse", "blk", "--name", f"rbd-bad{i}", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, (extra, _) in enumerate(cases)
    ]
    for i, (p, (extra, message)) in enumerate(zip(procs, cases, strict=True)):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, (extra, err)
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not Path(f"/dev/vduse/rbd-bad{i}").exists()


def test_a_cluster_gone_for_good_fails_requests_and_sigterm_ends(cluster: CephCluster) -> None:
    """Last in the module: the OSD is killed and stays down. Reads fail with an I/O error
    after ``rados_osd_op_timeout`` (3 s here), and SIGTERM still ends the daemon."""
    spec = image(cluster, "gone", 8)
    with serve(cluster, spec, "rbd-gone", "--ceph-option", "rados_osd_op_timeout=3") as d:
        sh(f"dd if=/dev/urandom of={d.dev} bs=1M count=1 oflag=direct status=none")
        cluster.kill_osd()
        read = sh(f"dd if={d.dev} of=/dev/null bs=4k count=1 skip=100 iflag=direct status=none", check=False)
        assert read.returncode != 0 and "Input/output error" in read.stderr, read
        assert d.stop() == 0
