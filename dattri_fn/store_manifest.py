"""A feature store's directory and manifest: reading, atomic writing, the writer lock and the
checks of a request against what the store recorded (see :mod:`dattri_fn.store`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._checks import (
    _msg,
)
from .io import atomic_path
from .store_hash import state_hash

FORMAT = "dattri_fn.store/1"


MANIFEST = "manifest.json"


SELF = "self"  # the sub-directory holding a store's self-scores


# Rows per block when a store is streamed: ``block_rows x F`` values are in memory at a time.
BLOCK_ROWS = 4096


def _directory(func: str, path) -> Path:
    """``path`` as a Path that is a directory or does not exist yet, or raise naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(_msg(func, "path", "a str or os.PathLike", type(path).__name__))
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(_msg(func, "path", "a directory (or a path to create one at)",
                              f"the existing file {str(path)!r}"))
    return path


class FeatureStore(NamedTuple):
    """A complete store opened for reading: ``n_rows`` feature rows in shards.

    Fields:
        path: the store directory.
        manifest: its manifest (the request and the shards).
        shards: ``(file, rows)`` per shard, in row order (over every part of a sharded store),
            or ``(file, rows, start)`` for the rows ``[start, start + rows)`` of a grouped shard
            (one step of a record written by :func:`write_grouped`).
        block_rows: rows per block when streamed (bounds memory: ``block_rows x F`` values).
        out: where the pipeline writes the full ``[n_train, n_test]`` scores (a ``.npy``
            memmap, finalised atomically), or None to return them in memory.
    """

    # Kept as dattri_fn.store's class (where it is imported from): pickles, and _checks's
    # refusal of a store passed where examples are read, name that module.
    __module__ = "dattri_fn.store"

    path: str
    manifest: dict
    shards: tuple[tuple[str, int] | tuple[str, int, int], ...]
    block_rows: int = BLOCK_ROWS
    out: str | None = None

    @property
    def n_rows(self) -> int:
        return sum(s[1] for s in self.shards)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    def blocks(self, device=None) -> Iterator[Tensor]:
        """Yield the features in row order, at most ``block_rows`` rows a block.

        A block is ``[b, *row_shape]``, or ``[C, b, F]`` for a store of stacked (ensemble)
        features, as the feature map gave them; each is a copy, so the memory-mapped shard
        is never written through.
        """
        stacked = self.manifest["layout"] == "stacked"
        for file, rows, *start in self.shards:
            arr = np.load(file, mmap_mode="r")
            # (file, rows, start): a part of a grouped shard (one step of a record) from `start`
            part, start = bool(start), start[0] if start else 0
            if (arr.shape[0] < start + rows) if part else (arr.shape[0] != rows):
                raise ValueError(_msg("FeatureStore", "path", f"{rows + start} rows in {file} as "
                                      "the manifest lists", f"{arr.shape[0]}",
                                      "The store was altered; rebuild it."))
            for s in range(start, start + rows, self.block_rows):
                block = torch.from_numpy(np.array(arr[s:min(s + self.block_rows, start + rows)]))
                if stacked:
                    block = block.transpose(0, 1)  # stored [b, C, F] -> [C, b, F]
                yield block if device is None else block.to(device)

    def read(self) -> Tensor:
        """Return every row at once (``[n, *row_shape]`` or ``[C, n, F]``): small stores only."""
        blocks = list(self.blocks())
        return torch.cat(blocks, dim=1 if self.manifest["layout"] == "stacked" else 0)


def _load_manifest(func: str, path: Path) -> dict | None:
    try:
        with open(path / MANIFEST) as f:
            man = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(_msg(func, "path", f"a readable store manifest at {path / MANIFEST}",
                              str(err))) from err
    if man.get("format") != FORMAT:
        raise ValueError(_msg(func, "path", f"a store of format {FORMAT!r}",
                              f"{man.get('format')!r} at {path}"))
    return man


