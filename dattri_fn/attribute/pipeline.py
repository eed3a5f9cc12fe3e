"""The streaming pipeline shared by every attributor: scores as blockwise feature products.

Every method reduces to ``scores = T P^T``: a train feature row ``t_i`` per training example and
a (preconditioned) test feature row ``p_j`` per test example, ``scores[i, j] = <t_i, p_j>``
(``[n_train, n_test]``; positive = up-weighting train ``i`` lowers test ``j``'s loss). Test
features are computed once; train features are produced one data batch (shard) at a time and
dropped after their block of scores is formed, so memory is bounded by the batch size, not by
``n_train x P``. ``top_k`` keeps a running top-k per test point instead of the full matrix.

``train`` may also be a :class:`~dattri_fn.store.FeatureStore` (the train features, already on
disk: no training data is read) or a :class:`~dattri_fn.store.StoreRecording` (the features are
written to a store as they are computed, resuming a killed run), wherever a method passes its
``train`` to :func:`collect` or :func:`stream_scores`. :func:`stream_self` given a recording
writes the diagonal itself to the store's ``self/`` part (train features alone cannot give it:
it needs each example under the test-side map) and, given the opened store, reads it back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from .._checks import (
    _msg,
    all_finite,
    batch_leaves,
    batch_size,
    batch_to,
    blame_data,
    check_int,
    check_optional_int,
    check_tensor,
    count_rows,
    iter_batches,
)
from .._types import Batch

FeatureFn = Callable[[Batch], Tensor]
# Features are Tensors ``[b, F]`` / ``[C, b, F]``, or structured rows (e.g.
# :class:`~dattri_fn.transforms.layer_grads.LayerGrads`) with ``scores(other) -> [b, n]``,
# ``row_dots(other) -> [b]`` and a static ``cat(blocks)``.


class TopK(NamedTuple):
    """Strongest proponents (``largest=True``) or opponents per test point.  # [k, n_test] each"""

    values: Tensor
    indices: Tensor


def features(func: str, arg: str, feature_fn: FeatureFn, batch) -> Tensor:
    """``feature_fn(batch)``, with torch's error on the examples (a dtype or shape the model
    does not take, a label out of range) reported against ``func(arg=...)``."""
    with blame_data(func, arg, batch):
        return feature_fn(batch)


def collect(feature_fn: FeatureFn, data, *, device=None, func: str = "collect",
            arg: str = "data", fresh: bool = False) -> Tensor:
    """Return ``cat_b feature_fn(batch_b)`` over every batch of ``data``.  # -> [n, F]

    Args:
        feature_fn: ``batch -> [b, F]`` (or ``[C, b, F]``).
        data: one Batch or a re-iterable of Batches (a shard list, a DataLoader), a
            :class:`~dattri_fn.store.FeatureStore` (its rows returned) or a
            :class:`~dattri_fn.store.StoreRecording` (built first, resuming).
        device: where each batch is moved first; None leaves batches where they are.
        func, arg: the public call and argument that errors name (``func(arg=...)``).
        fresh: ``feature_fn`` returns tensors of its own (no view of its batch, a cache or
            anything else a caller holds): the rows of data of one batch are returned as it
            gave them, not copied by a concatenation of one block.
    """
    _check_callable(func, "feature_fn", feature_fn)
    data = from_store(func, feature_fn, data, device)
    if _is_store(data):
        return data.read() if device is None else data.read().to(device)
    blocks, seen = [], 0
    for batch in iter_batches(func, arg, data):
        b = batch_size(func, arg, batch, first=seen)
        seen += b
        if device is not None:
            batch = batch_to(batch, device)
        blocks.append(_checked_rows(func, "feature_fn", features(func, arg, feature_fn, batch), b))
    if not blocks:
        raise ValueError(f"{func}({arg}=...): expected at least one batch, got an empty iterable.")
    return blocks[0] if fresh and len(blocks) == 1 and isinstance(blocks[0], Tensor) else (
        cat_rows(blocks))


def _check_callable(func: str, arg: str, fn) -> None:
    if not callable(fn):
        raise TypeError(_msg(func, arg, "a feature map batch -> [b, F] rows", type(fn).__name__))


