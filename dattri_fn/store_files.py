"""Store files written whole: grouped shards (several named parts in one shard), the manifest
of a store written by several ranks, a scores ``.npy`` and cached curvature statistics
(see :mod:`dattri_fn.store`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import (
    _msg,
)
from .io import atomic_path, clean_temps
from .store_hash import _canonical, _versions, params_hash
from .store_manifest import (
    FORMAT,
    FeatureStore,
    _check_request,
    _directory,
    _load_manifest,
    _write_manifest,
    _writer_lock,
)

GROUPED = "grouped"  # the kind of a store whose one shard holds several named parts


def write_grouped(path: str | os.PathLike, parts, *, config: Mapping | None = None,
                  func: str = "write_grouped") -> None:
    """Write ``parts`` as ONE shard of a new store at ``path`` that names each part's rows.

    ``parts``: ``[(name, rows [b_i, ...] array, data_hash, params_hash)]``, e.g. the per-example
    gradients of several training steps, each at its own params. The shard and then the
    manifest are written atomically (two fsynced renames for all parts, where a store per part
    takes four each); the manifest is the commit record, so a kill at any point leaves either
    no committed group (written again in full by the next call, whose temp files it removes)
    or a complete one. ``open_store(path / name)`` then reads part ``name`` alone (its
    manifest's ``params_hash`` is the part's, its ``config`` gains ``"part": name``).

    Raises:
        ValueError: parts of different dtypes or row shapes, or none.
    """
    path = _directory(func, path)
    if not parts:
        raise ValueError(_msg(func, "parts", "at least one part", "none"))
    arrays = [np.ascontiguousarray(a) for _, a, _, _ in parts]
    if len({(a.dtype.str, a.shape[1:]) for a in arrays}) != 1:
        raise ValueError(_msg(func, "parts", "rows of one dtype and row shape",
                              str(sorted({(a.dtype.str, a.shape[1:]) for a in arrays}))))
    path.mkdir(parents=True, exist_ok=True)
    with _writer_lock(func, path):
        clean_temps(path)
        arr = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        name = "shard-000000.npy"
        with atomic_path(path / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        table, start = {}, 0
        for (part, _, data_hash, p_hash), a in zip(parts, arrays, strict=True):
            table[str(part)] = {"start": start, "rows": int(a.shape[0]), "data_hash": data_hash,
                                "params_hash": p_hash}
            start += a.shape[0]
        digest = hashlib.sha256("".join(d for _, _, d, _ in parts).encode()).hexdigest()
        _write_manifest(path, {
            "format": FORMAT, "kind": GROUPED, "config": _canonical(config, func),
            "layout": "rows", "dtype": str(arr.dtype), "row_shape": list(arr.shape[1:]),
            "shards": [{"file": name, "rows": int(arr.shape[0]), "data_hash": digest}],
            "members": table, "complete": True, "n_rows": int(arr.shape[0]), "data_hash": digest,
            "versions": _versions()})


def grouped_parts(path: str | os.PathLike) -> dict | None:
    """Return the part table of the complete grouped store at ``path`` (None: none committed)."""
    man = _load_manifest("grouped_parts", Path(path))
    return None if man is None or man.get("kind") != GROUPED else man["members"]


def _grouped_part(path: Path, block_rows: int, out) -> FeatureStore | None:
    """The store of part ``path.name`` of the grouped store at ``path.parent``, or None."""
    man = _load_manifest("open_store", path.parent)
    if man is None or man.get("kind") != GROUPED or path.name not in man["members"]:
        return None
    part = man["members"][path.name]
    file = str(path.parent / man["shards"][0]["file"])
    view = {k: v for k, v in man.items() if k != "members"}
    view.update(kind="features", params_hash=part["params_hash"], data_hash=part["data_hash"],
                n_rows=part["rows"], config=dict(man["config"], part=path.name),
                shards=[{"file": man["shards"][0]["file"], "rows": part["rows"],
                         "data_hash": part["data_hash"]}])
    return FeatureStore(str(path), view, ((file, part["rows"], part["start"]),), block_rows,
                        None if out is None else os.fspath(out))


def write_parts_manifest(path: str | os.PathLike, parts: list[str], *, params_hash_: str,
                         config: Mapping | None) -> None:
    """Write the manifest of a store made of ``parts`` (sub-directories, in row order)."""
    man = {"format": FORMAT, "kind": "features", "parts": list(parts), "complete": True,
           "params_hash": params_hash_, "config": _canonical(config), "shards": []}
    _write_manifest(Path(path), man)


def scores_file(out: str | os.PathLike, n_rows: int, blocks: Iterator[Tensor]) -> Tensor:
    """Write score blocks (``[b, n_test]`` in row order) into ``out`` as an ``[n_rows, n_test]``
    ``.npy`` file, renamed into place only when complete; return it memory-mapped
    (copy-on-write: editing the tensor never changes the file).

    Blocks are appended through a file object, not a writable memmap: written pages then sit
    in the page cache, not in this process's resident set, so peak memory is one block.
    """
    out = Path(out)
    offset, width = 0, None
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for block in blocks:
            arr = np.ascontiguousarray(block.detach().cpu().numpy())
            if width is None:
                width = arr.shape[1]
                np.lib.format.write_array_header_1_0(f, {
                    "descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False,
                    "shape": (n_rows, width)})
            f.write(arr.tobytes())
            offset += arr.shape[0]
        if width is None or offset != n_rows:
            raise ValueError(_msg("scores_file", "blocks", f"{n_rows} rows", f"{offset}"))
    return torch.from_numpy(np.load(out, mmap_mode="c"))


STATS = "stats.pt"


def stats_store(path: str | os.PathLike, compute: Callable[[], Any], *, params,
                config: Mapping | None = None, map_location=None) -> Any:
    """Return curvature statistics cached at ``path``, computing and saving them when absent.

    ``compute()`` (e.g. ``lambda: ekfac_factors(model, loss_fn, params, train)``) runs only when
    the directory holds no complete statistics; its result (tensors, NamedTuples such as
    :class:`~dattri_fn.operators.kfac.KFACFactors`, dicts) is saved atomically
    (:func:`dattri_fn.io.save`), then a manifest marks it complete. A kill at any point leaves
    either no statistics (recomputed) or complete ones; no temp file survives the next call.

    Args:
        path: a directory for this statistic.
        compute: ``() -> state``.
        params: the params the statistics are taken at (hashed; must match on reuse).
        config: what else determines them (method, layers, damping-free settings...; JSON).
        map_location: as in :func:`dattri_fn.io.load`.

    Raises:
        ValueError: the directory holds statistics of another request (params hash, config key
            or kind), naming the field.
    """
    from . import io

    path = _directory("stats_store", path)
    if not callable(compute):
        raise TypeError(_msg("stats_store", "compute", "a callable () -> state", type(compute).__name__))
    request = {"format": FORMAT, "kind": "stats",
               "params_hash": params_hash(params, func="stats_store"),
               "config": _canonical(config, "stats_store")}
    path.mkdir(parents=True, exist_ok=True)
    clean_temps(path)
    man = _load_manifest("stats_store", path)
    if man is not None:
        _check_request("stats_store", man, request, arg_of={"params_hash": "params"})
        if man.get("complete"):
            return io.load(path / STATS, map_location=map_location)
    state = compute()
    io.save(state, path / STATS)
    _write_manifest(path, dict(request, complete=True, file=STATS, versions=_versions()))
    return state
