"""Crash recovery against the real kernel: kill -9 the daemon under load, restart it, and
check that the driver never sees a lost, failed or doubled request.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, MiB, NullBlk, ctl_result, expected_vduse, make_image, sh

pytestmark = pytest.mark.vm

KILLS = 20


def kernel_log() -> str:
    return sh("dmesg").stdout


def restart(d: Daemon, args: tuple[str, ...], name: str) -> Daemon:
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    d = Daemon(*args, name=name)  # reconnects: /dev/vduse/NAME is still there
    assert "resumed" in d.stderr(), d.stderr()
    return d


def check_fio(p: subprocess.Popen[bytes], d: Daemon) -> None:
    try:
        out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # say where the requests are: the guest's /tmp is private
        p.kill()
        dev = Path(d.dev).name
        raise AssertionError(
            f"fio hung; in flight (read write) on {dev}: "
            f"{sh(f'cat /sys/block/{dev}/inflight', check=False).stdout.strip()}\n"
            f"{d.stuck()}"
        ) from None
    text = out.decode()
    assert p.returncode == 0, text[-2000:]
    jobs = [line for line in text.splitlines() if line.startswith("3;")]
    assert jobs and all(line.split(";")[4] == "0" for line in jobs), text[-2000:]


@pytest.mark.parametrize("ring", ["split", "packed", "slow-disk", "slow-disk-direct-umem"])
def test_fio_verify_survives_20_kills(tmp_path: Path, ring: str) -> None:
    """``slow-disk``: a null_blk with an SSD's latency (250 µs) behind the io_uring data
    path, fio 32 deep: dozens of requests in flight at each kill; ``-direct-umem`` with
    O_DIRECT into a bounce buffer of the daemon's own memory, which each kill hands back to
    the kernel and each restart registers anew."""
    with contextlib.ExitStack() as stack:
        extra: tuple[str, ...] = ()
        if ring.startswith("slow-disk"):
            image = stack.enter_context(NullBlk("crash-slow", size_mb=128)).dev
            if ring.endswith("umem"):
                extra = ("--cache", "none", "--bounce-memory", "daemon")
        else:
            image = str(make_image(tmp_path / "crash.img", 128 * MiB))
        _kills_under_fio(image, ring, 32 if ring.startswith("slow-disk") else 16, extra)


def _kills_under_fio(image: str, ring: str, iodepth: int, extra: tuple[str, ...]) -> None:
    args = ("--file", image, "--queues", "2", *(("--packed",) if ring == "packed" else ()), *extra)
    name = f"crash-fio-{ring}"
    rng = random.Random(5)
    before = kernel_log()
    d = Daemon(*args, name=name)

    def start_fio() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            f"fio --name=crash --filename={d.dev} --direct=1 --ioengine=libaio --rw=randwrite "
            f"--bs=4k --iodepth={iodepth} --size=32M --verify=crc32c --do_verify=1 "
            "--verify_fatal=1 --verify_state_save=0 --output-format=terse --terse-version=3",
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    fio = start_fio()
    rounds = 1
    for _ in range(KILLS):
        if fio.poll() is not None:  # a round finished: it must have verified, start another
            check_fio(fio, d)
            fio = start_fio()
            rounds += 1
        time.sleep(rng.uniform(0.2, 1.5))
        d = restart(d, args, name)
    check_fio(fio, d)
    new_log = kernel_log()[len(before) :]
    assert "I/O error" not in new_log and "blk_update_request" not in new_log, new_log[-2000:]
    assert d.stop() == 0


def test_ext4_stays_consistent_through_kills(tmp_path: Path) -> None:
    img = make_image(tmp_path / "crash-ext4.img", 256 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ("--file", str(img))
    rng = random.Random(11)
    d = Daemon(*args, name="crash-ext4")
    sh(f"mkfs.ext4 -q -F {d.dev}")
    sh(f"mount {d.dev} {mnt}")
    writer = subprocess.Popen(
        # about as long as the 8 kill-and-restart rounds below, so they all hit it writing
        f"for i in $(seq 1 240); do head -c $((RANDOM * 4)) /dev/urandom > {mnt}/f$i; "
        f"[ $((i % 30)) = 0 ] && sync; done; sync",
        shell=True,
    )
    for _ in range(8):
        time.sleep(rng.uniform(0.3, 2.0))
        d = restart(d, args, "crash-ext4")
    assert writer.wait(timeout=900) == 0
    sh(f"umount {mnt}")
    sh(f"e2fsck -fn {d.dev}")
    assert d.stop() == 0
    sh(f"e2fsck -fn {img}")


def test_restart_with_another_configuration_is_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "cfg.img", 32 * MiB)
    d = Daemon("--file", str(img), name="crash-cfg")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    p = subprocess.run(
        [sys.executable, "-m", "pyvduse", "blk", "--name", "crash-cfg", "--file", str(img), "--queues", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "configuration" in p.stderr and "queues" in p.stderr, p.stderr
    d2 = Daemon("--file", str(img), name="crash-cfg")  # the same configuration resumes
    # the daemon that took the device over asked the kernel which API version it speaks
    assert ctl_result("crash-cfg", "status")["vduse_api"] == expected_vduse()[0]
    assert d2.stop() == 0
