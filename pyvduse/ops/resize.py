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
import os
import stat
import time
from typing import Any

from pyvduse.backend.file import FileBackend
from pyvduse.backend.nbd import NbdBackend, NbdError
from pyvduse.backend.null import NullBackend
from pyvduse.device.blk import BlkConfigError, BlkDevice
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


def _is_blockdev(backend: FileBackend) -> bool:
    return stat.S_ISBLK(os.fstat(backend.fd).st_mode)


def resize(target: Target, size: int | None, shrink: bool = False) -> Json:
    """Resize ``target``'s block device; returns ``{"old_size", "size", "changed"}``."""
    device = target.server.device
    if not isinstance(device, BlkDevice):
        raise OpsError(UNSUPPORTED, "only block devices can be resized")
    if not target.resize_lock.acquire(blocking=False):
        raise OpsError(BUSY, "another resize is in progress")
    try:
        return _resize(target, device, size, shrink)
    finally:
        target.resize_lock.release()


def _resize(target: Target, device: BlkDevice, size: int | None, shrink: bool) -> Json:
    backend = device.backend
    bs = device.options.block_size
    old = device.capacity_bytes
    file: FileBackend | None = None
    if isinstance(backend, FileBackend):
        file = backend
        if size is not None and (backend.readonly or _is_blockdev(backend)):
            what = "a block device" if _is_blockdev(backend) else "open read-only"
            raise OpsError(UNSUPPORTED, f"{backend.path} is {what}, so pyvduse cannot change "
                           "its size: resize it yourself, then run 'resize' with no size")
        if size is None:
            try:
                found = backend.refresh_size()
            except OSError as e:
                raise OpsError(FAILED, f"cannot read the size of {backend.path}: "
                               f"{e.strerror}") from None
            size = found - found % bs
            if size <= 0:
                raise OpsError(FAILED, f"{backend.path} is now smaller than one block")
    elif isinstance(backend, NbdBackend):
        if size is not None:
            raise OpsError(UNSUPPORTED, "pyvduse cannot change the size of an NBD export: "
                           "resize it on the server, then run 'resize' with no size")
        try:
            found = backend.refresh_size()
        except NbdError as e:
            raise OpsError(FAILED, f"cannot read the export's size: {e}") from None
        size = found - found % bs
        if size <= 0:
            raise OpsError(FAILED, "the NBD export is now smaller than one block")
    elif isinstance(backend, NullBackend):
        if size is None:
            raise OpsError(INVALID_ARGUMENT, "a null device has no storage whose size could "
                           "have changed: give the new size")
    else:
        kind = backend.kind
        why = (": its RAM is one fixed mapping that cannot grow in place (serve a file on "
               "tmpfs with --file for a resizable RAM disk)" if kind == "memory" else "")
        raise OpsError(UNSUPPORTED, f"a {kind} device cannot be resized{why}")

    if size % bs:
        raise OpsError(INVALID_ARGUMENT, f"size {size} is not a multiple of the block size {bs}")
    if size < old and not shrink:
        raise OpsError(INVALID_ARGUMENT, f"{size} is smaller than the current size {old}: "
                       "shrinking loses the data past the new end; pass --shrink "
                       '("shrink": true) if that is what you want')

    if file is not None and not file.readonly and not _is_blockdev(file):
        if size >= old:
            _truncate(file, size, grow_only=True)
            _set_capacity(device, size)
        else:
            _set_capacity(device, size)
            _wait_in_flight(target)
            _truncate(file, size, grow_only=False)
    else:
        _set_capacity(device, size)
    if size != old:
        log.info("%s resized from %d to %d bytes", target.name, old, size)
        if target.on_resize is not None:
            try:
                target.on_resize(size)
            except Exception as e:
                log.exception("after resizing %s", target.name)
                raise OpsError(FAILED, f"resized to {size} bytes, but then: {e}") from None
    return {"old_size": old, "size": size, "changed": size != old}


def _truncate(file: FileBackend, size: int, grow_only: bool) -> None:
    current = file.refresh_size()
    if current == size or (grow_only and current > size):
        return
    try:
        os.ftruncate(file.fd, size)
    except OSError as e:
        raise OpsError(FAILED, f"cannot resize {file.path} to {size} bytes: "
                       f"{e.strerror}") from None
    finally:
        file.refresh_size()


def _set_capacity(device: BlkDevice, size: int) -> None:
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
            raise OpsError(FAILED, "the capacity was lowered, but a request in flight did not "
                           f"finish within {SHRINK_DRAIN_SECONDS:.0f} s, so the file keeps its "
                           "size: run the same resize again later")
