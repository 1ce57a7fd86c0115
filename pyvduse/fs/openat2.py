"""``openat2(2)`` and ``renameat2(2)``, which Python's os module lacks (Linux 5.6+, 3.15+)."""

from __future__ import annotations

import ctypes
import os
import platform

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

#: Resolution confined below the directory fd: no "..", no absolute path, no symlink, no
#: /proc magic link on the way (a final-component symlink is opened as itself with
#: O_PATH | O_NOFOLLOW, refused otherwise).
CONFINED = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS

_SYSCALLS = {"x86_64": (437, 316), "aarch64": (437, 276)}
_NR_OPENAT2, _NR_RENAMEAT2 = _SYSCALLS.get(platform.machine(), (437, 316))
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _check(ret: int, name: bytes) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), name.decode(errors="replace"))
    return ret


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = CONFINED) -> int:
    """An fd for ``path`` below ``dirfd``, resolved as ``resolve`` says (O_CLOEXEC added)."""
    creates = bool(flags & os.O_CREAT) or (flags & os.O_TMPFILE) == os.O_TMPFILE
    how = OpenHow(flags | os.O_CLOEXEC, mode if creates else 0, resolve)
    ret = _syscall(
        ctypes.c_long(_NR_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(int(ret), path)


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    """renameat2 (RENAME_NOREPLACE 1, RENAME_EXCHANGE 2, RENAME_WHITEOUT 4)."""
    ret = _syscall(
        ctypes.c_long(_NR_RENAMEAT2),
        ctypes.c_int(olddirfd),
        ctypes.c_char_p(old),
        ctypes.c_int(newdirfd),
        ctypes.c_char_p(new),
        ctypes.c_uint(flags),
    )
    _check(int(ret), old)
