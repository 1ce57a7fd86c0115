"""Many requests in flight against the real kernel, on a disk with an SSD's latency.

A memory-backed null_blk whose every request completes 250 µs after it was submitted stands
in for an SSD: a daemon that served one request at a time would be capped at 4k IOPS
however deep the driver's queue. Linux's own drivers (virtio_blk, ext4) and fio's verify run
against pyvduse serving it with each I/O mode; ``ctl stats`` shows how deep the queue was.
A device-mapper table over it makes the backend hang on demand (``dmsetup suspend``): the
device must be detached cleanly through such a hang and the daemon serve on.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, Hangable, NullBlk, ctl_result, sh

pytestmark = pytest.mark.vm

MODES = [
    ("--aio", "io_uring"),
    ("--aio", "io_uring", "--cache", "writeback"),
    ("--aio", "io_uring", "--cache", "none"),
    ("--aio", "io_uring", "--cache", "none", "--bounce-memory", "daemon"),
    ("--aio", "threads"),
    ("--aio", "threads", "--packed"),
]
MODE_IDS = [
    "io_uring",
    "io_uring-writeback",
    "io_uring-direct",
    "io_uring-direct-umem",
    "threads",
    "threads-packed",
]


def deepest(name: str) -> int:
    """The most requests in flight at once on any queue, from the daemon's depth histogram
    (bucket bounds are powers of two: the bound of the last non-empty one, halved)."""
    queues = ctl_result(name, "stats")["queues"]
    return max(int(q["depth"]["buckets"][-1][0]) // 2 for q in queues if q["depth"]["buckets"])


def fio_verify(dev: str, iodepth: int = 32, size: str = "48M", jobs: int = 2) -> str:
    return sh(
        f"fio --name=deep --filename={dev} --direct=1 --ioengine=libaio --rw=randwrite "
        f"--bs=4k --iodepth={iodepth} --numjobs={jobs} --offset_increment=64M "
        f"--size={size} --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 "
        "--group_reporting --output-format=terse --terse-version=3",
        timeout=900,
    ).stdout


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_fio_verify_at_depth_on_a_slow_disk(mode: tuple[str, ...]) -> None:
    with (
        NullBlk("deep-fio") as disk,
        Daemon("--file", disk.dev, "--queues", "2", *mode, name="deep-fio") as d,
    ):
        out = fio_verify(d.dev)
        line = next(ln for ln in out.splitlines() if ln.startswith("3;"))
        assert line.split(";")[4] == "0", out[-2000:]  # no fio error
        status = ctl_result("deep-fio", "status")
        queues = status["queues"]
        engine = "python" if "--packed" in mode or "threads" in mode else "native"
        assert all(q["engine"] == engine and q["aio"] == mode[1] for q in queues), queues
        # --cache auto (no --cache) on a block device: direct I/O
        cached = "writeback" in mode
        assert status["cache"] == ("writeback" if cached else "none")
        assert status["cache_choice"] == (mode[mode.index("--cache") + 1] if "--cache" in mode else "auto")
        assert status["bounce_memory"] == ("daemon" if "daemon" in mode else "kernel")
        if cached:
            # Through the page cache the verify run may never wait for the disk (io_uring
            # completes a write the cache takes, and a read it holds, inline): reads that
            # miss it show the depth.
            sh("sync; echo 3 > /proc/sys/vm/drop_caches")
            sh(
                f"fio --name=miss --filename={d.dev} --direct=1 --ioengine=libaio "
                "--rw=randread --bs=4k --iodepth=32 --time_based --runtime=2 "
                "--output-format=terse",
                timeout=300,
            )
        assert deepest("deep-fio") >= 16, ctl_result("deep-fio", "stats")
        assert d.stop() == 0


def test_ext4_on_a_slow_disk() -> None:
    """ext4's writeback through O_DIRECT (--cache none), so that every request waits for the
    slow disk and the driver's queue fills (through the page cache, writes the daemon's page
    cache takes at once are completed inline, and the queue stays shallow)."""
    with NullBlk("deep-ext4", size_mb=512) as disk:
        with Daemon("--file", disk.dev, "--queues", "2", "--cache", "none", name="deep-ext4") as d:
            mnt = Path("/tmp/deep-ext4")
            mnt.mkdir(exist_ok=True)
            sh(f"mkfs.ext4 -q -F {d.dev}")
            sh(f"mount {d.dev} {mnt}")
            sh(
                f"for i in $(seq 1 400); do head -c $((RANDOM * 8)) /dev/urandom > {mnt}/f$i; "
                f"done; sync; (cd {mnt} && sha256sum f* > /tmp/deep-ext4.sums)",
                timeout=900,
            )
            sh(f"umount {mnt}")
            sh(f"e2fsck -fn {d.dev}")
            sh(f"mount {d.dev} {mnt}")
            sh(f"cd {mnt} && sha256sum -c --quiet /tmp/deep-ext4.sums")
            sh(f"umount {mnt}")
            assert deepest("deep-ext4") >= 4, ctl_result("deep-ext4", "stats")
            assert d.stop() == 0
        sh(f"e2fsck -fn {disk.dev}")  # the disk itself, after the daemon is gone


def test_detach_through_a_backend_that_hangs_longer_than_msg_timeout() -> None:
    """fio runs, the backend hangs (dmsetup suspend) for twice the kernel's message timeout,
    the device is detached meanwhile: the daemon keeps answering (its management socket too),
    the kernel never marks the device broken, and once the backend is back the detach
    completes and the device can be attached and served again."""
    with NullBlk("hang-disk", latency_us=50) as disk, Hangable("hang0", disk.dev) as dm:
        d = Daemon("--file", dm.dev, "--msg-timeout", "3", name="hang0")
        fio = subprocess.Popen(
            f"fio --name=hang --filename={d.dev} --direct=1 --ioengine=libaio --rw=randread "
            "--bs=4k --iodepth=16 --time_based --runtime=60 --output-format=terse",
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(2)
            dm.suspend()
            time.sleep(1)
            detach = threading.Thread(target=sh, args=("vdpa dev del hang0",), kwargs={"timeout": 120})
            detach.start()  # waits in virtio_blk's remove for the requests that hang
            t = time.monotonic()
            while time.monotonic() - t < 6:  # twice msg_timeout
                st = ctl_result("hang0", "status")  # never blocked by the hung backend
                assert st["state"] == "serving"
                assert d.proc.poll() is None
                time.sleep(1)
            total = ctl_result("hang0", "stats")["total"]
            assert total["in_flight"] > 0, total
            dm.resume()
            detach.join(120)
            assert not detach.is_alive(), "the detach never finished"
        finally:
            dm.resume()
            fio.kill()
            fio.wait()
        assert "broken" not in d.stderr(), d.stderr()[-3000:]
        assert "timed out" not in sh("dmesg | tail -40").stdout
        sh("vdpa dev add name hang0 mgmtdev vduse")  # attach again: probed and served
        deadline = time.monotonic() + 30
        while not list(Path("/sys/bus/vdpa/devices/hang0").glob("virtio*/block/*")):
            assert time.monotonic() < deadline, "no block device after attaching again"
            time.sleep(0.2)
        node = next(Path("/sys/bus/vdpa/devices/hang0").glob("virtio*/block/*")).name
        sh(f"dd if=/dev/{node} of=/dev/null bs=4k count=256 iflag=direct")
        assert d.stop() == 0
