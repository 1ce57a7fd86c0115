"""virtio-fs (device id 26): a FUSE session over virtqueues (virtio 1.2 section 5.11).

Queue 0 is the high-priority queue (FORGET and BATCH_FORGET, which have no reply; the
driver sends INTERRUPT nowhere), queues 1..N are request queues: each chain is one FUSE
request, its readable part the request, its writable part room for the reply. Requests
of every queue are served concurrently and complete out of order: a filesystem of plain
methods runs each on the runtime's thread pool (or inline with ``--aio sync``), an
``async def`` one on its event loop. The device offers no notification queue and no DAX
window (VDUSE has neither).

Linux's VDUSE accepts this device id from 6.15 on; older kernels (6.12) refuse it at
creation with EINVAL.
"""

from __future__ import annotations

import errno
import functools
import inspect

from pyvduse.abi import fuse
from pyvduse.abi.virtio import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, DeviceId, bit
from pyvduse.device.base import REQUIRED_FEATURES, DeviceSpec, VirtioDevice
from pyvduse.device.request import Request
from pyvduse.fs.api import Filesystem
from pyvduse.fs.session import FuseSession
from pyvduse.fs.wire import parse_header, write_error
from pyvduse.ring.chain import Chain

#: The most request queues offered (a queue per CPU is what the driver would use).
MAX_REQUEST_QUEUES = 64


class FsConfigError(ValueError):
    """The options cannot describe a virtio-fs device."""


class FsDevice(VirtioDevice):
    """Serves ``fs`` as virtio-fs ``tag`` on ``request_queues`` request queues."""

    def __init__(
        self,
        fs: Filesystem,
        tag: str,
        *,
        request_queues: int = 1,
        queue_size: int = 128,
        readonly: bool = False,
    ) -> None:
        super().__init__()
        try:
            self._config = fuse.fs_config(tag, request_queues)
        except ValueError as e:
            raise FsConfigError(str(e)) from None
        if not 1 <= request_queues <= MAX_REQUEST_QUEUES:
            raise FsConfigError(f"--queues must be 1 to {MAX_REQUEST_QUEUES}, not {request_queues}")
        if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise FsConfigError(f"a queue size is a power of two from 2 to 32768, not {queue_size}")
        self.fs = fs
        self.tag = tag
        self.request_queues = request_queues
        self.queue_size = queue_size
        self.session = FuseSession(fs, readonly=readonly)
        self._async = any(
            inspect.iscoroutinefunction(getattr(fs, n, None)) for n in dir(type(fs)) if not n.startswith("_")
        )

    def spec(self) -> DeviceSpec:
        return DeviceSpec(
            device_id=DeviceId.FS,
            features=REQUIRED_FEATURES | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC),
            config=self._config,
            num_queues=1 + self.request_queues,
            queue_size=self.queue_size,
        )

    def identity(self) -> dict[str, object]:
        return {**super().identity(), "tag": self.tag}

    def reset(self) -> None:
        super().reset()
        self.session.initialized = False

    def submit(self, request: Request) -> None:
        chain = request.chain
        if chain.error is not None:
            request.complete(0)  # nothing in it can be trusted; the driver gets no reply
            self.request_log.warning("queue %d: %s", request.queue, chain.error)
            return
        serve = functools.partial(self.session.serve, chain.readable, chain.writable)
        if request.queue == fuse.HIPRIO_QUEUE or self._async:
            result = serve()  # FORGETs are cheap; an async filesystem does not block
            if isinstance(result, int):
                request.complete(result)
            else:
                request.run(result)
            return
        request.run_blocking(serve)

    def write_failure(self, chain: Chain) -> int:
        """EIO for the request's unique id (a reply of nothing would leave the driver's
        request without an answer it can read)."""
        hdr = parse_header(chain.readable)
        if hdr is None or hdr[1] in (fuse.Opcode.FORGET, fuse.Opcode.BATCH_FORGET):
            return 0
        return write_error(chain.writable, hdr[2], errno.EIO)

    def describe_request(self, chain: Chain) -> str:
        head = chain.read(0, fuse.IN_HEADER.size)
        if len(head) < fuse.IN_HEADER.size:
            return f"request {chain.head} (no FUSE header)"
        opcode, unique = fuse.IN_HEADER.unpack(head)[1:3]
        try:
            name = fuse.Opcode(opcode).name
        except ValueError:
            name = f"opcode {opcode}"
        return f"FUSE {name} unique {unique}"

    def status(self) -> dict[str, object]:
        return {"tag": self.tag, "request_queues": self.request_queues, "mounted": self.session.initialized}

    def total_counts(self) -> dict[str, object]:
        with self.session._lock:
            return dict(self.session.counts)
