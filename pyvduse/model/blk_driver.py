"""A virtio-blk driver for the model, usable from a test like a block device."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from pyvduse.abi import virtio_blk as vb
from pyvduse.model.virtio_driver import DriverQueue, Placement, VdpaOps, VirtioDriver

#: The status ``request`` reports when the device completed a request without writing its
#: status byte (used length 0: the device could not take the chain, e.g. unmapped memory).
NO_STATUS = -1


@dataclass(frozen=True)
class Pending:
    """A request submitted and not yet waited for."""

    queue: DriverQueue
    ticket: int


class BlkIOError(OSError):
    """A request completed with a status other than OK."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(5, f"{what}: status {status}")
        self.status = status


class BlkDriver:
    """read/write/flush/discard/write_zeroes/get_id over a virtio-blk device: the model's,
    or a real one through vhost-vdpa."""

    def __init__(
        self,
        kernel: VdpaOps,
        *,
        indirect: bool = True,
        placement: Placement | None = None,
        **driver_args: Any,
    ) -> None:
        """``driver_args`` go to ``VirtioDriver`` (features, queue size and count, ...)."""
        self.virtio = VirtioDriver(kernel, placement=placement, **driver_args)
        self.virtio.probe()
        self.indirect = indirect
        self._rr = 0
        self._rr_lock = threading.Lock()

    @property
    def config(self) -> vb.BlkConfig:
        return vb.BlkConfig.unpack(self.virtio.kernel.get_config(0, vb.CONFIG_SIZE))

    @property
    def capacity(self) -> int:
        """Bytes."""
        return self.config.capacity * vb.SECTOR_SIZE

    def _queue(self, queue: int | None) -> DriverQueue:
        qs = self.virtio.queues
        if queue is not None:
            return qs[queue]
        with self._rr_lock:
            self._rr = (self._rr + 1) % len(qs)
            return qs[self._rr]

    def submit(
        self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *, queue: int | None = None
    ) -> Pending:
        """Make one request available without waiting for it (see ``wait``)."""
        q = self._queue(queue)
        readable = [vb.OUTHDR.pack(rtype, 0, sector)] + ([out] if out else [])
        writable = ([in_len] if in_len else []) + [1]
        return Pending(q, q.submit(readable, writable, indirect=self.indirect))

    def wait(self, pending: Pending, timeout: float = 10.0) -> tuple[int, bytes, int]:
        """(status, data read, used length) of a submitted request; the status is
        ``NO_STATUS`` when the device wrote nothing."""
        c = pending.queue.wait(pending.ticket, timeout)
        status = c.data[-1] if c.length else NO_STATUS
        return status, c.data[:-1], c.length

    def request(
        self,
        rtype: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        *,
        queue: int | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, bytes, int]:
        """Submit one request and wait: (status, data read, used length)."""
        return self.wait(self.submit(rtype, sector, out, in_len, queue=queue), timeout)

    def _ok(self, what: str, *args: object, **kw: object) -> bytes:
        status, data, _ = self.request(*args, **kw)  # type: ignore[arg-type]
        if status != vb.ReqStatus.OK:
            raise BlkIOError(status, what)
        return data

    def read(self, offset: int, length: int, *, queue: int | None = None) -> bytes:
        return self._ok("read", vb.ReqType.IN, offset // vb.SECTOR_SIZE, in_len=length, queue=queue)

    def write(self, offset: int, data: bytes, *, queue: int | None = None) -> None:
        self._ok("write", vb.ReqType.OUT, offset // vb.SECTOR_SIZE, out=data, queue=queue)

    def flush(self) -> None:
        self._ok("flush", vb.ReqType.FLUSH)

    def _ranges(self, rtype: int, what: str, ranges: list[tuple[int, int]], flags: int) -> None:
        payload = b"".join(
            vb.DISCARD_SEGMENT.pack(off // vb.SECTOR_SIZE, n // vb.SECTOR_SIZE, flags) for off, n in ranges
        )
        self._ok(what, rtype, 0, out=payload)

    def discard(self, offset: int, length: int) -> None:
        self._ranges(vb.ReqType.DISCARD, "discard", [(offset, length)], 0)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._ranges(
            vb.ReqType.WRITE_ZEROES,
            "write_zeroes",
            [(offset, length)],
            vb.WRITE_ZEROES_FLAG_UNMAP if unmap else 0,
        )

    def get_id(self) -> str:
        return self._ok("get_id", vb.ReqType.GET_ID, in_len=vb.ID_BYTES).rstrip(b"\0").decode()

    def remove(self) -> None:
        self.virtio.remove()