def _checked_rows(func: str, arg: str, feats, b: int):
    """``feats`` once checked: ``[b, F]`` or ``[C, b, F]`` finite rows (structured rows with
    ``scores``/``row_dots``/``cat`` pass as they are), else an error naming ``func(arg=...)``."""
    if isinstance(feats, Tensor):
        if feats.ndim not in (2, 3) or feats.shape[-2] != b:
            raise ValueError(_msg(func, arg, f"a feature map giving [b, F] (or [C, b, F]) rows "
                                  f"for a batch of b = {b}", f"shape {list(feats.shape)}"))
        if feats.is_floating_point() and not all_finite(feats):
            raise ValueError(_msg(func, arg, "finite features", "NaN or inf"))
        return feats
    if not all(hasattr(feats, a) for a in ("scores", "row_dots")):
        raise TypeError(_msg(func, arg, "a feature map returning a Tensor (or structured rows "
                             "with scores/row_dots)", type(feats).__name__))
    return feats


def cat_rows(blocks: list) -> Tensor:
    """Concatenate feature blocks along the example (row) dimension."""
    if isinstance(blocks[0], Tensor):
        return torch.cat(blocks, dim=-2)
    return type(blocks[0]).cat(blocks)


def merge_topk(best: TopK | None, block: Tensor, offset: int, k: int, largest: bool) -> TopK:
    """Merge a score block (rows ``offset...``) into a running per-column top-k.  # [k, n_test]

    ``block`` is ``[b, n_test]``; ``k >= 1`` (fewer rows are kept while fewer have been seen).
    A NaN score ranks last, after every number (``torch.topk`` alone would rank it first), and
    comes back as NaN.
    """
    check_tensor("merge_topk", "block", block, ndim=2, finite=False)
    check_int("merge_topk", "k", k)
    check_int("merge_topk", "offset", offset, minimum=0)
    if best is not None and best.values.shape[1:] != block.shape[1:]:
        raise ValueError(f"merge_topk(block=...): expected {best.values.shape[1]} columns, as "
                         f"in best, got shape {list(block.shape)}.")
    idx = torch.arange(offset, offset + block.shape[0], device=block.device)
    idx = idx[:, None].expand_as(block)
    if best is not None:
        block = torch.cat([best.values, block])
        idx = torch.cat([best.indices, idx])
    kk = min(k, block.shape[0])
    key = block
    if block.is_floating_point():
        key = block.nan_to_num(nan=-math.inf if largest else math.inf, posinf=math.inf,
                               neginf=-math.inf)
    pos = torch.topk(key, kk, dim=0, largest=largest).indices
    return TopK(torch.gather(block, 0, pos), torch.gather(idx, 0, pos))


def block_scores(train_rows: Tensor, test_rows: Tensor) -> Tensor:
    """Return ``T P^T`` for ``[b, F]`` rows, or ``sum_c T_c P_c^T`` for ``[C, b, F]`` stacks.  # [b, n]

    The stacked form lets ensembles keep their per-checkpoint features apart (no ``[b, C*F]``
    copy); it equals the product of the side-by-side concatenations. Structured rows give
    their own ``scores``.
    """
    if not isinstance(train_rows, Tensor):
        return train_rows.scores(test_rows)
    if train_rows.ndim == 2:
        return train_rows @ test_rows.T
    # bmm + sum: einsum("cbf,cnf->bn") copies a permuted operand (3.1 vs 2.1 ms, C=3, b=256).
    return torch.bmm(train_rows, test_rows.transpose(1, 2)).sum(0)


def row_dots(train_rows, test_rows) -> Tensor:
    """Return ``<t_i, p_i>`` row by row, summed over checkpoints.  # -> [b]"""
    if not isinstance(train_rows, Tensor):
        return train_rows.row_dots(test_rows)
    diag = (train_rows * test_rows).sum(-1)
    return diag if diag.ndim == 1 else diag.sum(0)


def from_store(func: str, feature_fn: FeatureFn, train, device=None):
    """``train`` as given, or a :class:`~dattri_fn.store.FeatureStore` when it is one or a
    :class:`~dattri_fn.store.StoreRecording` (built now with ``feature_fn``, resuming)."""
    from .._checks import _Regrouped
    from ..store import FeatureStore, StoreRecording, build_store

    if isinstance(train, _Regrouped) and isinstance(train.data, (FeatureStore, StoreRecording)):
        train = train.data  # merging batches (a method's batch_rows) means nothing to a store
    if isinstance(train, StoreRecording):
        return build_store(train.path, feature_fn, train.data, params=None, config=train.config,
                           shard_rows=train.shard_rows, device=device,
                           block_rows=train.block_rows, func=func, _params_hash=train.params_hash)
    return train


