"""Building a feature store shard by shard (resumable after a kill) and opening a complete one
(see :mod:`dattri_fn.store`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from torch import Tensor

from ._checks import (
    _msg,
    batch_size,
    batch_to,
    check_int,
    check_optional_int,
    iter_batches,
    regroup,
)
from .io import atomic_path, clean_temps
from .store_files import _grouped_part
from .store_hash import _canonical, _versions, batch_hash, params_hash
from .store_manifest import (
    BLOCK_ROWS,
    FORMAT,
    FeatureStore,
    _check_request,
    _check_state,
    _complete,
    _directory,
    _load_manifest,
    _opened,
    _write_manifest,
    _writer_lock,
)


class StoreRecording(NamedTuple):
    """A request to build a store while scoring: pass it as ``train`` to any attributor.

    The pipeline (:func:`~dattri_fn.attribute.pipeline.stream_scores`, ``collect``) computes
    the train features of ``data`` with the attributor's own feature map, writes them to
    ``path`` shard by shard (resuming a killed run) and scores from the store.
    """

    # Kept as dattri_fn.store's class (where it is imported from): pickles, and _checks's
    # refusal of a store passed where examples are read, name that module.
    __module__ = "dattri_fn.store"

    path: str
    data: Any
    params_hash: str
    config: dict
    shard_rows: int | None
    block_rows: int


def record_store(path: str | os.PathLike, data, *, params, config: Mapping | None = None,
                 shard_rows: int | None = None, block_rows: int = BLOCK_ROWS) -> StoreRecording:
    """Return a :class:`StoreRecording` of ``data``'s train features into ``path``.

    Args:
        path: the store directory (created; an existing store there is resumed or refused).
        data: the training data, one Batch or a re-iterable of Batches, in a fixed order.
        params: the params (or list of checkpoints) the features are taken at; hashed.
        config: what else determines the features: method name, proj_dim, seed... (JSON).
        shard_rows: merge consecutive batches into shards of at least this many rows (None:
            one shard per batch); a shard is the unit of resume.
        block_rows: rows per block when scoring from the store (bounds memory).
    """
    _directory("record_store", path)
    check_optional_int("record_store", "shard_rows", shard_rows)
    check_int("record_store", "block_rows", block_rows)
    iter_batches("record_store", "data", data)
    return StoreRecording(os.fspath(path), data, params_hash(params, func="record_store"),
                          _canonical(config, "record_store"), shard_rows, block_rows)


def _stack_layout(feats) -> tuple[str, np.ndarray]:
    """Features of one shard as ``(layout, [b, ...] array)``; ``[C, b, F]`` stored as ``[b, C, F]``."""
    if not isinstance(feats, Tensor):
        if not hasattr(feats, "to_dense"):
            raise TypeError(_msg("build_store", "feature_fn", "Tensor features (or structured "
                                 "rows with to_dense())", type(feats).__name__))
        feats = feats.to_dense()
        layout = "stacked"
    else:
        layout = "stacked" if feats.ndim == 3 else "rows"
    feats = feats.detach().cpu()
    if layout == "stacked":
        feats = feats.transpose(0, 1)
    return layout, np.ascontiguousarray(feats.numpy())


def build_store(path: str | os.PathLike, feature_fn: Callable, data, *, params,
                config: Mapping | None = None, shard_rows: int | None = None, device=None,
                block_rows: int = BLOCK_ROWS, func: str = "build_store",
                _params_hash: str | None = None, _kind: str = "features",
                _state_hash: str | None = None, _with_offset: bool = False) -> FeatureStore:
    """Return the complete store of ``feature_fn`` over ``data`` at ``path``, resuming a partial one.

    ``T = cat_s feature_fn(shard_s)``  # [n, F] (or [C, n, F]) on disk, shard by shard

    Args:
        path: the store directory; created if missing.
        feature_fn: ``batch -> [b, F]`` (``[C, b, F]``, or rows with ``to_dense()``).
        data: one Batch or a re-iterable of Batches in a fixed order.
        params: the params the features are taken at (hashed into the manifest).
        config: what else determines the features (method, proj_dim, seed...; JSON values).
        shard_rows: merge consecutive batches into shards of at least this many rows (None:
            one shard per batch).
        device: where each shard's batch is moved before ``feature_fn`` (None: left as is).
        block_rows: rows per block when the returned store is streamed.

    Returns:
        The :class:`FeatureStore`.

    Raises:
        ValueError: the directory holds a store of another request (config key, params hash,
            shard_rows, dtype, row shape, versions) or of other data (a shard's rows hash
            differently, or there are fewer rows), naming the field.
    """
    path = _directory(func, path)
    if not callable(feature_fn):
        raise TypeError(_msg(func, "feature_fn", "a callable batch -> [b, F] features",
                             type(feature_fn).__name__))
    check_optional_int(func, "shard_rows", shard_rows)
    check_int(func, "block_rows", block_rows)
    from .attribute.pipeline import features

    path.mkdir(parents=True, exist_ok=True)
    with _writer_lock(func, path):
        return _build(func, features, path, feature_fn, data, params, config, shard_rows, device,
                      block_rows, _params_hash, _kind, _state_hash, _with_offset)


def _build(func, features, path, feature_fn, data, params, config, shard_rows, device,
           block_rows, _params_hash, kind, _state_hash=None, with_offset=False):
    clean_temps(path)
    request = {"format": FORMAT, "kind": kind,
               "params_hash": _params_hash or params_hash(params, func=func),
               "config": _canonical(config, func), "shard_rows": shard_rows,
               "versions": _versions()}
    if _state_hash is not None:
        request["state_hash"] = _state_hash
    man = _load_manifest(func, path)
    if man is None:
        man = dict(request, shards=[], complete=False)
        _write_manifest(path, man)
    else:
        _check_state(func, man, request, path)
        _check_request(func, man, request, arg_of={"params_hash": "params",
                                                  "shard_rows": "shard_rows", "kind": "path"})
    done = man["shards"]
    s = row = 0  # shard, and its first row (counted over committed shards too)
    for batch, last in _with_last(regroup(iter_batches(func, "data", data), shard_rows, func)):
        rows = batch_size(func, "data", batch)
        digest = batch_hash(batch)
        if s < len(done):
            if done[s]["data_hash"] != digest or done[s]["rows"] != rows:
                raise ValueError(_msg(func, "data", f"the rows of shard {s} as the store holds "
                                      f"them ({done[s]['rows']} rows, hash "
                                      f"{done[s]['data_hash'][:12]})",
                                      f"{rows} rows hashing to {digest[:12]}",
                                      "The data or its order changed; use a new path."))
            s += 1
            row += rows
            continue
        if man["complete"]:
            raise ValueError(_msg(func, "data", f"the store's {len(done)} shards "
                                  f"({sum(d['rows'] for d in done)} rows)", "more rows",
                                  "The data changed; use a new path."))
        if device is not None:
            batch = batch_to(batch, device)
        # with_offset: feature_fn(batch, first row) serves rows kept elsewhere (a method state)
        fn = (lambda b, at=row: feature_fn(b, at)) if with_offset else feature_fn
        layout, arr = _stack_layout(features(func, "data", fn, batch))
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise ValueError(_msg(func, "feature_fn", f"one row per example ({rows})",
                                  f"shape {list(arr.shape)}"))
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            # A NaN row would poison every later score read from the store.
            raise ValueError(_msg(func, "feature_fn", "finite features", f"NaN or inf in shard {s}"))
        meta = {"layout": layout, "dtype": str(arr.dtype), "row_shape": list(arr.shape[1:])}
        if "layout" in man:
            _check_request(func, man, meta, arg_of={k: "feature_fn" for k in meta})
        else:
            man.update(meta)
        name = f"shard-{s:06d}.npy"
        with atomic_path(path / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        done.append({"file": name, "rows": rows, "data_hash": digest})
        if last:  # the last shard's commit completes the store too: one manifest write fewer
            _complete(man)
        _write_manifest(path, man)
        s += 1
        row += rows
    if s == 0:
        raise ValueError(f"{func}(data=...): expected at least one batch, got an empty iterable.")
    if s < len(done):
        raise ValueError(_msg(func, "data", f"the store's {len(done)} shards "
                              f"({sum(d['rows'] for d in done)} rows)", f"{s} shards",
                              "The data changed; use a new path."))
    if not man["complete"]:
        _complete(man)
        _write_manifest(path, man)
    return _opened(path, man, block_rows, None)


def _with_last(items) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)``, reading one item ahead."""
    it = iter(items)
    end = object()
    item = next(it, end)
    while item is not end:
        following = next(it, end)
        yield item, following is end
        item = following


