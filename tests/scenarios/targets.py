"""One block-device interface over three transports, so the same scenarios run on each.

``ModelTarget`` drives pyvduse through the in-process model with the model's virtio-blk
driver; ``KernelTarget`` drives it through the real kernel in the test VM: the daemon serves
``/dev/vdX`` and Linux's virtio_blk driver carries the requests (O_DIRECT I/O, fsync,
BLKDISCARD and BLKZEROOUT ioctls, the serial from sysfs); ``VhostTarget`` too, but bound to
vhost_vdpa (``--bind vhost``), with the model's virtio-blk driver in this process driving
``/dev/vhost-vdpa-N`` from memory of its own, as a VMM would.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from pyvduse.backend.file import FileBackend
from pyvduse.device.blk import BlkDevice, BlkOptions
from pyvduse.model.blk_driver import BlkDriver
from pyvduse.model.vhost_vdpa import VhostVdpa
from pyvduse.testing.rig import ModelRig

BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


class BlockTarget(Protocol):
    capacity: int

    def read(self, offset: int, length: int, queue: int | None = None) -> bytes: ...
    def write(self, offset: int, data: bytes, queue: int | None = None) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def get_id(self) -> str: ...


class DriverTarget:
    """A target our own virtio-blk driver (``BlkDriver``) talks to."""

    driver: BlkDriver
    capacity: int

    def read(self, offset: int, length: int, queue: int | None = None) -> bytes:
        return self.driver.read(offset, length, queue=queue)

    def write(self, offset: int, data: bytes, queue: int | None = None) -> None:
        self.driver.write(offset, data, queue=queue)

    def flush(self) -> None:
        self.driver.flush()

    def discard(self, offset: int, length: int) -> None:
        self.driver.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.driver.write_zeroes(offset, length)

    def get_id(self) -> str:
        return self.driver.get_id()


class ModelTarget(DriverTarget):
    def __init__(self, image: Path, options: BlkOptions) -> None:
        self.backend = FileBackend(str(image), readonly=options.readonly)
        self.rig = ModelRig(BlkDevice(self.backend, options)).__enter__()
        self.driver = BlkDriver(self.rig.kernel)
        self.capacity = self.driver.capacity

    def close(self) -> None:
        self.driver.remove()
        self.rig.__exit__(None, None, None)
        self.backend.close()


def daemon_args(image: Path, options: BlkOptions) -> list[str]:
    """``pyvduse blk`` options serving ``image`` as ``options`` say."""
    args = [
        "--file",
        str(image),
        "--queues",
        str(options.num_queues),
        "--block-size",
        str(options.block_size),
    ]
    if options.serial:
        args += ["--serial", options.serial]
    if options.readonly:
        args.append("--readonly")
    if options.packed:
        args.append("--packed")
    return args


#: Where a VhostTarget's driver memory sits: one region, as a VM's RAM would.
VHOST_MEMORY = (1 << 20, 32 << 20)


class VhostTarget(DriverTarget):
    def __init__(self, image: Path, options: BlkOptions, name: str) -> None:
        from tests.vm.helpers import Daemon

        self.daemon = Daemon(*daemon_args(image, options), "--bind", "vhost", name=name)
        try:
            self.vhost = VhostVdpa(self.daemon.dev)
            self.vhost.iova.map(*VHOST_MEMORY)
            self.driver = BlkDriver(self.vhost)
        except BaseException:
            self.close()
            raise
        self.capacity = self.driver.capacity

    def close(self) -> None:
        # first: detaching waits for whoever holds /dev/vhost-vdpa-N to close it
        if hasattr(self, "vhost"):
            self.vhost.close()
        code = self.daemon.stop()
        assert code == 0, self.daemon.stderr()


class KernelTarget:
    def __init__(self, image: Path, options: BlkOptions, name: str) -> None:
        from tests.vm.helpers import Daemon

        self.daemon = Daemon(*daemon_args(image, options), name=name)
        self.dev = self.daemon.dev
        flags = (os.O_RDONLY if options.readonly else os.O_RDWR) | os.O_DIRECT
        self.fd = os.open(self.dev, flags)
        self.capacity = os.lseek(self.fd, 0, os.SEEK_END)

    def _aligned(self, length: int) -> mmap.mmap:
        return mmap.mmap(-1, max(length, mmap.PAGESIZE))

    def read(self, offset: int, length: int, queue: int | None = None) -> bytes:
        buf = self._aligned(length)
        n = os.preadv(self.fd, [memoryview(buf)[:length]], offset)
        if n != length:
            raise OSError(5, f"short read {n} of {length}")
        return buf[:length]

    def write(self, offset: int, data: bytes, queue: int | None = None) -> None:
        buf = self._aligned(len(data))
        buf[: len(data)] = data
        n = os.pwritev(self.fd, [memoryview(buf)[: len(data)]], offset)
        if n != len(data):
            raise OSError(5, f"short write {n} of {len(data)}")

    def flush(self) -> None:
        os.fsync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))

    def write_zeroes(self, offset: int, length: int) -> None:
        fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))

    def get_id(self) -> str:
        name = os.path.basename(self.dev)
        return Path(f"/sys/block/{name}/serial").read_text().strip()

    def close(self) -> None:
        os.close(self.fd)
        code = self.daemon.stop()
        assert code == 0, self.daemon.stderr()


class TargetFactory(AbstractContextManager["TargetFactory"]):
    """Builds targets of one kind and closes them all at the end of a test."""

    def __init__(self, kind: str, tmp: Path, packed: bool = False) -> None:
        self.kind = kind
        self.tmp = tmp
        self.packed = packed
        self.opened: list[ModelTarget | KernelTarget | VhostTarget] = []

    def __call__(self, size: int, **opts: object) -> ModelTarget | KernelTarget | VhostTarget:
        image = self.tmp / f"img{len(self.opened)}"
        fill = opts.pop("fill", None)
        if isinstance(fill, bytes):
            image.write_bytes(fill)
        else:
            with open(image, "wb") as f:
                f.truncate(size)
        options = BlkOptions(packed=self.packed, **opts)  # type: ignore[arg-type]
        name = f"sc{os.getpid() % 1000}x{len(self.opened)}"
        t: ModelTarget | KernelTarget | VhostTarget
        if self.kind == "model":
            t = ModelTarget(image, options)
        elif self.kind == "vhost":
            t = VhostTarget(image, options, name)
        else:
            t = KernelTarget(image, options, name)
        self.opened.append(t)
        return t

    def __exit__(self, *exc: object) -> None:
        for t in reversed(self.opened):
            t.close()