def _write_manifest(path: Path, man: dict) -> None:
    with atomic_path(path / MANIFEST) as tmp, open(tmp, "w") as f:
        json.dump(man, f, indent=1, sort_keys=True)


def _check_request(func: str, man: dict, request: Mapping, *, arg_of: Mapping[str, str]) -> None:
    """Raise naming the first field of ``request`` that the manifest ``man`` does not match."""
    for field, want in request.items():
        have = man.get(field)
        if field == "config":
            keys = sorted(set(have or {}) | set(want))
            for k in keys:
                if (have or {}).get(k, "<absent>") != want.get(k, "<absent>"):
                    raise ValueError(_msg(func, "config", f"the store's config[{k!r}] = "
                                          f"{(have or {}).get(k, '<absent>')!r}",
                                          f"config[{k!r}] = {want.get(k, '<absent>')!r}",
                                          "Use a new path, or the request the store was built "
                                          "with."))
        elif have != want:
            raise ValueError(_msg(func, arg_of.get(field, field), f"the store's {field} = "
                                  f"{have!r}", f"{want!r}", "The store was built for another "
                                  "request; use a new path."))


@contextlib.contextmanager
def _writer_lock(func: str, path: Path):
    """Hold ``path/writer.lock`` (flock) while writing: a second live writer is refused; a
    killed one's lock goes with its process."""
    from .io import fcntl

    if fcntl is None:  # Windows: no flock; one writer per store is the caller's to keep
        yield
        return
    fd = os.open(path / "writer.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(_msg(func, "path", "a store no other live process is writing",
                                  f"{str(path)!r} locked by another writer",
                                  "Wait for it, or write elsewhere.")) from None
        except OSError:
            pass  # no locks on this file system
        yield
    finally:
        os.close(fd)


def _complete(man: dict) -> None:
    """Mark the manifest complete: its row count and the hash of its shards' data hashes."""
    done = man["shards"]
    h = hashlib.sha256("".join(d["data_hash"] for d in done).encode())
    man.update(complete=True, n_rows=sum(d["rows"] for d in done), data_hash=h.hexdigest())


def _check_state(func: str, man: dict, request: Mapping, path: Path) -> None:
    """Raise naming ``state`` when the store at ``path`` was written under another state."""
    want = request.get("state_hash")
    if want is not None and man.get("state_hash") != want:
        have = man.get("state_hash")
        raise ValueError(_msg(func, "state", f"the state the store at {str(path)!r} was "
                              f"written under (state_hash {(have or '<none>')[:12]})",
                              f"state_hash {want[:12]}", "Its rows depend on the state (another "
                              "prepare, damping or training set, or a state saved by an "
                              "older dattri_fn whose state class has since gained a field); "
                              "remove that directory to write them for this one."))


def check_store_state(func: str, store: FeatureStore, state) -> None:
    """Raise naming ``func(state=...)`` unless ``store`` was written under ``state`` (its
    manifest's ``state_hash``: rows a method served from its state, not from the data)."""
    _check_state(func, store.manifest, {"state_hash": state_hash(state, func=func)},
                 Path(store.path))


def _opened(path: Path, man: dict, block_rows: int, out) -> FeatureStore:
    if "parts" in man:
        shards, first = [], None
        for part in man["parts"]:
            sub = _load_manifest("open_store", path / part)
            if sub is None or not sub.get("complete"):
                raise ValueError(_msg("open_store", "path", f"a complete part {part!r}",
                                      "a missing or partial one", "Rerun the writing ranks."))
            shards += [(str(path / part / d["file"]), d["rows"]) for d in sub["shards"]]
            first = first or sub
        man = dict(first, **{k: v for k, v in man.items() if k != "shards"})
    else:
        shards = [(str(path / d["file"]), d["rows"]) for d in man["shards"]]
    return FeatureStore(str(path), man, tuple(shards), block_rows,
                        None if out is None else os.fspath(out))
