"""virtio-blk end to end: Linux's own virtio_blk driver on a device pyvduse serves.

These run inside the test VM (Linux 6.12 with vduse); on the host they are proxied into it.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, MiB, make_image, sh, wait_gone

pytestmark = pytest.mark.vm

FIO = "fio --output-format=terse --terse-version=3 --minimal"


def blockdev_name(dev: str) -> str:
    return os.path.basename(dev)


def fio_ok(out: str) -> None:
    # terse v3: field 5 (index 4) is the job's error code
    jobs = [line for line in out.splitlines() if line.startswith("3;")]
    assert jobs, f"fio printed no job results: {out[-500:]}"
    for line in jobs:
        assert line.split(";")[4] == "0", f"fio job failed: {line[:300]}"


# split: the native data path (the default where it can serve); packed: the Python engine
RINGS = pytest.mark.parametrize("ring", ["split", "packed"])
# ... and the Python engine on a split ring too
RINGS_AND_ENGINES = pytest.mark.parametrize("ring", ["split", "packed", "split-python"])


def ring_args(ring: str) -> tuple[str, ...]:
    return {"packed": ("--packed",), "split-python": ("--data-path", "python")}.get(ring, ())


def assert_ring(d: Daemon, ring: str) -> None:
    """The driver really runs the ring asked for (VIRTIO_F_RING_PACKED is feature bit 34),
    served by the engine expected."""
    features = Path(f"/sys/block/{blockdev_name(d.dev)}/device/features").read_text().strip()
    assert features[34] == ("1" if ring == "packed" else "0"), features
    engine = "native data path" if ring == "split" else "Python data path"
    deadline = time.monotonic() + 30  # logged right after DRIVER_OK, before READY
    while engine not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine in d.stderr(), d.stderr()[-2000:]


@RINGS
def test_ext4_files_survive_remount_and_fsck(tmp_path: Path, ring: str) -> None:
    img = make_image(tmp_path / "ext4.img", 256 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rng = random.Random(20261125)
    sums: dict[str, str] = {}
    name = f"e2e-ext4-{ring}"
    with Daemon("--file", str(img), "--queues", "2", *ring_args(ring), name=name) as d:
        assert_ring(d, ring)
        sh(f"mkfs.ext4 -q -F {d.dev}")
        sh(f"mount {d.dev} {mnt}")
        total = 0
        for i in range(2000):
            sub = mnt / f"d{i % 40:02d}"
            sub.mkdir(exist_ok=True)
            size = rng.choice([0, 1, 100, 4096, 5000, 16384, 40000])
            data = rng.randbytes(size)
            (sub / f"f{i}").write_bytes(data)
            sums[f"d{i % 40:02d}/f{i}"] = hashlib.sha256(data).hexdigest()
            total += size
        big = rng.randbytes(12 * MiB)
        (mnt / "big").write_bytes(big)
        sums["big"] = hashlib.sha256(big).hexdigest()
        assert total + len(big) > 20 * MiB
        sh("sync")
        sh(f"umount {mnt}")
        sh(f"e2fsck -fn {d.dev}")
        sh(f"mount {d.dev} {mnt}")
        for rel, digest in sums.items():
            assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == digest, rel
        sh(f"umount {mnt}")
        assert d.stop() == 0
    assert wait_gone(f"/dev/vduse/{name}")
    sh(f"e2fsck -fn {img}")


@RINGS_AND_ENGINES
def test_fio_random_write_verify(tmp_path: Path, ring: str) -> None:
    img = make_image(tmp_path / "fio.img", 128 * MiB)
    with Daemon("--file", str(img), *ring_args(ring), name=f"e2e-fio-{ring}") as d:
        assert_ring(d, ring)
        out = sh(
            f"{FIO} --name=verify --filename={d.dev} --direct=1 --ioengine=libaio "
            "--rw=randwrite --bsrange=4k-64k --iodepth=16 --size=48M "
            "--verify=crc32c --verify_fatal=1 --verify_state_save=0 --do_verify=1"
        ).stdout
        fio_ok(out)
        assert d.stop() == 0


def test_discard_and_write_zeroes_reach_the_image(tmp_path: Path) -> None:
    img = make_image(tmp_path / "discard.img", 64 * MiB)
    with Daemon("--file", str(img), name="e2e-discard") as d:
        sh(f"dd if=/dev/urandom of={d.dev} bs=1M count=8 oflag=direct status=none")
        sh(f"blkdiscard -o 0 -l {2 * MiB} {d.dev}")
        sh(f"blkdiscard -z -o {4 * MiB} -l {MiB} {d.dev}")
        sh(f"dd if={d.dev} of=/dev/null bs=1M count=1 iflag=direct status=none")
        assert d.stop() == 0
    data = img.read_bytes()
    assert data[: 2 * MiB] == bytes(2 * MiB)
    assert data[4 * MiB : 5 * MiB] == bytes(MiB)
    assert data[2 * MiB : 4 * MiB] != bytes(2 * MiB)
    assert data[5 * MiB : 8 * MiB] != bytes(3 * MiB)
    # the discarded range is a hole in the image file
    fd = os.open(img, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 0, os.SEEK_DATA) >= 2 * MiB
    finally:
        os.close(fd)


def test_readonly_device_refuses_writes(tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(os.urandom(16 * MiB))
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    with Daemon("--file", str(img), "--readonly", name="e2e-ro") as d:
        assert sh(f"blockdev --getro {d.dev}").stdout.strip() == "1"
        p = sh(f"dd if=/dev/zero of={d.dev} bs=4k count=1 oflag=direct", check=False)
        assert p.returncode != 0
        p = sh(f"blkdiscard {d.dev}", check=False)
        assert p.returncode != 0
        got = sh(f"dd if={d.dev} bs=1M iflag=direct status=none | sha256sum").stdout.split()[0]
        assert got == before
        assert d.stop() == 0
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def test_serial_block_size_and_two_queues(tmp_path: Path) -> None:
    img = make_image(tmp_path / "mq.img", 64 * MiB)
    with Daemon(
        "--file", str(img), "--queues", "2", "--serial", "PYVDUSE-0042", "--block-size", "4096", name="e2e-mq"
    ) as d:
        name = blockdev_name(d.dev)
        assert Path(f"/sys/block/{name}/serial").read_text().strip() == "PYVDUSE-0042"
        assert Path(f"/sys/block/{name}/queue/logical_block_size").read_text().strip() == "4096"
        assert len(list(Path(f"/sys/block/{name}/mq").iterdir())) == 2
        out = sh(
            f"{FIO} --name=mq --filename={d.dev} --direct=1 --ioengine=libaio "
            "--rw=randwrite --bs=4k --iodepth=8 --numjobs=2 --size=8M --offset_increment=16M "
            "--verify=crc32c --verify_fatal=1 --verify_state_save=0 --do_verify=1"
        ).stdout
        fio_ok(out)
        assert d.stop() == 0


def test_sigterm_during_fio_leaves_consistent_fs(tmp_path: Path) -> None:
    img = make_image(tmp_path / "term.img", 256 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = Daemon("--file", str(img), name="e2e-term")
    sh(f"mkfs.ext4 -q -F {d.dev}")
    sh(f"mount {d.dev} {mnt}")
    fio = subprocess.Popen(
        f"fio --name=load --directory={mnt} --rw=randwrite --bs=4k --size=32M --numjobs=2 "
        "--ioengine=libaio --iodepth=16 --direct=1 --time_based --runtime=120",
        shell=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(8)
    assert fio.poll() is None, "fio should still be running"
    assert d.stop(signal.SIGTERM) == 0, d.stderr()
    assert wait_gone("/dev/vduse/e2e-term"), "the VDUSE device is still there"
    fio.wait(timeout=120)
    sh(f"umount -l {mnt}", check=False)
    # consistent = clean once the journal is replayed, with no other repair
    sh(f"e2fsck -E journal_only -y {img}", check=False)
    sh(f"e2fsck -fn {img}")
