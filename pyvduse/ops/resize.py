"""Live resize: change the storage, then tell the driver through config space.

Growing: extend the backing file (``ftruncate``), then raise the capacity (config-space
write plus config interrupt: Linux's virtio_blk re-reads it and resizes the disk in place).
Shrinking (only when asked for): lower the capacity first, so new requests past the new end
fail, wait for the requests already in flight, then truncate the file. With no size, the
backing file's current size is taken (someone else grew it) and the capacity follows.

Backends: a file (regular file: any size; read-only or block device: re-read its size only),
null (any size: it stores nothing), NBD (re-read the export's size on a new connection: an
open NBD connection never learns of a resize). A memory backend cannot: its RAM is one fixed mapping.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol, runtime_checkable

from pyvduse.backend.base import Backend
from pyvduse.device.blk import BlkConfigError
from pyvduse.errors import ResizeError
from pyvduse.ops.protocol import BUSY, FAILED, INVALID_ARGUMENT, UNSUPPORTED, Json, OpsError
from pyvduse.ops.target import Target
from pyvduse.sizes import parse_size

log = logging.getLogger(__name__)

#: How long a shrink waits for requests already in flight before truncating the file.
SHRINK_DRAIN_SECONDS = 5.0


def parse_size_argument(value: Any) -> int | None:
    """The ``size`` argument: bytes as an integer, a size string ("2G"), or None/absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OpsError(INVALID_ARGUMENT, "size must be a number of bytes or a size like 2G")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError as e:
            raise OpsError(INVALID_ARGUMENT, str(e)) from None
    else:
        raise OpsError(INVALID_ARGUMENT, "size must be a number of bytes or a size like 2G")
    if size <= 0:
        raise OpsError(INVALID_ARGUMENT, "the size must be larger than zero")
    return size


@runtime_checkable
class Resizable(Protocol):
    """A device whose capacity can change while served (``BlkDevice``)."""

    backend: Backend

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def set_capacity(self, size_bytes: int) -> None: ...


CODES = {"unsupported": UNSUPPORTED, "invalid": INVALID_ARGUMENT, "failed": FAILED}


def resize(target: Target, size: int | None, shrink: bool = False) -> Json:
    """Resize ``target``'s block device; returns ``{"old_size", "size", "changed"}``."""
    device = target.server.device
    if not isinstance(device, Resizable):
        raise OpsError(UNSUPPORTED, "only block devices can be resized")
    if not target.resize_lock.acquire(blocking=False):
        raise OpsError(BUSY, "another resize is in progress")
    try:
        return _resize(target, device, size, shrink)
    except ResizeError as e:
        raise OpsError(CODES.get(e.code, FAILED), str(e)) from None
    finally:
        target.resize_lock.release()


def _resize(target: Target, device: Resizable, size: int | None, shrink: bool) -> Json:
    backend = device.backend
    bs = device.block_size
    old = device.capacity_bytes
    why_not = backend.size_settable()
    if size is None:
        found = backend.storage_size()
        size = found - found % bs
        if size <= 0:
            raise OpsError(FAILED, f"{backend.description} is now smaller than one block")
    elif why_not is not None:
        raise OpsError(UNSUPPORTED, why_not)

    if size % bs:
        raise OpsError(INVALID_ARGUMENT, f"size {size} is not a multiple of the block size {bs}")
    if size < old and not shrink:
        raise OpsError(
            INVALID_ARGUMENT,
            f"{size} is smaller than the current size {old}: "
            "shrinking loses the data past the new end; pass --shrink "
            '("shrink": true) if that is what you want',
        )

    if why_not is not None:  # the storage was resized by someone else: follow it
        _set_capacity(device, size)
    elif size >= old:
        backend.set_storage_size(size, grow_only=True)
        _set_capacity(device, size)
    else:
        _set_capacity(device, size)
        _wait_in_flight(target)
        backend.set_storage_size(size, grow_only=False)
    if size != old:
        log.info("%s resized from %d to %d bytes", target.name, old, size)
        if target.on_resize is not None:
            try:
                target.on_resize(size)
            except Exception as e:
                log.exception("after resizing %s", target.name)
                raise OpsError(FAILED, f"resized to {size} bytes, but then: {e}") from None
    return {"old_size": old, "size": size, "changed": size != old}


def _set_capacity(device: Resizable, size: int) -> None:
    if size == device.capacity_bytes:
        return
    try:
        device.set_capacity(size)
    except BlkConfigError as e:
        raise OpsError(INVALID_ARGUMENT, str(e)) from None
    except (OSError, RuntimeError) as e:
        raise OpsError(FAILED, f"cannot update the device's config space: {e}") from None


def _wait_in_flight(target: Target) -> None:
    """Before truncating: let requests that passed the old range check finish."""
    deadline = time.monotonic() + SHRINK_DRAIN_SECONDS
    for w in list(target.server.workers.values()):
        if not w.drain(max(deadline - time.monotonic(), 0.0)):
            raise OpsError(
                FAILED,
                "the capacity was lowered, but a request in flight did not "
                f"finish within {SHRINK_DRAIN_SECONDS:.0f} s, so the file keeps its "
                "size: run the same resize again later",
            )
