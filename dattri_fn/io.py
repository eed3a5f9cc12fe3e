"""Atomic save/load of method states, results and caches.

``save`` never leaves a half-written file under the target name: it writes a temporary file in
the same directory, flushes and fsyncs it, then ``os.replace``-s it over the target (atomic on
POSIX and Windows within one file system). A crash or an exception mid-write leaves the old file,
if any, untouched.

``load`` reads with ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary
objects. NamedTuples (our method states and results) are not on that allow-list, so ``save``
stores each one as a tagged dict ``{TAG: "module:QualName", "fields": {...}}`` and ``load``
rebuilds it: with the original class when its module is ``dattri_fn``'s or already imported (a
file never makes another module import) and it is a NamedTuple with the same fields, otherwise
with an ad-hoc ``collections.namedtuple`` of the same name and fields (and a warning). Tensors,
numbers, strings, ``None``, dicts, lists and tuples round-trip as themselves.
"""

from __future__ import annotations

import collections
import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ._checks import _msg

# A key no user dict is expected to carry; it marks an encoded NamedTuple.
TAG = "__dattri_fn_namedtuple__"


def _is_namedtuple(obj) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _encode(obj):
    if _is_namedtuple(obj):
        cls = type(obj)
        return {TAG: f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f: _encode(getattr(obj, f)) for f in cls._fields}}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_encode(v) for v in obj)
    return obj


def _namedtuple_class(name: str, fields: tuple[str, ...]):
    module, _, qualname = name.partition(":")
    try:
        # A file must not choose what gets imported: only dattri_fn's modules are imported by
        # name; any other class is looked up among the modules already loaded.
        cls = sys.modules.get(module)
        if cls is None:
            if module.split(".")[0] != "dattri_fn":
                raise ImportError(module)
            cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and issubclass(cls, tuple) and tuple(cls._fields) == fields:
            return cls
    except (ImportError, AttributeError):
        pass
    warnings.warn(f"load: cannot import NamedTuple {name!r} with fields {fields}; "
                  "returning an ad-hoc namedtuple with the same fields.", stacklevel=3)
    return collections.namedtuple(qualname.rsplit(".", 1)[-1] or "Record", fields)


def _decode(obj):
    if isinstance(obj, dict):
        if TAG in obj:
            fields = {k: _decode(v) for k, v in obj["fields"].items()}
            return _namedtuple_class(obj[TAG], tuple(fields))(**fields)
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode(v) for v in obj)
    return obj


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Return the path after writing ``obj`` there atomically (temp file, fsync, ``os.replace``).

    Args:
        obj: tensors, numbers, strings, ``None`` and NamedTuples / dicts / lists / tuples of
            them (anything ``torch.load(weights_only=True)`` can read back, plus NamedTuples).
        path: target file; its directory is created if missing.

    Returns:
        The target path as a :class:`pathlib.Path`.

    Raises:
        TypeError: ``path`` is not a str or PathLike.
        Whatever ``torch.save`` raises; the temporary file is removed and an existing file at
        ``path`` is left as it was.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(_msg("save", "path", "a str or os.PathLike", type(path).__name__))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(_encode(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave temp files behind either.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike, *, map_location=None, weights_only: bool = True) -> Any:
    """Return the object stored at ``path`` by :func:`save`, NamedTuples rebuilt.

    Args:
        path: a file written by :func:`save` (or by ``torch.save``).
        map_location: as in ``torch.load``, e.g. ``"cpu"``.
        weights_only: keep ``True`` (safe unpickling); ``False`` only for trusted files holding
            objects outside the allow-list.

    Returns:
        The saved object.

    Raises:
        TypeError: ``path`` is not a str or PathLike.
        FileNotFoundError: nothing at ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(_msg("load", "path", "a str or os.PathLike", type(path).__name__))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_msg("load", "path", "an existing file", repr(str(path))))
    return _decode(torch.load(path, map_location=map_location, weights_only=weights_only))
