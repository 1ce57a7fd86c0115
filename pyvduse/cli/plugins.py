"""A user's own backend or device on the command line, as nbdkit loads its plugins.

``--backend mymodule:MyBackend`` (or ``path/to/file.py:MyBackend``) with ``--backend-arg
key=value`` (repeatable) constructs ``MyBackend(key=value, ...)``; ``--device`` and
``--device-arg`` the same for a whole device. Values arrive as text and are converted by the
constructor's annotations: ``int`` (sizes like ``64M`` allowed), ``float``, ``bool``
(``true``/``false``/``yes``/``no``/``1``/``0``), ``Path``; anything else stays text. The
annotations may be strings (``from __future__ import annotations``) naming what is imported
only under ``TYPE_CHECKING``. A ``FILE.py`` plugin imports modules beside it. The arguments
are checked before anything runs, and the constructor runs only once the kernel is known to
be ready (``construct``'s ``before``): a plugin creates nothing on a machine that cannot
serve it. Every failure is one line that says what to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyvduse.errors import UserError
from pyvduse.sizes import parse_size

TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def load_class(spec: str, option: str) -> type:
    """The class ``spec`` names: ``module:Class`` or ``file.py:Class``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UserError(
            f"{option} {spec}: give MODULE:CLASS or FILE.py:CLASS, for example {option} mybackends:RamDisk"
        )
    module = _load_module(where, option)
    cls = getattr(module, name, None)
    if cls is None:
        raise UserError(f"{option} {spec}: {where} has no '{name}'")
    if not isinstance(cls, type):
        raise UserError(f"{option} {spec}: '{name}' in {where} is not a class")
    return cls


def _load_module(where: str, option: str) -> Any:
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise UserError(f"{option}: there is no file {where}")
        name = f"pyvduse_plugin_{path.stem}"
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # the plugin's own modules beside it, as a script has
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"{option}: {where} cannot be loaded as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise UserError(f"{option}: loading {where} failed: {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise UserError(
            f"{option}: cannot import {where} ({e}): check its name and PYTHONPATH, or give the file's path"
        ) from None
    except Exception as e:
        raise UserError(f"{option}: importing {where} failed: {type(e).__name__}: {e}") from None


def parse_args(pairs: list[str] | None, option: str) -> dict[str, str]:
    """``key=value`` words into a dict (a key given twice is a mistake)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UserError(f"{option} {pair}: give KEY=VALUE, KEY a Python name")
        if key in out:
            raise UserError(f"{option}: {key} is given twice")
        out[key] = value
    return out


def construct(
    cls: type,
    args: dict[str, str],
    option: str,
    extra: dict[str, Any] | None = None,
    before: Callable[[], None] | None = None,
) -> Any:
    """``cls(**args, **extra)``, each text value converted by the constructor's annotation;
    ``before()`` runs once the arguments are known to fit, just before the constructor."""
    try:
        sig: inspect.Signature | None = inspect.signature(cls)
    except (TypeError, ValueError):
        sig = None
    hints = annotations_of(cls, sig)
    kwargs: dict[str, Any] = {}
    for key, text in args.items():
        kwargs[key] = _convert(text, hints.get(key), f"{option}-arg {key}={text}", cls.__name__)
    for key, value in (extra or {}).items():
        accepts = (
            sig is None
            or key in sig.parameters
            or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        )
        if accepts:
            kwargs[key] = value
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            wants = ", ".join(p for p in sig.parameters if p not in (extra or {}))
            raise UserError(
                f"{option}: {cls.__name__} refuses these arguments ({e}); it takes: {wants or 'none'}"
            ) from None
    if before is not None:
        before()
    try:
        return cls(**kwargs)
    except Exception as e:
        raise UserError(f"{option}: {cls.__name__}(...) failed: {type(e).__name__}: {e}") from None


#: What an annotation the module cannot evaluate (a ``TYPE_CHECKING`` import) may still be
#: read as, by its text.
_BY_NAME: dict[str, Any] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "Path": Path,
    "pathlib.Path": Path,
}


def annotations_of(cls: type, sig: inspect.Signature | None) -> dict[str, Any]:
    """The constructor's parameter annotations, evaluated: all at once when the module can
    (``typing.get_type_hints``), else one by one, and a string that still names nothing
    known by its text (``int | None``, ``Optional[Path]``)."""
    init = getattr(cls, "__init__", None)
    try:
        return typing.get_type_hints(init)
    except Exception:  # NameError: a name imported only for type checkers; anything odd
        pass
    if sig is None:
        return {}
    module = sys.modules.get(getattr(cls, "__module__", ""), None)
    namespace: dict[str, Any] = {**vars(typing), **_BY_NAME, **(vars(module) if module else {})}
    out: dict[str, Any] = {}
    for name, param in sig.parameters.items():
        ann = param.annotation
        if ann is inspect.Parameter.empty:
            continue
        if isinstance(ann, str):
            try:
                ann = eval(ann, namespace)  # the user's own annotation text
            except Exception:
                ann = _by_text(ann)
        if ann is not None:
            out[name] = ann
    return out


def _by_text(text: str) -> Any:
    """``int | None``, ``Optional[int]``, ``typing.Optional[Path]``: the one type they allow."""
    t = text.replace(" ", "")
    for wrapper in ("typing.Optional[", "Optional["):
        if t.startswith(wrapper) and t.endswith("]"):
            t = t[len(wrapper) : -1]
    kinds = [k for k in t.split("|") if k != "None"]
    return _BY_NAME.get(kinds[0]) if len(kinds) == 1 else None


def _convert(text: str, hint: Any, where: str, owner: str) -> Any:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = tuple(k for k in (typing.get_args(hint) if union else (hint,)) if k is not type(None))
    if len(kinds) != 1 or kinds[0] in (None, str, Any):
        return text
    kind = kinds[0]
    try:
        if kind is bool:
            low = text.lower()
            if low not in TRUE + FALSE:
                raise ValueError("not true or false")
            return low in TRUE
        if kind is int:
            try:
                return int(text, 0)
            except ValueError:
                return parse_size(text)
        if kind is float:
            return float(text)
        if kind is Path:
            return Path(text)
    except ValueError:
        raise UserError(f"{where}: {owner} wants {kind.__name__} there") from None
    return text
