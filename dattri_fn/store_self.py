"""Self-scores recorded beside a feature store, in its ``self/`` sub-directory, and read back
(see :mod:`dattri_fn.store`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ._checks import (
    _msg,
)
from .store_build import StoreRecording, build_store
from .store_hash import state_hash
from .store_manifest import SELF, FeatureStore, _check_state, _load_manifest, _opened


def self_scores(func: str, store: FeatureStore, *, state=None) -> Tensor:
    """Return the self-scores recorded for ``store`` (a store of ``kind`` "self", or a feature
    store whose ``self/`` sub-directory holds them).  # -> [n_rows]

    ``state``: the method state the caller scores with; when given, the record must have been
    made with it (:func:`record_self`, same :func:`state_hash`).

    Raises:
        ValueError: naming ``func(train=...)``: none recorded, an incomplete record, or one of
            another request (params, config, data or row count) than the store's; naming
            ``func(state=...)``: one recorded with another state.
    """
    want = None if state is None else {"state_hash": state_hash(state, func=func)}
    if store.manifest.get("kind") == SELF:
        if want is not None:
            _check_state(func, store.manifest, want, Path(store.path))
        return _finite_record(func, store.read(), store.path)
    path = Path(store.path) / SELF
    man = _load_manifest(func, path)
    fix = ("Pass the record_store(...) of this store to self_score once: it writes the "
           "self-scores to <store>/self.")
    if man is None or not man.get("complete"):
        state = "none" if man is None else f"an incomplete record ({len(man['shards'])} shards)"
        raise ValueError(_msg(func, "train", "a store with its self-scores recorded (they need "
                              "the examples under the test-side map, which train features "
                              "alone do not give)", f"{state} at {str(path)!r}", fix))
    for field in ("params_hash", "config", "n_rows", "data_hash"):
        if man.get(field) != store.manifest.get(field):
            raise ValueError(_msg(func, "train", f"self-scores recorded for this store (the "
                                  f"same {field})", f"{man.get(field)!r} in {str(path)!r} "
                                  f"against {store.manifest.get(field)!r}", fix))
    if want is not None:
        _check_state(func, man, want, path)
    return _finite_record(func, _opened(path, man, store.block_rows, None).read(), path)


def _finite_record(func: str, diag: Tensor, path) -> Tensor:
    """``diag`` read back from the record at ``path``, refused by name if it holds NaN or inf
    (:func:`record_self` commits none; a record written otherwise is not served)."""
    from .attribute.pipeline import check_finite_self

    return check_finite_self(func, diag, fix=f"The self-scores recorded at {str(path)!r} hold "
                             "it (not written by record_self); record them at a new path.")


def record_self(func: str, rec: StoreRecording, diag_fn: Callable, *, device=None,
                state=None, with_offset: bool = False) -> Tensor:
    """Return ``s = cat_s diag_fn(shard_s)`` over ``rec``'s data, recorded to ``<rec.path>/self``.  # -> [n]

    The self-scores are a store of ``[n]`` rows (``kind`` "self") under ``rec``'s request
    (params hash, config, shard size, the data's hashes) plus, when ``state`` is given, its
    :func:`state_hash`: written shard by shard with :func:`build_store`'s crash safety, a
    killed record resumes from its last complete shard, and a complete one is read back
    without calling ``diag_fn``. Read them later with :func:`self_scores` on the opened store.

    Args:
        func: the public call errors name.
        rec: the :func:`record_store` request (its ``path`` is the feature store's directory).
        diag_fn: ``batch -> [b]``, the self-scores of a batch's examples.
        device: where each shard's batch is moved before ``diag_fn``.
        state: the method state the self-scores depend on (None: they do not).
        with_offset: call ``diag_fn(batch, first_row)`` (self-scores kept in the state, served
            by row; the offset counts committed shards too, so a resumed record is aligned).

    Raises:
        ValueError: a record at ``<rec.path>/self`` of another request or state, by name;
            naming ``func(train=...)`` and the example, a NaN or inf self-score (scanned shard
            by shard before the shard is written: the shards before it stay committed, the
            record incomplete, and a rerun resumes there).
    """
    from .attribute.pipeline import check_finite_self

    def checked(batch, first: int) -> Tensor:
        diag = diag_fn(batch, first) if with_offset else diag_fn(batch)
        return check_finite_self(func, diag, first) if isinstance(diag, Tensor) else diag

    store = build_store(os.path.join(rec.path, SELF), checked, rec.data, params=None,
                        config=rec.config, shard_rows=rec.shard_rows, device=device,
                        block_rows=rec.block_rows, func=func, _params_hash=rec.params_hash,
                        _kind=SELF, _with_offset=True,
                        _state_hash=None if state is None else state_hash(state, func=func))
    return store.read()