def _is_store(train) -> bool:
    from ..store import FeatureStore

    return isinstance(train, FeatureStore)


def _unwrapped(train):
    """A store or recording inside a method's regrouped view, else ``train`` as given."""
    from .._checks import _Regrouped
    from ..store import FeatureStore, StoreRecording

    if isinstance(train, _Regrouped) and isinstance(train.data, (FeatureStore, StoreRecording)):
        return train.data
    return train


def _train_blocks(func: str, train_features: FeatureFn, train, device, once: bool = False):
    """Yield ``(features, rows)`` per train batch, or per block of a store (``once``: one
    pass, so a one-shot iterator of batches is read as it comes)."""
    if _is_store(train):
        for block in train.blocks(device):
            yield block, block.shape[-2] if train.manifest["layout"] == "stacked" else block.shape[0]
        return
    seen = 0  # a NaN example is named by its index in the data, not its row in a batch
    for batch in iter_batches(func, "train", train, once=once):
        b = batch_size(func, "train", batch, first=seen)
        seen += b
        if device is not None:
            batch = batch_to(batch, device)
        yield features(func, "train", train_features, batch), b


def _dense_test(func: str, train, test_features):
    """Test features a store's dense rows can multiply: structured rows made dense, widths
    checked (a store of another method or projection is caught here, not by a matmul)."""
    if not isinstance(test_features, Tensor):
        if not hasattr(test_features, "to_dense"):
            raise TypeError(_msg(func, "train", "a store only for methods with Tensor test "
                                 "features (or rows with to_dense())", type(test_features).__name__))
        test_features = test_features.to_dense()
    row_shape = train.manifest.get("row_shape") or [None]
    stacked = train.manifest.get("layout") == "stacked"
    if test_features.ndim != (3 if stacked else 2) or (
            stacked and test_features.shape[0] != row_shape[0]):
        # [C, b, F] against [b, F] (or another C) would reach a bmm, or broadcast silently.
        layout = f"[C={row_shape[0]}, b, F]" if stacked else "[b, F]"
        test = (f"[C={test_features.shape[0]}, n_test, F]" if test_features.ndim == 3
                else "[n_test, F]")
        raise ValueError(_msg(func, "train", f"a store laid out like the test features {test}",
                              f"a store of {layout} rows", "It was built by another method or "
                              "ensemble size."))
    want = row_shape[-1]
    if want is not None and test_features.shape[-1] != want:
        raise ValueError(_msg(func, "train", f"a store of features as wide as the test features "
                              f"({test_features.shape[-1]})", f"a store of width {want}",
                              "It was built by another method or projection."))
    if train.dtype != test_features.dtype:
        raise TypeError(_msg(func, "train", f"a store of {test_features.dtype} features, as the "
                             f"test features", f"{train.dtype}"))
    return test_features


def check_finite_scores(func: str, block: Tensor) -> None:
    """Raise unless a ``[b, n_test]`` score block is finite (structured feature rows, e.g.
    captured layer factors, are not scanned themselves; their ``b x n_test`` scores are)."""
    if block.is_floating_point() and not all_finite(block):
        raise ValueError(_msg(func, "train", "examples whose per-example features (gradients) "
                              "are finite", "NaN or inf in the scores of a train batch",
                              "A train or test example's gradient is not finite, or finite "
                              "ones overflow in their dot product (compute in float64)."))


def check_finite_self(func: str, diag: Tensor, first: int = 0,
                      fix: str = "A train example's gradient is not finite.") -> Tensor:
    """Return the self-scores ``diag`` unless one is NaN or inf: then the error ``score`` gives
    on the same examples, naming ``func(train=...)`` and the first bad example (``first`` is
    ``diag[0]``'s example index). One scan of ``[b]`` values: structured rows are not scanned
    themselves, and finite features can still give an overflowing dot.  # -> [b]"""
    bad = (not all_finite(diag) if diag.is_floating_point()
           else diag.is_complex() and not bool(torch.isfinite(diag).all()))
    if bad:
        i = first + int((~torch.isfinite(diag)).nonzero()[0, 0])
        raise ValueError(_msg(func, "train", "examples whose per-example features (gradients) "
                              "are finite", f"NaN or inf in the self-score of example {i}", fix))
    return diag


