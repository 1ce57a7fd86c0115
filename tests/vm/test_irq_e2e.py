"""Interrupt placement against the real kernel: what vqN/irq_cb_affinity holds once the
virtio_blk driver runs, for each --irq-cpus, and after the driver probes the device again."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.vm.helpers import Daemon, ctl, ctl_json, sh

pytestmark = pytest.mark.vm

VIRTIO_VDPA = Path("/sys/bus/vdpa/drivers/virtio_vdpa")


def masks(name: str, queues: int) -> list[str]:
    return [Path(f"/sys/class/vduse/{name}/vq{i}/irq_cb_affinity").read_text().strip() for i in range(queues)]


def worker_cpus(pid: int) -> dict[str, str]:
    """Each queue worker thread of the daemon (named vqN) -> its Cpus_allowed_list."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        if comm.startswith("vq"):
            status = (task / "status").read_text()
            out[comm] = next(
                line.split(":", 1)[1].strip()
                for line in status.splitlines()
                if line.startswith("Cpus_allowed_list:")
            )
    return out


def io(dev: str) -> None:
    sh(
        f"dd if=/dev/zero of={dev} bs=4k count=256 oflag=direct status=none && "
        f"dd if={dev} of=/dev/null bs=4k count=256 iflag=direct status=none"
    )


@pytest.fixture(autouse=True)
def two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a guest with 2 vCPUs")


def test_default_gives_each_queue_one_cpu() -> None:
    with Daemon("--null", "8M", name="irq-first") as d:
        # the driver gave the one queue 0-1: first CPU 0, then the worker's (follow)
        assert masks("irq-first", 1) in (["1"], ["2"])
        io(d.dev)
        assert masks("irq-first", 1) in (["1"], ["2"])
        assert worker_cpus(d.proc.pid) == {"vq0": "0-1"}  # workers left to the scheduler
        assert d.stop() == 0
    assert "queue 0: interrupts on CPU 0 (the driver gave 0-1)" in d.stderr()
    with Daemon("--null", "8M", "--irq-cpus", "first", name="irq-first1") as d:
        io(d.dev)
        assert masks("irq-first1", 1) == ["1"]  # first stays on the first CPU
        assert d.stop() == 0
    with Daemon("--null", "8M", "--queues", "2", name="irq-first2") as d:
        one_each = masks("irq-first2", 2)
        assert sorted(one_each) == ["1", "2"], one_each  # the driver's spread, one CPU each
        io(d.dev)
        queues = ctl_json("irq-first2", "status")["result"]["queues"]  # type: ignore[index]
        assert [q["irq_cpus"] for q in queues] == [{"1": [0], "2": [1]}[m] for m in one_each]
        assert "interrupts on CPU" in ctl("irq-first2", "status").stdout
        assert d.stop() == 0


def test_driver_keeps_the_drivers_mask() -> None:
    with Daemon("--null", "8M", "--irq-cpus", "driver", name="irq-driver") as d:
        assert masks("irq-driver", 1) == ["3"]
        io(d.dev)
        assert worker_cpus(d.proc.pid) == {"vq0": "0-1"}  # every CPU: nothing to pin to
        assert d.stop() == 0


def test_worker_cpus_irq_runs_each_worker_where_its_interrupts_are() -> None:
    with Daemon("--null", "8M", "--irq-cpus", "first", "--worker-cpus", "irq", name="irq-pin") as d:
        assert masks("irq-pin", 1) == ["1"]
        io(d.dev)
        assert worker_cpus(d.proc.pid) == {"vq0": "0"}
        assert d.stop() == 0
    with Daemon(
        "--null", "8M", "--queues", "2", "--worker-cpus", "irq", name="irq-pin2"
    ) as d:  # the driver's spread: follow leaves it
        one_each = masks("irq-pin2", 2)
        io(d.dev)
        assert worker_cpus(d.proc.pid) == {f"vq{i}": {"1": "0", "2": "1"}[m] for i, m in enumerate(one_each)}
        assert d.stop() == 0


def test_a_cpu_list_applies_again_when_the_driver_probes_again() -> None:
    name = "irq-list"
    with Daemon("--memory", "8M", "--irq-cpus", "1", name=name) as d:
        assert masks(name, 1) == ["2"]
        io(d.dev)
        # unbind resets the device; bind probes it again, and the driver's probe sets the
        # mask back to every CPU before DRIVER_OK, where the daemon narrows it again
        (VIRTIO_VDPA / "unbind").write_text(name)
        (VIRTIO_VDPA / "bind").write_text(name)
        deadline = time.monotonic() + 30
        while not list(Path(f"/sys/bus/vdpa/devices/{name}").glob("virtio*/block/*")):
            assert time.monotonic() < deadline, "no block device after binding again"
            time.sleep(0.1)
        assert masks(name, 1) == ["2"]
        dev = "/dev/" + next(Path(f"/sys/bus/vdpa/devices/{name}").glob("virtio*/block/*")).name
        io(dev)
        assert d.stop() == 0
    assert d.stderr().count("queue 0: interrupts on CPU 1 (the driver gave 0-1)") == 2


def worker_tid(pid: int, name: str) -> int:
    return next(
        int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if (t / "comm").read_text().strip() == name
    )


def test_follow_moves_the_interrupts_to_the_workers_cpu() -> None:
    """--irq-cpus follow: first CPU at DRIVER_OK, then the CPU the native worker runs on,
    wherever the scheduler (here: the test, moving the worker thread) puts it."""
    with Daemon("--null", "8M", "--irq-cpus", "follow", name="irq-follow") as d:
        assert masks("irq-follow", 1) in (["1"], ["2"])
        tid = worker_tid(d.proc.pid, "vq0")
        for cpu in (1, 0, 1):
            os.sched_setaffinity(tid, {cpu})
            want = [f"{1 << cpu:x}"]
            deadline = time.monotonic() + 30
            while masks("irq-follow", 1) != want:  # the worker serves on its new CPU
                assert time.monotonic() < deadline, (cpu, masks("irq-follow", 1))
                io(d.dev)
        assert d.stop() == 0


def test_follow_goes_on_after_a_restart() -> None:
    """kill -9 leaves the queue's mask at the one CPU the dead daemon's worker ran on; the
    daemon that resumes the device reads the driver's CPUs from the state directory and
    follows within them again."""
    args = ("--null", "8M", "--irq-cpus", "follow")
    dead = Daemon(*args, name="irq-restart")
    try:
        io(dead.dev)
    finally:
        dead.proc.kill()
        dead.proc.wait()
    assert Path("/run/pyvduse/irq-restart/irq-masks.json").exists()
    with Daemon(*args, name="irq-restart") as d:
        assert "resumed" in d.stderr(), d.stderr()
        tid = worker_tid(d.proc.pid, "vq0")
        for cpu in (1, 0, 1):
            os.sched_setaffinity(tid, {cpu})
            want = [f"{1 << cpu:x}"]
            deadline = time.monotonic() + 30
            while masks("irq-restart", 1) != want:
                assert time.monotonic() < deadline, (cpu, masks("irq-restart", 1), d.stderr()[-2000:])
                io(d.dev)
        assert d.stop() == 0
    assert not Path("/run/pyvduse/irq-restart").exists()  # a clean stop removes the state
