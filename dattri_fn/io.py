"""Atomic save/load of method states, results and caches.

``save`` never leaves a half-written file under the target name: it writes a temporary file in
the same directory, flushes and fsyncs it, then ``os.replace``-s it over the target (atomic on
POSIX and Windows within one file system). A crash or an exception mid-write leaves the old file,
if any, untouched. Files get the mode the umask gives a new file (``0o666 & ~umask``: 0644 by
default), so a shared cache stays readable to its other users.

Temp files. The one for target ``d/name`` is ``d/.name.XXXXXXXX.tmp`` (8 characters of
``[a-z0-9_]``), locked (``flock``) by its writer until it is renamed. A save killed mid-write
(SIGKILL, power loss) leaves it behind; the next ``save`` or ``load`` of the same target removes
every such file that no live writer holds, and nothing else (other targets' temp files are left
to their own saves). On Windows, which has no ``flock``, a file still open by its writer cannot
be deleted, which protects it the same way.

``load`` reads with ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary
objects. NamedTuples (our method states and results) are not on that allow-list, so ``save``
stores each one as a tagged dict ``{TAG: "module:QualName", "fields": {...}}`` and ``load``
rebuilds it: with the original class when its module is ``dattri_fn``'s or already imported (a
file never makes another module import) and it is a NamedTuple with the same fields (or, for a
file from an older version, the leading ones, every later field having a default), otherwise
with an ad-hoc ``collections.namedtuple`` of the same name and fields (and a warning). Tensors,
numbers, strings, ``None``, dicts, lists and tuples round-trip as themselves.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import re
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ._checks import _msg
from ._types import LinOp

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# A key no user dict is expected to carry; it marks an encoded NamedTuple.
TAG = "__dattri_fn_namedtuple__"
# tempfile.mkstemp's alphabet and length, so leftovers of older versions (which used it) match.
_TMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TMP_RANDOM = re.compile(r"[a-z0-9_]{8}")
_OPEN_FLAGS = (getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0))
# Directories seen with no temp file at all, by (st_dev, st_ino, st_mtime_ns): a save or load
# there skips the listing (~0.6 us an entry: O(n^2) over a cache of n files) until the directory
# changes. A save into a clean directory marks it clean again after its rename, so one process
# filling a cache lists it once. The cost: a temp file created by another process during that
# save (or within a coarse mtime tick) is seen only after the next change or by the next
# process; a stamp can delay a cleanup, never remove a file.
_CLEAN_DIRS: dict[str, tuple[int, int, int]] = {}


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


def _fits(cls: type, fields: tuple[str, ...]) -> bool:
    """Whether a file's saved ``fields`` rebuild ``cls``: its own fields, or a prefix of them
    whose missing fields all have defaults (a state saved before those fields were added, e.g.
    K-FAC factors from before their ``diagonal`` field, stop 20)."""
    own = tuple(getattr(cls, "_fields", ()))
    defaults = getattr(cls, "_field_defaults", {})
    return own[:len(fields)] == fields and all(f in defaults for f in own[len(fields):])


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
        if isinstance(cls, type) and issubclass(cls, tuple) and _fits(cls, fields):
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


def _unsaveable(obj, where: str = "obj") -> str | None:
    """The path of the first LinOp, lambda or local function/class inside ``obj`` (closures
    ``torch.save`` cannot pickle), or None."""
    if isinstance(obj, torch.Tensor):
        return None
    if _is_namedtuple(obj):
        items = [(f"{where}.{f}", getattr(obj, f)) for f in type(obj)._fields]
    elif isinstance(obj, dict):
        items = [(f"{where}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
    else:  # module-level functions and classes pickle by name: only local ones are refused
        local = any(m in getattr(t, "__qualname__", "") for t in (obj, type(obj))
                    for m in ("<locals>", "<lambda>"))
        return where if isinstance(obj, LinOp) or (callable(obj) and local) else None
    return next((bad for w, v in items if (bad := _unsaveable(v, w)) is not None), None)


def _check_saveable(obj) -> None:
    from .attribute.influence_config import InfluenceEnsembleState, InfluenceState

    where = _unsaveable(obj)
    if where is None:
        return
    fix = ("Save state.factors (tensors: eigenpairs, a Cholesky factor, K-FAC/EK-FAC factors) "
           "instead; prepare(params, factors) rebuilds a kfac/ekfac state from them, other "
           "solvers run prepare again." if isinstance(obj, (InfluenceState,
                                                            InfluenceEnsembleState))
           else "Save the tensors it was built from instead.")
    raise TypeError(_msg("save", "obj", "tensors, numbers, strings, None and NamedTuples / "
                         "dicts / lists / tuples of them", f"a {type(obj).__name__} holding "
                         f"an operator or function at {where} (closures do not pickle)", fix))


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Return the path after writing ``obj`` there atomically (temp file, fsync, ``os.replace``).

    Stale temp files of this target (left by a killed save, see the module docstring) are
    removed first. The file gets mode ``0o666 & ~umask``.

    Args:
        obj: tensors, numbers, strings, ``None`` and NamedTuples / dicts / lists / tuples of
            them (anything ``torch.load(weights_only=True)`` can read back, plus NamedTuples).
        path: target file; its directory is created if missing.

    Returns:
        The target path as a :class:`pathlib.Path`.

    Raises:
        TypeError: ``path`` is not a str or PathLike, or ``obj`` holds a function or a LinOp
            (an ``InfluenceState``'s ``ihvp``: save its ``factors``), checked before any file
            is made.
        Whatever ``torch.save`` raises; the temporary file is removed and an existing file at
        ``path`` is left as it was.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(_msg("save", "path", "a str or os.PathLike", type(path).__name__))
    _check_saveable(obj)  # before any file or directory is made
    from .attribute.train_print import settle

    settle(obj)  # a state's print of its training rows, formed now from them: the file keeps it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_clean = _remove_stale_tmps(path)
    fd, tmp = _create_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(_encode(obj), f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                # Renamed while still locked: no cleaner ever sees this temp unlocked.
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)  # Windows cannot rename a file that is still open
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave temp files behind either.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    if was_clean:
        _mark_clean(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a locked temp path next to ``path``; on a clean exit it is fsynced and renamed over
    ``path`` (atomic, as :func:`save`), on an exception removed.

    For writers that need a file name rather than a file object (``numpy.lib.format.open_memmap``,
    ``numpy.save`` on an opened file): whatever they write under the yielded name becomes
    ``path`` all at once or not at all. The temp file follows :func:`save`'s naming and locking,
    so a killed writer's leftover is removed by the next save, load or :func:`clean_temps`.

    Raises:
        TypeError: ``path`` is not a str or PathLike.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(_msg("atomic_path", "path", "a str or os.PathLike", type(path).__name__))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmps(path)
    fd, tmp = _create_tmp(path)
    try:
        yield tmp
        os.fsync(fd)  # the inode's pages, whichever descriptor the writer used
        if fcntl is not None:
            os.replace(tmp, path)  # renamed while locked, as in save
        else:
            os.close(fd)
            fd = None
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if fd is not None:
            os.close(fd)
    _fsync_dir(path.parent)


def clean_temps(directory: str | os.PathLike) -> int:
    """Remove every temp file in ``directory`` left by a killed :func:`save` or
    :func:`atomic_path` (of any target) that no live writer holds; return how many went.

    ``save``/``load`` clean only their own target's leftovers, so a target never written again
    kept its temp files; a store (:mod:`dattri_fn.store`) calls this on every resume.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(_msg("clean_temps", "directory", "a str or os.PathLike",
                             type(directory).__name__))
    directory = Path(directory)
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return 0
    removed = 0
    for name in names:
        # ".<target>.<8 random chars>.tmp": only our own temp names, never a user's file.
        stem = name[1:-len(".tmp")]
        target, _, token = stem.rpartition(".")
        if target and _TMP_RANDOM.fullmatch(token):
            removed += _remove_if_unlocked(directory / name)
    if removed:
        _CLEAN_DIRS.pop(_dir_stamp(directory)[0], None)
    return removed