def stream_scores(train_features: FeatureFn, train, test_features: Tensor, *,
                  top_k: int | None = None, largest: bool = True,
                  func: str = "stream_scores") -> Tensor | TopK:
    """Return ``T P^T`` with ``T`` streamed batch by batch.  # -> [n_train, n_test] or TopK

    Each training batch is moved to ``test_features``' device (of its first tensor: a Tensor, a
    ``LayerGrads``...) before its features are taken.

    ``train`` may be a :class:`~dattri_fn.store.FeatureStore`: its rows are ``T``, read in blocks
    of its ``block_rows`` (no training data is read; peak memory ``block_rows x (F + n_test)``),
    and with its ``out`` set the full matrix is written there as a ``.npy`` memmap, finalised
    atomically, and returned memory-mapped. A :class:`~dattri_fn.store.StoreRecording` builds
    that store first (resuming a killed build) with ``train_features``.

    Args:
        train_features: ``batch -> [b, F]``, or ``[C, b, F]`` for an ensemble (summed over C).
        train: one Batch, a re-iterable of Batches (a shard list, a DataLoader), a FeatureStore
            or a StoreRecording; with ``top_k``, also a one-shot iterator: ``iter(loader)`` is
            checked for the dataset's order like the loader, a generator's order is taken as given.
        test_features: ``[n_test, F]`` (or ``[C, n_test, F]``), already preconditioned.
        top_k: keep only the ``top_k`` largest (or smallest, ``largest=False``) per test column.
        func: the public caller's name, for error messages (``func(train=...)``).
    """
    check_optional_int(func, "top_k", top_k)
    _check_callable(func, "train_features", train_features)
    if isinstance(test_features, Tensor):
        if test_features.ndim not in (2, 3):
            raise ValueError(_msg(func, "test_features", "[n_test, F] (or [C, n_test, F]) rows",
                                  f"shape {list(test_features.shape)}"))
        if test_features.is_floating_point() and not all_finite(test_features):
            raise ValueError(_msg(func, "test_features", "finite features", "NaN or inf"))
    elif not hasattr(test_features, "scores") and not hasattr(test_features, "to_dense"):
        raise TypeError(_msg(func, "test_features", "a Tensor of test feature rows",
                             type(test_features).__name__))
    device = next((t.device for t in tree_leaves(test_features) if isinstance(t, Tensor)), None)
    train = from_store(func, train_features, train, device)
    store = _is_store(train)
    if store and train.manifest.get("kind") == "self":
        raise ValueError(_msg(func, "train", "a store of train features", "the store of "
                              f"self-scores at {train.path!r}", "Open the store above it."))
    if store:
        test_features = _dense_test(func, train, test_features)
    # A countable train set's [n_train, n_test] is written in place: concatenating the blocks
    # at the end would hold the result twice.
    if top_k is not None:
        total = None
    elif store:
        total = train.n_rows
    else:
        total = count_rows(func, "train", train, check=False)

    def score_blocks():
        # a top-k scan reads train once (no row count first): a one-shot iterator streams
        for feats, b in _train_blocks(func, train_features, train, device, once=top_k is not None):
            if isinstance(feats, Tensor) and isinstance(test_features, Tensor) and (
                    feats.ndim != test_features.ndim or feats.shape[-1] != test_features.shape[-1]
                    or (feats.ndim == 3 and feats.shape[0] != test_features.shape[0])
                    or feats.dtype != test_features.dtype):
                raise ValueError(_msg(func, "test_features", "rows like the train features "
                                      f"{list(feats.shape[:-2])} x [n, {feats.shape[-1]}] in "
                                      f"{feats.dtype}", f"shape {list(test_features.shape)} in "
                                      f"{test_features.dtype}"))
            block = block_scores(feats, test_features)
            if block.shape[0] != b:
                raise ValueError(f"{func}(train=...): expected the train feature map to give one "
                                 f"row per example ({b}), got {block.shape[0]}.")
            # every block, dense rows too: finite rows can still overflow in the dot (RU6 M1)
            check_finite_scores(func, block)
            yield block

    if store and top_k is None and train.out is not None:
        from ..store import scores_file

        return scores_file(train.out, total, score_blocks())
    blocks, out, best, offset = [], None, None, 0
    for block in score_blocks():
        if top_k is not None:
            best = merge_topk(best, block, offset, top_k, largest)
        elif total is not None:
            if out is None:
                out = block.new_empty((total, block.shape[1]))
            out[offset:offset + block.shape[0]] = block
        else:
            blocks.append(block)
        offset += block.shape[0]
    if offset == 0:
        raise ValueError(f"{func}(train=...): expected at least one batch, got an empty iterable.")
    if top_k is not None:
        return best
    return out if out is not None else torch.cat(blocks)


