"""A Ceph RBD image as the device's storage, through librbd (``rbd_binding``).

- **Many requests in flight.** Each request is one asynchronous librbd call
  (``rbd_aio_readv``/``writev``/``flush``/``discard``/``write_zeroes``), issued by the
  queue's worker as it takes the request, straight into and out of the driver's buffers.
  librbd signals finished calls on an eventfd (``rbd_set_image_notification``); one thread
  of ours sleeps in ``poll(2)`` on it, collects them with ``rbd_poll_io_events`` and
  completes their requests, in whatever order they finish.
- **The image** gives the size; a snapshot (``POOL/IMAGE@SNAP``) is opened read-only.
  ``rbd resize`` while served: librbd's update watch (``rbd_update_watch``) calls
  ``watch_storage_size``'s callback, and the daemon resizes the device as ``ctl resize``
  with no size does. ``ctl resize SIZE`` resizes the image itself (``rbd_resize``).
- **Faults.** librbd resends whatever an OSD or monitor restart interrupted; requests just
  wait. ``rados_osd_op_timeout`` (``DEFAULT_OPTIONS``, overridable with ``options``) bounds
  how long one waits for a cluster that is gone: it then fails with ETIMEDOUT (IOERR to the
  driver). ``close`` waits at most ``CLOSE_SECONDS`` for librbd to let go.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import threading
from collections.abc import Callable

from pyvduse.backend import rbd_binding
from pyvduse.backend.base import Done, LaterBackend
from pyvduse.backend.rbd_binding import EVENT_TYPE_EVENTFD, UPDATE_CALLBACK, Iovec
from pyvduse.backend.rbd_spec import DEFAULT_OPTIONS, RbdImage
from pyvduse.errors import ResizeError

log = logging.getLogger(__name__)

#: ``close`` gives librbd this long to finish (a cluster that is gone never answers).
CLOSE_SECONDS = 5.0
#: Completions collected per ``rbd_poll_io_events`` call.
POLL_BATCH = 64
_ZERO_THICK = 1  # RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: write zeroes, keep the space


class RbdError(Exception):
    """Opening the image failed (one line that says what to do)."""


def _why(rc: int) -> str:
    return os.strerror(-rc) if rc < 0 else f"error {rc}"


class _Pending:
    __slots__ = ("done", "keep")

    def __init__(self, done: Done, keep: object) -> None:
        self.done = done
        self.keep = keep  # the iovecs and buffer exports, alive until librbd is done


class RbdBackend(LaterBackend):
    """The image ``image`` (``POOL/IMAGE[@SNAP]``) of the cluster that ``conf`` (a
    ceph.conf; None: Ceph's default search) and ``options`` (Ceph option names and values,
    ``mon_host``, ``keyring``, ...) describe, as client ``client_id`` (``admin`` when None).
    ``readonly``: open the image read-only (a snapshot always is). Raises ``RbdError``, or
    ``RbdUnavailable`` without librbd."""

    kind = "rbd"

    def __init__(
        self,
        image: str | RbdImage,
        *,
        conf: str | None = None,
        client_id: str | None = None,
        options: dict[str, str] | None = None,
        readonly: bool = False,
    ) -> None:
        self.spec = image if isinstance(image, RbdImage) else RbdImage.parse(image)
        self.libs = rbd_binding.load()
        self.readonly = readonly or self.spec.snap is not None
        self._cluster = ctypes.c_void_p()
        self._ioctx = ctypes.c_void_p()
        self._image = ctypes.c_void_p()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next = 1
        self._closed = False
        self._watch: int | None = None
        self._watch_cb: object = None
        self._efd = -1
        self._stop_r, self._stop_w = -1, -1
        try:
            self._connect(conf, client_id, {**DEFAULT_OPTIONS, **(options or {})})
            self._open()
            self._size = self.storage_size()
            self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            rc = self.libs.rbd.rbd_set_image_notification(self._image, self._efd, EVENT_TYPE_EVENTFD)
            if rc < 0:
                raise RbdError(f"{self.spec}: librbd cannot signal completions on an eventfd: {_why(rc)}")
        except BaseException:
            self._release()
            raise
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._completions, name=f"rbd {self.spec}", daemon=True)
        self._thread.start()

    # -- opening ------------------------------------------------------------------------------

    def _connect(self, conf: str | None, client_id: str | None, options: dict[str, str]) -> None:
        rados = self.libs.rados
        rc = rados.rados_create(ctypes.byref(self._cluster), client_id.encode() if client_id else None)
        if rc < 0:
            raise RbdError(f"cannot create a Ceph client{f' {client_id}' if client_id else ''}: {_why(rc)}")
        rc = rados.rados_conf_read_file(self._cluster, conf.encode() if conf else None)
        if rc < 0 and conf is not None:
            if not os.path.exists(conf):
                raise RbdError(f"--ceph-conf {conf} does not exist: give the cluster's ceph.conf")
            raise RbdError(f"cannot read the Ceph configuration {conf}: {_why(rc)} (is it a ceph.conf?)")
        for key, value in options.items():
            rc = rados.rados_conf_set(self._cluster, key.encode(), value.encode())
            if rc == -errno.ENOENT:
                raise RbdError(f"--ceph-option {key}: Ceph has no option of that name")
            if rc < 0:
                raise RbdError(f"--ceph-option {key}={value}: {_why(rc)}")
        rc = rados.rados_connect(self._cluster)
        if rc < 0:
            who = f"client.{client_id or 'admin'}"
            if rc in (-errno.EACCES, -errno.EPERM):
                raise RbdError(
                    f"the Ceph cluster refused {who}: check its key (the keyring, --ceph-id) and its caps"
                )
            if rc == -errno.ETIMEDOUT:
                raise RbdError(
                    f"no Ceph monitor answered {who} within client_mount_timeout "
                    f"({options.get('client_mount_timeout')} s): is the cluster running, and is "
                    "mon_host in the configuration its address? (a wrong key can look like this too)"
                )
            if rc == -errno.ENOENT:
                raise RbdError(
                    f"cannot connect to Ceph as {who}: no monitor address (mon_host) or keyring: "
                    "give --ceph-conf PATH or --ceph-option mon_host=ADDRESS"
                )
            raise RbdError(f"cannot connect to the Ceph cluster as {who}: {_why(rc)}")

    def _open(self) -> None:
        rados, rbd = self.libs.rados, self.libs.rbd
        rc = rados.rados_ioctx_create(self._cluster, self.spec.pool.encode(), ctypes.byref(self._ioctx))
        if rc == -errno.ENOENT:
            raise RbdError(
                f"Ceph has no pool {self.spec.pool!r}: create it, or name another ('ceph osd lspools')"
            )
        if rc < 0:
            raise RbdError(f"cannot open the pool {self.spec.pool!r}: {_why(rc)}")
        opener = rbd.rbd_open_read_only if self.readonly else rbd.rbd_open
        snap = self.spec.snap.encode() if self.spec.snap else None
        rc = opener(self._ioctx, self.spec.image.encode(), ctypes.byref(self._image), snap)
        if rc == -errno.ENOENT and snap is not None:
            probe = ctypes.c_void_p()
            if rbd.rbd_open_read_only(self._ioctx, self.spec.image.encode(), ctypes.byref(probe), None) == 0:
                rbd.rbd_close(probe)
                raise RbdError(
                    f"the RBD image {self.spec.pool}/{self.spec.image} has no snapshot "
                    f"{self.spec.snap!r} ('rbd snap ls {self.spec.pool}/{self.spec.image}')"
                )
        if rc == -errno.ENOENT:
            raise RbdError(
                f"the pool {self.spec.pool!r} has no RBD image {self.spec.image!r}: create it "
                f"('rbd create --size 1G {self.spec.pool}/{self.spec.image}') or name another"
            )
        if rc < 0:
            self._image = ctypes.c_void_p()
            raise RbdError(f"cannot open the RBD image {self.spec}: {_why(rc)}")

    # -- Backend ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def description(self) -> str:
        return f"rbd:{self.spec}"

    def storage_size(self) -> int:
        size = ctypes.c_uint64()
        rc = self.libs.rbd.rbd_get_size(self._image, ctypes.byref(size))
        if rc < 0:
            raise ResizeError("failed", f"cannot read the size of {self.spec}: {_why(rc)}")
        self._size = size.value
        return size.value

    def size_settable(self) -> str | None:
        if self.readonly:
            return f"{self.description} is read-only: pyvduse cannot resize it"
        return None

    def set_storage_size(self, size: int, *, grow_only: bool) -> None:
        if grow_only and self.storage_size() >= size:
            return
        rc = self.libs.rbd.rbd_resize(self._image, size)
        if rc < 0:
            raise ResizeError("failed", f"cannot resize {self.spec} to {size} bytes: {_why(rc)}")
        self._size = size

    def watch_storage_size(self, changed: Callable[[], None]) -> bool:
        """Call ``changed()`` (on a librbd thread: it must not wait) whenever the image's
        header changes: someone resized it (or took a snapshot: the size is then the same)."""

        def on_update(_arg: object) -> None:
            try:
                changed()
            except Exception:
                log.exception("%s: after the image changed", self.spec)

        cb = UPDATE_CALLBACK(on_update)
        handle = ctypes.c_uint64()
        rc = self.libs.rbd.rbd_update_watch(self._image, ctypes.byref(handle), cb, None)
        if rc < 0:
            log.warning("%s: cannot watch the image for resizes: %s", self.spec, _why(rc))
            return False
        self._watch_cb = cb  # ctypes frees the trampoline with the object
        self._watch = handle.value
        return True

    def start(self, queue: int, call: str, args: tuple[object, ...], done: Done) -> None:
        rbd = self.libs.rbd
        keep: object = None
        comp = ctypes.c_void_p()
        with self._lock:
            if self._closed:
                done(OSError(errno.ESHUTDOWN, f"{self.spec} is closed"))
                return
            token = self._next
            self._next += 1
        if call in ("readv", "writev"):
            offset, bufs = args
            assert isinstance(offset, int) and isinstance(bufs, list)
            iov, keep = _iovecs(bufs, call == "readv")
        self._pending[token] = _Pending(done, keep)
        rc = rbd.rbd_aio_create_completion(ctypes.c_void_p(token), None, ctypes.byref(comp))
        if rc == 0:
            img = self._image
            if call == "readv":
                rc = rbd.rbd_aio_readv(img, iov, len(iov), offset, comp)
            elif call == "writev":
                rc = rbd.rbd_aio_writev(img, iov, len(iov), offset, comp)
            elif call == "flush":
                rc = rbd.rbd_aio_flush(img, comp)
            elif call == "discard":
                off, length = args
                rc = rbd.rbd_aio_discard(img, off, length, comp)
            elif call == "write_zeroes":
                off, length, unmap = args
                rc = rbd.rbd_aio_write_zeroes(img, off, length, comp, 0 if unmap else _ZERO_THICK, 0)
            else:
                rc = -errno.EOPNOTSUPP
            if rc < 0:
                rbd.rbd_aio_release(comp)
        if rc < 0:
            pending = self._pending.pop(token, None)
            if pending is not None:
                done(OSError(-rc, f"rbd {call}: {_why(rc)}"))

    def _completions(self) -> None:
        rbd = self.libs.rbd
        comps = (ctypes.c_void_p * POLL_BATCH)()
        poller = select.poll()
        poller.register(self._efd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_r in ready:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
            while True:
                n = rbd.rbd_poll_io_events(self._image, comps, POLL_BATCH)
                for i in range(max(n, 0)):
                    c = comps[i]
                    token = rbd.rbd_aio_get_arg(c) or 0
                    rc = rbd.rbd_aio_get_return_value(c)
                    rbd.rbd_aio_release(c)
                    pending = self._pending.pop(token, None)
                    if pending is None:
                        continue
                    error = OSError(-rc, f"rbd: {_why(rc)}") if rc < 0 else None
                    try:
                        pending.done(error)
                    except Exception:
                        log.exception("%s: completing a request", self.spec)
                if n < POLL_BATCH:
                    break

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        closer = threading.Thread(target=self._release, name=f"rbd close {self.spec}", daemon=True)
        closer.start()
        closer.join(CLOSE_SECONDS)
        if closer.is_alive():
            log.warning(
                "%s: librbd did not let go within %g s (is the cluster gone?): leaving it",
                self.spec,
                CLOSE_SECONDS,
            )

    def _release(self) -> None:
        rbd, rados = self.libs.rbd, self.libs.rados
        if self._stop_w >= 0:  # first: it polls the image
            os.write(self._stop_w, b"x")
            self._thread.join()
            os.close(self._stop_w)
            os.close(self._stop_r)
            self._stop_w = self._stop_r = -1
        if self._watch is not None:
            rbd.rbd_update_unwatch(self._image, self._watch)
            self._watch = None
        if self._image:
            rbd.rbd_close(self._image)  # waits for the calls still in flight
            self._image = ctypes.c_void_p()
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self._ioctx:
            rados.rados_ioctx_destroy(self._ioctx)
            self._ioctx = ctypes.c_void_p()
        if self._cluster:
            rados.rados_shutdown(self._cluster)
            self._cluster = ctypes.c_void_p()


def _iovecs(bufs: list[memoryview], writable: bool) -> tuple[ctypes.Array[Iovec], object]:
    """An iovec array over ``bufs`` (their memory itself), and what keeps it valid. A
    read-only buffer (a write from bytes) is copied: ctypes takes addresses of writable
    buffers only."""
    iov = (Iovec * len(bufs))()
    keep: list[object] = [iov]
    for i, b in enumerate(bufs):
        n = b.nbytes
        if n == 0:
            continue
        if b.readonly:
            if writable:
                raise OSError(errno.EFAULT, "a read into a read-only buffer")
            arr: ctypes.Array[ctypes.c_char] = (ctypes.c_char * n).from_buffer_copy(b)
        else:
            arr = (ctypes.c_char * n).from_buffer(b)
        keep.append(arr)
        iov[i].iov_base = ctypes.addressof(arr)
        iov[i].iov_len = n
    return iov, keep