def _create_tmp(path: Path) -> tuple[int, Path]:
    """Return ``(fd, name)`` of a new temp file for ``path``, locked for writing."""
    for _ in range(100):
        token = "".join(secrets.choice(_TMP_ALPHABET) for _ in range(8))
        tmp = path.parent / f".{path.name}.{token}.tmp"
        try:
            # 0o666 lets the umask decide, as for any new file; mkstemp's 0600 would hide a
            # shared cache from its other users.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o666)
        except FileExistsError:
            continue
        if fcntl is None:
            return fd, tmp
        with contextlib.suppress(OSError):  # no locks on this file system: nobody cleans
            fcntl.flock(fd, fcntl.LOCK_EX)
        # A cleaner may have removed the file between its creation and the lock.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        os.close(fd)
    raise FileExistsError(_msg("save", "path", "a free temp file name next to it",
                               f"100 taken names like {tmp.name!r}"))


def _dir_stamp(directory: Path) -> tuple[str, tuple[int, int, int]]:
    st = os.stat(directory)
    return os.path.abspath(directory), (st.st_dev, st.st_ino, st.st_mtime_ns)


def _mark_clean(directory: Path) -> None:
    with contextlib.suppress(OSError):
        key, stamp = _dir_stamp(directory)
        _CLEAN_DIRS[key] = stamp


def _remove_stale_tmps(path: Path) -> bool:
    """Remove ``path``'s temp files that no live writer holds, never any other file; return
    True when its directory held no temp file at all."""
    directory = path.parent
    try:
        key, stamp = _dir_stamp(directory)
        if _CLEAN_DIRS.get(key) == stamp:
            return True
        with os.scandir(directory) as entries:
            tmps = [e.name for e in entries if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return False
    prefix = f".{path.name}."
    for name in tmps:
        if name.startswith(prefix) and _TMP_RANDOM.fullmatch(name[len(prefix):-len(".tmp")]):
            _remove_if_unlocked(directory / name)
    if tmps:
        _CLEAN_DIRS.pop(key, None)
        return False
    _CLEAN_DIRS[key] = stamp
    return True


def _remove_if_unlocked(tmp: Path) -> bool:
    if fcntl is None:
        # Windows refuses to delete a file its writer still holds open (only in the instant
        # between its close and its rename can a cleaner win; that save then raises).
        try:
            os.unlink(tmp)
        except OSError:
            return False
        return True
    try:
        fd = os.open(tmp, os.O_RDWR | _OPEN_FLAGS)  # RDWR: NFS emulates flock by write locks
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Locked: its writer is gone. The name is checked again: a finished save renames its
        # temp away before unlocking it.
        if os.path.samestat(os.fstat(fd), os.stat(tmp)):
            os.unlink(tmp)
            return True
    except OSError:  # BlockingIOError: a live save holds it
        pass
    finally:
        os.close(fd)
    return False


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

    Stale temp files of this target are removed first, as by :func:`save`.

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
    _remove_stale_tmps(path)
    if not path.is_file():
        raise FileNotFoundError(_msg("load", "path", "an existing file", repr(str(path))))
    return _decode(torch.load(path, map_location=map_location, weights_only=weights_only))