def stream_self(train_features: FeatureFn, test_features: FeatureFn, train, *, device=None,
                func: str = "stream_self", state=None) -> Tensor:
    """Return the diagonal ``s_i = <t(z_i), p(z_i)>`` without the full matrix.  # -> [n_train]

    ``device``: where each batch is moved first (None: left where it is); ``func`` names the
    public call in errors; ``state``: the method state the features depend on (an inverse, a
    kernel), bound to a store record by its hash so a record made under another state is refused.

    ``train`` may be a :class:`~dattri_fn.store.StoreRecording`: the diagonal is computed from
    its data and written to ``<path>/self`` (a store of ``[n]`` rows under the recording's
    request, resuming a killed run; the feature store itself is written by ``score``), or a
    :class:`~dattri_fn.store.FeatureStore` whose ``self/`` holds that record: it is read back
    and no training data is read (:func:`~dattri_fn.store.self_scores`).

    Raises:
        ValueError: naming ``func(train=...)`` and the first example whose self-score is NaN or
            inf (a recording commits no shard holding one; a store's record is scanned as read).
    """
    from ..store import FeatureStore, StoreRecording, record_self, self_scores

    train = _unwrapped(train)
    if isinstance(train, FeatureStore):
        diag = self_scores(func, train, state=state)
        return diag if device is None else diag.to(device)
    if isinstance(train, StoreRecording):
        diag_fn = lambda batch: row_dots(train_features(batch), test_features(batch))
        diag = record_self(func, train, diag_fn, device=device, state=state)
        return diag if device is None else diag.to(device)
    _check_callable(func, "train_features", train_features)
    _check_callable(func, "test_features", test_features)
    out, seen = [], 0
    for batch in iter_batches(func, "train", train):
        b = batch_size(func, "train", batch, first=seen)
        seen += b
        if device is not None:
            batch = batch_to(batch, device)
        t = _checked_rows(func, "train_features", features(func, "train", train_features, batch), b)
        p = _checked_rows(func, "test_features", features(func, "train", test_features, batch), b)
        if isinstance(t, Tensor) and isinstance(p, Tensor) and t.shape != p.shape:
            raise ValueError(_msg(func, "test_features", f"rows shaped like the train features "
                                  f"{list(t.shape)}", f"{list(p.shape)}"))
        out.append(row_dots(t, p))
    if not out:
        raise ValueError(f"{func}(train=...): expected at least one batch, got an empty iterable.")
    return check_finite_self(func, torch.cat(out))


def in_chunks(fn: FeatureFn, chunk_size: int | None) -> FeatureFn:
    """Apply a batch feature map ``chunk_size`` rows at a time (bounds peak memory)."""
    if chunk_size is None:
        return fn
    check_int("in_chunks", "chunk_size", chunk_size)

    def chunked(batch: Batch) -> Tensor:
        from .._checks import batch_slice

        n = batch_leaves(batch)[0].shape[0]
        return cat_rows([fn(batch_slice(batch, s, s + chunk_size))
                         for s in range(0, n, chunk_size)])

    return chunked


def feature_method(name: str, features: Callable, check: Callable):
    """A stateless :class:`~dattri_fn.attribute.method.Method` scoring ``s_ij = <t(z_i),
    p(z_j)>`` through the shared pipeline: ``features(params) -> (train_f, test_f, device)``
    gives the train-side map ``t`` and test-side map ``p`` (``batch -> [b, F]`` or ``[C, b, F]``,
    summed over ``C``); ``check(params)`` validates ``params`` in ``prepare``."""
    from .method import Method

    def prepare(params, train=None):
        check(params)
        return ()

    def score(params, state, train, test, *, top_k: int | None = None, largest: bool = True):
        train_f, test_f, device = features(params)
        test_feats = collect(test_f, test, device=device, func=name, arg="test")
        return stream_scores(train_f, train, test_feats, top_k=top_k, largest=largest, func=name)

    def self_score(params, state, train):
        train_f, test_f, device = features(params)
        return stream_self(train_f, test_f, train, device=device, func=name)

    return Method(prepare, score, self_score, name)
