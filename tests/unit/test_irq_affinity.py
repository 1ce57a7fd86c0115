"""Interrupt placement (vqN/irq_cb_affinity): the cpumask texts, the policy, and what the
kernel transport writes at DRIVER_OK, against a sysfs tree in a temporary folder."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvduse.backend.null import NullBackend
from pyvduse.cli.messages import terminal_message
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.errors import KernelMissing
from pyvduse.runtime.server import DeviceServer
from pyvduse.runtime.state_file import StateFile
from pyvduse.transport.kernel import sysfs
from pyvduse.transport.kernel.irq_affinity import (
    DRIVER,
    FIRST,
    FOLLOW,
    IrqPlacement,
    drivers_mask,
    format_cpu_list,
    format_cpumask,
    parse_cpu_list,
    parse_cpumask,
)
from pyvduse.transport.kernel.transport import KernelTransport


def test_cpu_lists() -> None:
    assert parse_cpu_list("0") == [0]
    assert parse_cpu_list("3,0-2") == [3, 0, 1, 2]  # the order given: queue i -> i-th CPU
    assert parse_cpu_list("1,1-2, 2") == [1, 2]
    for bad in ("", "a", "2-1", "-1", "1-", "0,,1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
    assert format_cpu_list([5, 0, 2, 1]) == "0-2,5"
    assert format_cpu_list([]) == ""


def test_cpumask_texts_are_the_kernels() -> None:
    assert format_cpumask([0]) == "1"
    assert format_cpumask([0, 1]) == "3"
    assert format_cpumask([35]) == "8,00000000"  # 32-bit groups, as cpumask_parse wants
    assert parse_cpumask("3\n") == [0, 1]
    assert parse_cpumask("00000001,00000004") == [2, 32]
    with pytest.raises(ValueError):
        format_cpumask([])


@given(st.sets(st.integers(0, 300), min_size=1))
def test_cpumask_round_trip(cpus: set[int]) -> None:
    assert parse_cpumask(format_cpumask(cpus)) == sorted(cpus)
    assert parse_cpu_list(format_cpu_list(cpus)) == sorted(cpus)


def test_placement_policy() -> None:
    first = IrqPlacement.parse(FIRST, [0, 1])
    assert first.choose(0, [0, 1]) == [0]
    assert first.choose(1, [1]) is None  # already one CPU: the driver's spread stays
    assert IrqPlacement.parse(DRIVER, [0, 1]).choose(0, [0, 1]) is None
    follow = IrqPlacement.parse(FOLLOW, [0, 1])  # starts as first; the data path moves it
    assert follow.choose(0, [0, 1]) == [0] and not follow.explicit and str(follow) == FOLLOW
    listed = IrqPlacement.parse("1,0", [0, 1])
    assert listed.explicit and str(listed) == "0-1"
    assert [listed.choose(i, [0, 1]) for i in range(3)] == [[1], [0], [1]]
    with pytest.raises(ValueError, match="CPU 4 is not online"):
        IrqPlacement.parse("0,4", [0, 1])
    with pytest.raises(ValueError, match="'first', 'follow', 'driver' or a CPU list"):
        IrqPlacement.parse("all", [0, 1])


@pytest.fixture
def vduse_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A /sys/class/vduse with one two-queue device whose driver gave each queue CPUs 0-1."""
    monkeypatch.setattr(sysfs, "CLASS_VDUSE", tmp_path)
    for i in range(2):
        (tmp_path / "d0" / f"vq{i}").mkdir(parents=True)
        (tmp_path / "d0" / f"vq{i}" / "irq_cb_affinity").write_text("3\n")
    return tmp_path / "d0"


def transport(placement: IrqPlacement) -> KernelTransport:
    device = BlkDevice(NullBackend(1 << 20), BlkOptions(num_queues=2))
    return KernelTransport("d0", device.spec(), DeviceServer(device), irq_placement=placement)


def masks(dev: Path) -> list[str]:
    return [(dev / f"vq{i}" / "irq_cb_affinity").read_text().strip() for i in range(2)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (FIRST, ["1", "1"]),
        (FOLLOW, ["1", "1"]),
        (DRIVER, ["3", "3"]),
        ("1", ["2", "2"]),
        ("1,0", ["2", "1"]),
    ],
)
def test_driver_ok_places_each_queue(vduse_class: Path, text: str, expected: list[str]) -> None:
    t = transport(IrqPlacement.parse(text, [0, 1]))
    t._check_irq_placement()
    assert t._place_irqs == (text != DRIVER)
    if t._place_irqs:
        t._place_interrupts()
    assert masks(vduse_class) == expected


def test_follow_hands_the_data_path_the_file_and_the_drivers_cpus(vduse_class: Path) -> None:
    """Only with follow, and only for a queue the driver gave several CPUs: one it gave a
    single CPU (the driver's spread over several queues) keeps it."""
    t = transport(IrqPlacement.parse(FOLLOW, [0, 1]))
    t._check_irq_placement()
    (vduse_class / "vq1" / "irq_cb_affinity").write_text("2\n")
    t._place_interrupts()
    assert t.irq_follow(0) == (str(vduse_class / "vq0" / "irq_cb_affinity"), [0, 1])
    assert t.irq_follow(1) is None
    first = transport(IrqPlacement.parse(FIRST, [0, 1]))
    first._check_irq_placement()
    first._place_interrupts()
    assert first.irq_follow(0) is None


def test_drivers_mask_tells_our_narrowing_from_a_new_probe() -> None:
    assert drivers_mask([1], [0, 1]) == [0, 1]  # one CPU of the known mask: ours
    assert drivers_mask([0, 1], [0, 1]) == [0, 1]
    assert drivers_mask([0, 1, 2, 3], [0, 1]) == [0, 1, 2, 3]  # the driver probed again
    assert drivers_mask([2], [0, 1]) == [2]  # outside it: the driver's
    assert drivers_mask([1], [1]) == [1]  # the driver gave one CPU: nothing to follow
    assert drivers_mask([1], None) == [1]


