"""What ``import pyvduse`` gives a user: a device and a backend of their own, served on the
model by an embedded ``Daemon`` that another thread starts and stops. Only public names."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import pyvduse
from pyvduse import (
    Backend,
    BlkDevice,
    BlkDriver,
    BlkIOError,
    Chain,
    ConfigError,
    Daemon,
    DeviceSpec,
    MemoryBackend,
    ModelRig,
    PyvduseError,
    Request,
    VirtioDevice,
)
from pyvduse.abi.virtio import DeviceId

MiB = 1 << 20


def test_every_public_name_resolves_and_nothing_else_is_exported() -> None:
    for name in pyvduse.__all__:
        assert getattr(pyvduse, name) is not None, name
    assert set(pyvduse.__all__) == {"__version__", *pyvduse._EXPORTS}
    assert sorted(pyvduse.__all__[1:]) == pyvduse.__all__[1:]
    with pytest.raises(AttributeError):
        pyvduse.DeviceServer  # noqa: B018  # internal: not in the public API


def test_import_pyvduse_stays_cheap() -> None:
    """The command line imports the package: the names load on first use."""
    code = "import sys, pyvduse; print(sorted(m for m in sys.modules if m.startswith('pyvduse')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pyvduse']"


class Shouting(Backend):
    """A user's backend: RAM that stores bytes upper-cased, with a disk that fails one block."""

    kind = "shouting"

    def __init__(self, size: int, bad_offset: int) -> None:
        self.data = bytearray(size)
        self.bad_offset = bad_offset

    @property
    def size(self) -> int:
        return len(self.data)

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        if offset == self.bad_offset:
            raise OSError(5, "this block is unreadable")
        for b in bufs:
            b[:] = self.data[offset : offset + len(b)]
            offset += len(b)

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        for b in bufs:
            self.data[offset : offset + len(b)] = bytes(b).upper()
            offset += len(b)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.data[offset : offset + length] = bytes(length)


def test_a_users_backend_on_an_embedded_daemon_started_and_stopped_off_the_main_thread() -> None:
    daemon = Daemon(BlkDevice(Shouting(4 * MiB, bad_offset=MiB)), "api0", model=True, state_dir=None)
    started = threading.Thread(target=daemon.start)
    started.start()
    started.join(10)
    assert daemon.kernel is not None and daemon.node is None  # the model has no /dev node
    disk = BlkDriver(daemon.kernel)
    disk.write(0, b"hello " * 100)
    assert disk.read(0, 600) == b"HELLO " * 100
    with pytest.raises(BlkIOError):  # the backend's OSError fails that request only
        disk.read(MiB, 512)
    assert disk.read(0, 6) == b"HELLO "
    stopper = threading.Thread(target=daemon.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive() and daemon.stopped


class Echo(VirtioDevice):
    """A user's device from scratch: writes back what it reads, reversed, later. (VDUSE
    creates block and net devices only, so it says it is a block device; no block driver
    will bind to it on the model.)"""

    def spec(self) -> DeviceSpec:
        version_1, access_platform = 1 << 32, 1 << 33  # what VDUSE requires of a device
        return DeviceSpec(
            device_id=DeviceId.BLOCK,
            features=version_1 | access_platform,
            config=b"",
            num_queues=1,
            queue_size=64,
        )

    def submit(self, request: Request) -> None:
        chain: Chain = request.chain
        data = chain.read()
        threading.Timer(0.01, lambda: request.complete(chain.write(data[::-1]))).start()


def test_a_users_device_completes_later_from_another_thread() -> None:
    with ModelRig(Echo()) as rig:
        from pyvduse.testing import VirtioDriver

        drv = VirtioDriver(rig.kernel)
        drv.probe()
        q = drv.queues[0]
        tickets = [q.submit([f"request {i}".encode()], [16]) for i in range(8)]
        for i, t in enumerate(tickets):
            c = q.wait(t, 5)
            assert c.data[: c.length] == f"request {i}".encode()[::-1]


def test_signals_are_only_for_the_main_thread() -> None:
    daemon = Daemon(BlkDevice(MemoryBackend(MiB)), "api1", model=True, state_dir=None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run(signals=True)
        except PyvduseError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ConfigError)
    assert errors[0].option == "signals"


def test_a_bad_name_is_a_config_error_naming_the_argument() -> None:
    with pytest.raises(ConfigError, match="cannot be a device name") as e:
        Daemon(BlkDevice(MemoryBackend(MiB)), "a/b", model=True)
    assert e.value.option == "name"


def test_the_api_reference_documents_every_public_name() -> None:
    from pathlib import Path

    index = (Path(__file__).resolve().parents[2] / "docs" / "api" / "index.rst").read_text()
    import re

    documented = set(re.findall(r"^\.\. auto(?:class|function|data):: pyvduse\.(\w+)$", index, re.M))
    assert documented == set(pyvduse.__all__) - {"__version__"}
