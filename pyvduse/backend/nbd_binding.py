"""Finding libnbd's Python binding (the ``nbd`` module of the NBD authors' libnbd).

The binding is a C extension that the distributions build against their own Python:
Debian's ``python3-libnbd`` puts ``nbd.py`` and ``libnbdmod.cpython-311-x86_64-linux-gnu.so``
into ``/usr/lib/python3/dist-packages``, which an interpreter of its own (pyenv, a venv
without system packages) does not search. A plain ``import nbd`` is tried first; then the
distribution's copy is loaded by file, only when its extension's ABI tag is one this
interpreter accepts (CPython keeps the ABI stable within a minor version, so the tag is the
compatibility test), and without adding the distribution's directory to ``sys.path``, so
nothing else of the system Python's leaks in. No usable binding: ``NbdUnavailable`` with
the one line that says what to install.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

#: What to do without the binding (the whole message of ``NbdUnavailable``).
INSTALL_HINT = (
    "--nbd needs libnbd's Python binding: install it with 'apt install "
    "python3-libnbd' (Debian, Ubuntu) or 'dnf install python3-libnbd' (Fedora)"
)

#: Where distributions install the binding for their own Python 3.
SYSTEM_DIRS = (
    "/usr/lib/python3/dist-packages",
    f"/usr/lib64/python3.{sys.version_info.minor}/site-packages",
    f"/usr/lib/python3.{sys.version_info.minor}/site-packages",
)

_lock = threading.Lock()
_loaded: ModuleType | None = None


class NbdUnavailable(ImportError):
    """libnbd's Python binding cannot be loaded into this interpreter."""


def _is_libnbd(module: ModuleType) -> bool:
    return hasattr(module, "NBD") and hasattr(module, "Buffer")


def _load_file(name: str, path: Path, loader: importlib.abc.Loader | None = None) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _from_system(dirs: tuple[str, ...]) -> ModuleType | None:
    """The distribution's binding, when its extension fits this interpreter's ABI."""
    for d in dirs:
        base = Path(d)
        wrapper = base / "nbd.py"
        if not wrapper.is_file():
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            ext = base / f"libnbdmod{suffix}"
            if ext.is_file():
                _load_file("libnbdmod", ext, importlib.machinery.ExtensionFileLoader("libnbdmod", str(ext)))
                return _load_file("nbd", wrapper)
    return None


def load(dirs: tuple[str, ...] | None = None) -> ModuleType:
    """The ``nbd`` module (loaded once); ``NbdUnavailable`` when there is none for us."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            import nbd as found

            if _is_libnbd(found):
                _loaded = found
                return _loaded
        except ImportError:
            pass
        try:
            module = _from_system(SYSTEM_DIRS if dirs is None else dirs)
        except (ImportError, OSError) as e:  # a broken install, a missing libnbd.so.0
            raise NbdUnavailable(f"{INSTALL_HINT} (loading it failed: {e})") from None
        if module is None or not _is_libnbd(module):
            raise NbdUnavailable(INSTALL_HINT)
        _loaded = module
        return module


def available() -> bool:
    """Whether ``load`` would succeed."""
    try:
        load()
    except NbdUnavailable:
        return False
    return True