def test_follow_keeps_the_drivers_cpus_at_the_next_driver_ok(vduse_class: Path) -> None:
    """After a placement the kernel shows our one CPU (or the one the worker moved to);
    the next DRIVER_OK without a new probe (a VM's reset through vhost-vdpa) must not take
    that for the driver's mask, or follow would stop following."""
    t = transport(IrqPlacement.parse(FOLLOW, [0, 1]))
    t._check_irq_placement()
    t._place_interrupts()
    (vduse_class / "vq0" / "irq_cb_affinity").write_text("2\n")  # the worker moved to CPU 1
    t._place_interrupts()
    assert t.irq_follow(0) == (str(vduse_class / "vq0" / "irq_cb_affinity"), [0, 1])
    assert masks(vduse_class) == ["1", "1"]
    for i in range(2):  # the driver probes again, with another spread
        (vduse_class / f"vq{i}" / "irq_cb_affinity").write_text("c\n")
    t._place_interrupts()
    assert t.irq_follow(0) == (str(vduse_class / "vq0" / "irq_cb_affinity"), [2, 3])


def test_a_resumed_daemon_follows_within_the_drivers_cpus(vduse_class: Path, tmp_path: Path) -> None:
    """The driver's masks go into the device's state directory; a daemon resuming the
    device after a kill reads them instead of the one CPU the kernel now shows."""
    state = StateFile(tmp_path / "state-dir" / "d0" / "state", {}, 2, 8)
    first = transport(IrqPlacement.parse(FOLLOW, [0, 1]))
    first.irq_mask_store = state
    first._check_irq_placement()
    first._place_interrupts()
    assert state.load_irq_masks() == {0: [0, 1], 1: [0, 1]}
    (vduse_class / "vq1" / "irq_cb_affinity").write_text("2\n")  # where the dead one left it
    resumed = transport(IrqPlacement.parse(FOLLOW, [0, 1]))
    resumed.irq_mask_store = state
    resumed._check_irq_placement()
    resumed._place_interrupts()
    assert resumed.irq_follow(1) == (str(vduse_class / "vq1" / "irq_cb_affinity"), [0, 1])
    without = transport(IrqPlacement.parse(FOLLOW, [0, 1]))  # no store: as before
    without._check_irq_placement()
    without._place_interrupts()
    assert without.irq_follow(1) is None
    state.remove()
    assert not (tmp_path / "state-dir" / "d0").exists()


def test_kept_masks_that_are_not_masks_are_ignored(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "d0" / "state", {}, 1, 8)
    for text in ("", "[1]", '{"0": []}', '{"x": [1]}', '{"0": [-1]}', '{"0": [true]}', "{"):
        state.irq_masks_path.write_text(text)
        assert state.load_irq_masks() == {}
    state.irq_masks_path.write_text('{"0": [3, 1, 1], "1": "2"}')
    assert state.load_irq_masks() == {0: [1, 3]}
    state.close()


def test_status_reads_the_current_masks(vduse_class: Path) -> None:
    t = transport(IrqPlacement())
    t._check_irq_placement()
    t._place_interrupts()
    assert [t.interrupt_cpus(i) for i in range(2)] == [[0], [0]]
    (vduse_class / "vq1" / "irq_cb_affinity").unlink()  # an older kernel, or a device gone
    assert t.interrupt_cpus(1) is None


def test_ctl_status_shows_the_interrupt_cpus() -> None:
    from pyvduse.cli.ctl import render_status

    queue = {
        "index": 0,
        "size": 256,
        "served": True,
        "avail_idx": 3,
        "last_avail_idx": 3,
        "used_idx": 3,
        "in_flight": 0,
        "in_flight_s": None,
        "irq_cpus": [0, 1, 3],
    }
    reply = {
        "name": "d0",
        "state": "serving",
        "device": "virtio-blk",
        "node": "/dev/vda",
        "pid": 1,
        "uptime_s": 1.0,
        "status": 15,
        "status_names": [],
        "features": "0x1",
        "queues": [queue, dict(queue, index=1, irq_cpus=None)],
    }
    lines = render_status(reply).splitlines()
    assert lines[-2].endswith("in flight 0, interrupts on CPU 0-1,3")
    assert lines[-1].endswith("in flight 0")


def test_a_kernel_without_the_attribute(vduse_class: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(2):
        (vduse_class / f"vq{i}" / "irq_cb_affinity").unlink()
    t = transport(IrqPlacement())
    with caplog.at_level(logging.INFO):
        t._check_irq_placement()  # the default just says so
    assert not t._place_irqs and "cannot place VDUSE interrupts" in caplog.text
    with pytest.raises(KernelMissing, match="cannot apply: leave it out") as e:
        transport(IrqPlacement.parse("0", [0, 1]))._check_irq_placement()
    assert terminal_message(e.value).startswith("--irq-cpus: this kernel has no ")


def test_a_refused_write_leaves_the_queue_and_says_so(
    vduse_class: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (vduse_class / "vq1" / "irq_cb_affinity").write_text("not hex\n")
    t = transport(IrqPlacement())
    t._check_irq_placement()
    t._place_interrupts()
    assert masks(vduse_class) == ["1", "not hex"]
    assert "queue 1: interrupt CPUs left as the driver set them" in caplog.text


def test_cli_refuses_an_offline_cpu_in_one_line() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "pyvduse", "blk", "--name", "x", "--null", "1M", "--irq-cpus", "0,4096"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "--irq-cpus 0,4096: CPU 4096 is not online" in p.stderr
