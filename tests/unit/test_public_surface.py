"""What a user's code sees of pyvduse: typed (py.typed, async overrides without ignores,
checked by ``mypy --strict`` on a plugin that imports only public names), the network
stack and a from-scratch device's names public, the examples and guides importing nothing
else, capabilities declared rather than required, async open/close on the runtime's loop,
and a device's stats read in process."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyvduse import Backend, BlkDevice, BlkDriver, MemoryBackend, ModelRig
from pyvduse.abi import virtio_blk as vb
from pyvduse.abi.virtio import bit

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

#: What a user may import: the package's names, the wire formats, the test kit.
PUBLIC_MODULES = re.compile(r"^pyvduse(\.abi(\.\w+)?|\.testing|\.fs)?$")


def test_the_package_says_it_is_typed() -> None:
    assert (ROOT / "pyvduse" / "py.typed").exists()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


def imported_modules(code: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "pyvduse" or m.startswith("pyvduse.")}


def user_code() -> dict[str, str]:
    out = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "examples").glob("*.py"))}
    for guide in sorted((ROOT / "docs").glob("writing-a-*.md")):
        blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), re.S)
        out[str(guide.relative_to(ROOT))] = "\n".join(blocks)
    return out


@pytest.mark.parametrize("name", sorted(user_code()))
def test_examples_and_guides_import_only_public_names(name: str) -> None:
    private = sorted(m for m in imported_modules(user_code()[name]) if not PUBLIC_MODULES.match(m))
    assert not private, f"{name} imports internal modules: {private}"


PLUGIN = """
from __future__ import annotations

import asyncio

from pyvduse import (
    REQUIRED_FEATURES,
    Backend,
    BlkDevice,
    Chain,
    Daemon,
    DeviceId,
    DeviceSpec,
    MemoryBackend,
    NetDaemon,
    NetDevice,
    NetOptions,
    PacketQueueBackend,
    VirtioDevice,
    serve_device,
)


class Laggy(MemoryBackend):
    async def readv(self, offset: int, bufs: list[memoryview]) -> None:
        await asyncio.sleep(0.001)
        MemoryBackend.readv(self, offset, bufs)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await asyncio.sleep(0)


class Remote(Backend):
    can_flush = False

    @property
    def size(self) -> int:
        return 1 << 20

    async def open_async(self) -> None:
        await asyncio.sleep(0)

    async def readv(self, offset: int, bufs: list[memoryview]) -> None:
        await asyncio.sleep(0)

    async def writev(self, offset: int, bufs: list[memoryview]) -> None:
        await asyncio.sleep(0)


class Echo(VirtioDevice):
    def spec(self) -> DeviceSpec:
        return DeviceSpec(DeviceId.BLOCK, REQUIRED_FEATURES, bytes(64), 1, 64)

    async def handle(self, queue: int, chain: Chain) -> int:
        await asyncio.sleep(0)
        return 0


class Reflector(PacketQueueBackend):
    def send(self, packet: list[memoryview]) -> None:
        self.inject(b"".join(packet))


def build() -> None:
    blk = BlkDevice(Laggy(1 << 20))
    stats: dict[str, object] = Daemon(blk, "x", model=True).stats()
    print(stats, BlkDevice(Remote()), Echo())
    net = NetDevice(Reflector(), NetOptions())
    print(NetDaemon(net, "n"), serve_device)
"""


def test_mypy_strict_on_a_plugin_that_imports_only_public_names(tmp_path: Path) -> None:
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    assert imported_modules(PLUGIN) == {"pyvduse"}
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # this checkout's pyvduse, not an installed one
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--no-incremental",
            str(plugin),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr


class NoZeroes(Backend):
    """Only reads and writes: zeroes through writev, no DISCARD, no FLUSH."""

    can_flush = False

    def __init__(self) -> None:
        self.data = bytearray(MiB)
        self.writes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        for b in bufs:
            b[:] = self.data[offset : offset + len(b)]
            offset += len(b)

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        self.writes += 1
        for b in bufs:
            self.data[offset : offset + len(b)] = b
            offset += len(b)


def test_a_backend_without_write_zeroes_gets_zeroes_written_for_it() -> None:
    backend = NoZeroes()
    assert not backend.can_write_zeroes and not backend.can_discard
    device = BlkDevice(backend)
    offered = device.spec().features
    assert offered & bit(vb.F_WRITE_ZEROES)
    assert not offered & bit(vb.F_DISCARD) and not offered & bit(vb.F_FLUSH)
    with ModelRig(device) as rig:
        disk = BlkDriver(rig.kernel)
        disk.write(0, b"q" * 8192)
        disk.write_zeroes(512, 4096)
        assert disk.read(0, 8192) == b"q" * 512 + bytes(4096) + b"q" * 3584


class OnTheLoop(MemoryBackend):
    """Remembers which loop its hooks and its reads ran on."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.loops: dict[str, asyncio.AbstractEventLoop] = {}

    async def open_async(self) -> None:
        self.loops["open"] = asyncio.get_running_loop()

    async def readv(self, offset: int, bufs: list[memoryview]) -> None:
        self.loops["read"] = asyncio.get_running_loop()
        MemoryBackend.readv(self, offset, bufs)

    async def close_async(self) -> None:
        self.loops["close"] = asyncio.get_running_loop()


def test_open_and_close_run_on_the_loop_the_requests_run_on() -> None:
    backend = OnTheLoop(MiB)
    with ModelRig(BlkDevice(backend)) as rig:
        assert "open" in backend.loops  # before the first request
        BlkDriver(rig.kernel).read(0, 512)
    assert backend.loops["open"] is backend.loops["read"] is backend.loops["close"]


def test_a_device_s_stats_read_in_process() -> None:
    with ModelRig(BlkDevice(MemoryBackend(MiB))) as rig:
        disk = BlkDriver(rig.kernel)
        disk.write(0, b"s" * 4096)
        disk.read(0, 4096)
        stats = rig.stats()
    total = stats["total"]
    assert total["bytes_written"] == 4096 and total["bytes_read"] == 4096
    assert stats["queues"][0]["completed"] >= 2