def open_store(path: str | os.PathLike, *, params=None, config: Mapping | None = None,
               block_rows: int = BLOCK_ROWS, out: str | os.PathLike | None = None) -> FeatureStore:
    """Return the complete store at ``path``, refusing one built for another request.

    Args:
        path: a store directory written by :func:`build_store` (or by several ranks).
        params: if given, must hash as the params the store was built at.
        config: if given, must equal the store's config key by key.
        block_rows: rows per block when streamed (bounds memory).
        out: where the pipeline writes the full ``[n_train, n_test]`` scores as a ``.npy``
            memmap (finalised atomically; returned memory-mapped), or None for memory.

    Raises:
        FileNotFoundError: no store at ``path``.
        ValueError: an incomplete store, or one whose params hash or config differs (named).
    """
    path = _directory("open_store", path)
    check_int("open_store", "block_rows", block_rows)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(_msg("open_store", "out", "None or a str or os.PathLike",
                             type(out).__name__))
    man = _load_manifest("open_store", path)
    if man is None and not path.exists():
        view = _grouped_part(path, block_rows, out)
        if view is not None:
            _check_request("open_store", view.manifest, _open_request(params, config),
                           arg_of={"params_hash": "params"})
            return view
    if man is None:
        raise FileNotFoundError(_msg("open_store", "path", "a store directory with a manifest",
                                     repr(str(path))))
    if not man.get("complete") and "parts" not in man:
        raise ValueError(_msg("open_store", "path", "a complete store",
                              f"one with {len(man['shards'])} committed shards",
                              "Resume it with build_store (or score with a record_store)."))
    _check_request("open_store", man, _open_request(params, config),
                   arg_of={"params_hash": "params"})
    return _opened(path, man, block_rows, out)


def _open_request(params, config) -> dict:
    request = {}
    if params is not None:
        request["params_hash"] = params_hash(params, func="open_store")
    if config is not None:
        request["config"] = _canonical(config, "open_store")
    return request
