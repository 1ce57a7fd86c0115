"""librbd and librados, the Ceph project's own client libraries, through ``ctypes``.

Why ``ctypes`` and not Debian's ``python3-rbd``: that binding is a Cython extension built for
the system Python only, and it completes asynchronous calls by running a Python callback on
one of librbd's threads per request, each taking the GIL. Through ``ctypes`` we use the C
API directly: reads and writes are ``rbd_aio_readv``/``rbd_aio_writev`` with iovecs
pointing straight into the driver's buffers (no copy), and completions are collected with
``rbd_set_image_notification`` (an eventfd) and ``rbd_poll_io_events`` on a thread of ours,
so no Python runs on librbd's threads for a request. All it takes is ``librbd1`` (which
brings ``librados2``); no Python package at all.

``load()`` returns the two libraries with their prototypes set, or raises
``RbdUnavailable`` with the one line that says what to install.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from typing import Any

#: What to do without librbd (the whole message of ``RbdUnavailable``).
INSTALL_HINT = (
    "--rbd needs librbd, Ceph's client library: install it with 'apt install librbd1' "
    "(Debian, Ubuntu) or 'dnf install librbd1' (Fedora)"
)

#: ``rbd_set_image_notification``'s event types (librbd.h).
EVENT_TYPE_PIPE = 1
EVENT_TYPE_EVENTFD = 2

c_void_p = ctypes.c_void_p
UPDATE_CALLBACK = ctypes.CFUNCTYPE(None, c_void_p)


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", ctypes.c_size_t)]


class RbdUnavailable(ImportError):
    """librbd or librados cannot be loaded."""


@dataclass(frozen=True)
class Libs:
    rados: ctypes.CDLL
    rbd: ctypes.CDLL


_lock = threading.Lock()
_loaded: Libs | None = None

_RADOS: dict[str, tuple[Any, list[Any]]] = {
    "rados_create": (ctypes.c_int, [ctypes.POINTER(c_void_p), ctypes.c_char_p]),
    "rados_conf_read_file": (ctypes.c_int, [c_void_p, ctypes.c_char_p]),
    "rados_conf_set": (ctypes.c_int, [c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
    "rados_connect": (ctypes.c_int, [c_void_p]),
    "rados_shutdown": (None, [c_void_p]),
    "rados_ioctx_create": (ctypes.c_int, [c_void_p, ctypes.c_char_p, ctypes.POINTER(c_void_p)]),
    "rados_ioctx_destroy": (None, [c_void_p]),
}
_RBD: dict[str, tuple[Any, list[Any]]] = {
    "rbd_open": (ctypes.c_int, [c_void_p, ctypes.c_char_p, ctypes.POINTER(c_void_p), ctypes.c_char_p]),
    "rbd_open_read_only": (
        ctypes.c_int,
        [c_void_p, ctypes.c_char_p, ctypes.POINTER(c_void_p), ctypes.c_char_p],
    ),
    "rbd_close": (ctypes.c_int, [c_void_p]),
    "rbd_get_size": (ctypes.c_int, [c_void_p, ctypes.POINTER(ctypes.c_uint64)]),
    "rbd_resize": (ctypes.c_int, [c_void_p, ctypes.c_uint64]),
    "rbd_aio_create_completion": (ctypes.c_int, [c_void_p, c_void_p, ctypes.POINTER(c_void_p)]),
    "rbd_aio_readv": (
        ctypes.c_int,
        [c_void_p, ctypes.POINTER(Iovec), ctypes.c_int, ctypes.c_uint64, c_void_p],
    ),
    "rbd_aio_writev": (
        ctypes.c_int,
        [c_void_p, ctypes.POINTER(Iovec), ctypes.c_int, ctypes.c_uint64, c_void_p],
    ),
    "rbd_aio_flush": (ctypes.c_int, [c_void_p, c_void_p]),
    "rbd_aio_discard": (ctypes.c_int, [c_void_p, ctypes.c_uint64, ctypes.c_uint64, c_void_p]),
    "rbd_aio_write_zeroes": (
        ctypes.c_int,
        [c_void_p, ctypes.c_uint64, ctypes.c_size_t, c_void_p, ctypes.c_int, ctypes.c_int],
    ),
    "rbd_aio_get_return_value": (ctypes.c_ssize_t, [c_void_p]),
    "rbd_aio_get_arg": (c_void_p, [c_void_p]),
    "rbd_aio_release": (None, [c_void_p]),
    "rbd_set_image_notification": (ctypes.c_int, [c_void_p, ctypes.c_int, ctypes.c_int]),
    "rbd_poll_io_events": (ctypes.c_int, [c_void_p, ctypes.POINTER(c_void_p), ctypes.c_int]),
    "rbd_update_watch": (
        ctypes.c_int,
        [c_void_p, ctypes.POINTER(ctypes.c_uint64), UPDATE_CALLBACK, c_void_p],
    ),
    "rbd_update_unwatch": (ctypes.c_int, [c_void_p, ctypes.c_uint64]),
}


def _open(names: tuple[str, ...], functions: dict[str, tuple[Any, list[Any]]]) -> ctypes.CDLL:
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            errors.append(str(e))
            continue
        for fn, (restype, argtypes) in functions.items():
            f = getattr(lib, fn)  # AttributeError: too old a library
            f.restype = restype
            f.argtypes = argtypes
        return lib
    raise OSError("; ".join(errors))


def load(
    rados_names: tuple[str, ...] = ("librados.so.2",), rbd_names: tuple[str, ...] = ("librbd.so.1",)
) -> Libs:
    """librados and librbd (loaded once); ``RbdUnavailable`` when either is missing."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            libs = Libs(rados=_open(rados_names, _RADOS), rbd=_open(rbd_names, _RBD))
        except OSError:
            raise RbdUnavailable(INSTALL_HINT) from None
        except AttributeError as e:
            raise RbdUnavailable(f"{INSTALL_HINT} (this librbd is too old: {e})") from None
        if rados_names == ("librados.so.2",) and rbd_names == ("librbd.so.1",):
            _loaded = libs
        return libs


def available() -> bool:
    """Whether ``load`` would succeed."""
    try:
        load()
    except RbdUnavailable:
        return False
    return True
