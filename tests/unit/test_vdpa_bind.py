"""Giving a new vdpa device to the driver asked for (``--bind``), on a stand-in sysfs tree,
and finding who holds a device node open."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pyvduse.daemon import Daemon
from pyvduse.transport.kernel import sysfs, vdpa_bind


def fake_bus(root: Path, autoprobe: str = "1") -> Path:
    bus = root / "bus" / "vdpa"
    for driver in ("virtio_vdpa", "vhost_vdpa"):
        (bus / "drivers" / driver).mkdir(parents=True)
        (bus / "drivers" / driver / "bind").write_text("")
    (bus / "devices" / "disk0").mkdir(parents=True)
    (bus / "devices" / "disk0" / "driver_override").write_text("(null)\n")
    (bus / "drivers_autoprobe").write_text(autoprobe + "\n")
    return bus


@pytest.mark.parametrize("before", ["1", "0"])
def test_autoprobe_is_off_inside_and_restored(tmp_path: Path, before: str) -> None:
    bus = fake_bus(tmp_path, before)
    with vdpa_bind.autoprobe_off(bus) as manual:
        assert manual
        assert (bus / "drivers_autoprobe").read_text().strip() == "0"
    assert (bus / "drivers_autoprobe").read_text().strip() == before


def test_autoprobe_is_restored_when_the_add_fails(tmp_path: Path) -> None:
    bus = fake_bus(tmp_path)
    with pytest.raises(RuntimeError), vdpa_bind.autoprobe_off(bus):
        raise RuntimeError("dev_add failed")
    assert (bus / "drivers_autoprobe").read_text().strip() == "1"


def test_daemons_take_turns_with_the_switch(tmp_path: Path) -> None:
    """A second daemon's add waits for the first: it never sees the first one's 0 as the
    value to restore."""
    bus = fake_bus(tmp_path)
    inside = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def second() -> None:
        inside.wait()
        with vdpa_bind.autoprobe_off(bus):
            seen.append("second")

    t = threading.Thread(target=second)
    t.start()
    with vdpa_bind.autoprobe_off(bus):
        inside.set()
        release.wait(0.3)
        seen.append("first")
    t.join(5)
    assert seen == ["first", "second"]
    assert (bus / "drivers_autoprobe").read_text().strip() == "1"


def test_no_switch_no_change(tmp_path: Path) -> None:
    with vdpa_bind.autoprobe_off(tmp_path / "nothing") as manual:
        assert not manual


def test_reserve_and_bind(tmp_path: Path) -> None:
    bus = fake_bus(tmp_path)
    assert vdpa_bind.reserve("disk0", "vhost_vdpa", bus)
    assert (bus / "devices" / "disk0" / "driver_override").read_text() == "vhost_vdpa"
    vdpa_bind.bind("disk0", "vhost_vdpa", bus)
    assert (bus / "drivers" / "vhost_vdpa" / "bind").read_text() == "disk0"
    assert not vdpa_bind.reserve("other", "vhost_vdpa", bus)  # no driver_override there
    with pytest.raises(vdpa_bind.BindError, match="virtio_vdpa refused"):
        vdpa_bind.bind("disk0", "virtio_vdpa", tmp_path / "nothing")


def test_wrong_driver(tmp_path: Path) -> None:
    bus = fake_bus(tmp_path)
    assert vdpa_bind.wrong_driver("disk0", "vhost_vdpa", bus) is None  # unbound
    os.symlink(bus / "drivers" / "virtio_vdpa", bus / "devices" / "disk0" / "driver")
    assert vdpa_bind.wrong_driver("disk0", "vhost_vdpa", bus) == "virtio_vdpa"
    assert vdpa_bind.wrong_driver("disk0", "virtio_vdpa", bus) is None


def test_node_holders_finds_this_process() -> None:
    with open("/dev/null", "rb"):
        assert os.getpid() in sysfs.node_holders("/dev/null")
    assert sysfs.node_holders("/dev/no-such-node") == []


def vhost_daemon(monkeypatch: pytest.MonkeyPatch, bind: str = "vhost") -> Daemon:
    from pyvduse.backend.memory import MemoryBackend
    from pyvduse.device.blk import BlkDevice

    monkeypatch.setattr(sysfs, "bound_driver", lambda name: "vhost_vdpa")
    return Daemon(BlkDevice(MemoryBackend(1 << 20)), "vm0", bind=bind, state_dir=None)


def test_stop_waits_for_the_vm_to_close_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    holders = [[], [7], [7], []]
    monkeypatch.setattr(sysfs, "node_holders", lambda node: holders.pop(0) if holders else [])
    d = vhost_daemon(monkeypatch)
    d.node = "/dev/vhost-vdpa-0"
    hurry = threading.Event()
    assert not d._wait_for_release(hurry)  # nobody holds it: detach now
    assert not d._wait_for_release(hurry)  # waits until it is closed, then detaches
    assert holders == []
    holders[:] = [[7]] * 100
    hurry.set()
    assert d._wait_for_release(hurry)  # stopped again: leave it attached


def test_kernel_check_and_resume_name_the_driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pyvduse.daemon import check_kernel
    from pyvduse.errors import ConfigError, KernelMissing
    from pyvduse.transport.kernel import device_fd

    monkeypatch.setattr(sysfs, "CONTROL", tmp_path)  # "the vduse module is loaded"
    monkeypatch.setattr(sysfs, "vdpa_drivers", lambda: ["virtio_vdpa"])
    check_kernel("virtio")
    with pytest.raises(KernelMissing, match="modprobe vhost_vdpa"):
        check_kernel("vhost")
    monkeypatch.setattr(sysfs, "vduse_devices", lambda: ["vm0"])
    monkeypatch.setattr(device_fd, "device_in_use", lambda path: False)
    d = vhost_daemon(monkeypatch, bind="virtio")  # a device a dead daemon left with vhost
    with pytest.raises(ConfigError, match="attached to vhost_vdpa: resume it bound to 'vhost'"):
        d.start()
    with pytest.raises(ConfigError, match="leave it out"):
        Daemon(d.device, "vm1", bind="vhost", user_bounce=True)
