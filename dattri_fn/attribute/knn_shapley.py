"""KNN-Shapley: exact Shapley values of training points for a K-nearest-neighbour classifier.

For one test point ``(x_t, y_t)`` and the training points sorted by distance to it, nearest
first (``alpha_1, ..., alpha_N``, ties broken by index), the utility of a subset ``S`` is the
K-NN vote share of the true label, ``U(S) = (1/K) sum_{k <= min(K, |S|)} 1[y_{alpha_k(S)} =
y_t]``. Its Shapley values have a closed recursion (Jia et al. 2019, Theorem 1):

    s_{alpha_N} = 1[y_{alpha_N} = y_t] min(K, N) / (K N)      (= 1[...] / N for K <= N)
    s_{alpha_i} = s_{alpha_{i+1}} + (1[y_{alpha_i} = y_t] - 1[y_{alpha_{i+1}} = y_t]) min(K, i) / (K i)

so all N values cost one sort, ``O(N log N)``, instead of ``2^N`` utilities. Here it runs for
a block of test points at a time: a reverse cumulative sum along the sorted axis, written back
in train order into one output buffer, so no ``[n_test, n_train]`` temporary (distances, sort
indices, ranks) is ever formed whole. Positive = the point's
label agrees with the test label where it counts (a proponent), in the library's convention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    all_finite,
    batch_size,
    batch_to,
    check_int,
    check_tensor,
    iter_batches,
)
from .._types import Params
from . import train_print
from .boundary import check_cached_train
from .method import Method
from .outputs import example_label
from .unit_rows import unit_rows

METRICS = ("euclidean", "cosine")


def knn_shapley_values(distances: Tensor, train_labels: Tensor, test_labels: Tensor, *,
                       k: int) -> Tensor:
    """Return the exact KNN-Shapley values ``s[i, j]`` of train ``i`` for test ``j``.

    # distances [n_test, n_train], train_labels [n_train], test_labels [n_test] -> [n_train, n_test]

    Args:
        distances: ``d(x_j, x_i)`` for every test ``j`` and train ``i`` (any dissimilarity:
            only its order per test point matters; equal distances rank by train index).
        train_labels, test_labels: class labels (any dtype compared with ``==``).
        k: the number of neighbours ``K >= 1`` (``K >= n_train`` is allowed).

    Returns:
        ``[n_train, n_test]`` values; each column sums to ``U(all) = (1/K) #{k <= min(K, N):
        y_{alpha_k} = y_t}`` (efficiency).

    Raises:
        TypeError/ValueError: naming the argument, for non-tensors, wrong shapes, NaN
            distances or ``k < 1``.

    References:
        Jia, Dao, Wang, Hubis, Gurel, Li, Zhang, Spanos & Song, "Efficient Task-Specific Data
        Valuation for Nearest Neighbor Algorithms", VLDB 2019, arXiv 1908.08619.
    """
    func = "knn_shapley_values"
    check_tensor(func, "distances", distances, ndim=2, floating=True)
    m, n = distances.shape
    check_tensor(func, "train_labels", train_labels, ndim=1, dim_size={0: n})
    check_tensor(func, "test_labels", test_labels, ndim=1, dim_size={0: m})
    k = check_int(func, "k", k)
    return _values(distances, train_labels, test_labels, k)


_BLOCK_ENTRIES = 2**18  # at most this many [test, train] entries per block (~7 MiB of temporaries)


def _test_rows(m: int, n: int, chunk_size: int | None) -> int:
    """Test points per block: ``chunk_size`` when given, else a sixteenth of them, at most
    :data:`_BLOCK_ENTRIES` / n: the sort's ``[rows, n]`` values, indices and ranks then stay a
    small fraction of the ``[n, m]`` output while the blocks stay few (16, or ``m n /
    2**18``)."""
    if chunk_size is not None:
        return chunk_size
    return max(1, min(-(-m // 16), _BLOCK_ENTRIES // max(n, 1)))


def _values(distances: Tensor, train_labels: Tensor, test_labels: Tensor, k: int, *,
            rows: int | None = None) -> Tensor:
    """Shapley values in blocks of ``rows`` test points (:func:`_test_rows`).

    # distances [m, n] -> [n, m] (the transpose of one [m, n] buffer)
    """
    m, n = distances.shape
    out = distances.new_empty(m, n)
    weight = _weight(n, k, distances)
    step = _test_rows(m, n, rows)
    for a in range(0, m, step):
        _block(distances[a:a + step], train_labels, test_labels[a:a + step], k, weight,
               out[a:a + step])
    return out.T


def _weight(n: int, k: int, like: Tensor) -> Tensor:
    """``min(K, i) / (K i)`` for the 1-based ranks ``i = 1..n-1``.  # -> [n - 1]"""
    ranks = torch.arange(1, n, dtype=like.dtype, device=like.device)
    return ranks.clamp(max=k) / (k * ranks)


def _block(distances: Tensor, train_labels: Tensor, test_labels: Tensor, k: int,
           weight: Tensor, out: Tensor) -> None:
    """Write one block's values in train order into ``out``.  # [b, n] -> out [b, n]"""
    n = distances.shape[1]
    order = torch.argsort(distances, dim=1, stable=True)  # [b, n], nearest first
    match = (train_labels[order] == test_labels[:, None]).to(distances.dtype)  # [b, n]
    step = (match[:, :-1] - match[:, 1:]).mul_(weight)  # [b, n - 1]
    # s_i = s_N + sum_{j >= i} step_j: a reverse cumulative sum along the sorted axis.
    tail = step.flip(1).cumsum_(1).flip(1)
    del step
    # The farthest point changes the vote only when fewer than K others are in S:
    # s_N = 1[match_N] min(K, N) / (K N), Jia et al.'s 1[match_N] / N when K <= N.
    last = match[:, -1:] * (min(k, n) / (k * n))
    del match
    sorted_values = torch.empty_like(distances)
    sorted_values[:, :-1] = tail
    sorted_values[:, -1:] = 0
    del tail
    out.scatter_(1, order, sorted_values.add_(last))  # back to train order


class KNNShapleyState(NamedTuple):
    """``features``: the training points' embeddings ``[n_train, F]``; ``labels``: their
    labels ``[n_train]``; ``train_print``: the print of the training rows in order
    (:func:`~dattri_fn.attribute.train_print.take`, ``[n_train]`` int64; None in a state saved
    before stop 28: ``score`` then counts the rows only)."""

    features: Tensor
    labels: Tensor
    train_print: Tensor | None = None


def _distances(metric: str, train: Tensor) -> Callable[[Tensor], Tensor]:
    """Return ``test -> [n_test, n_train]`` distances to ``train``; computed without the
    ``|a|^2 + |b|^2 - 2ab`` shortcut, whose rounding can reorder near-ties. The cosine side
    normalises ``train`` once, not once per block of test points (:func:`.unit_rows.unit_rows`:
    exact for rows whose squared norm overflows or underflows)."""
    if metric == "cosine":
        b = unit_rows(train)
        return lambda test: 1 - unit_rows(test) @ b.T
    return lambda test: torch.cdist(test, train, compute_mode="donot_use_mm_for_euclid_dist")


def _check_embeddings(func: str, arg: str, h: Tensor, *, cast: bool = False) -> Tensor:
    """Return the embeddings ``h`` unless a row has a NaN or inf: then name ``func(arg=...)``
    and the first such example (one reduction when all are finite).  # [n, F] -> [n, F]"""
    if not all_finite(h):
        i = int((~torch.isfinite(h)).any(1).nonzero()[0, 0])
        where = f" (after the cast to the state's {h.dtype})" if cast else ""
        raise ValueError(_msg(func, arg, "examples whose embeddings (feature_fn's output, or the "
                              "flattened inputs) are finite", f"NaN or inf in the embedding of "
                              f"example {i}{where}", "Fix or drop that example."))
    return h


def _check_distances(func: str, arg: str, d: Tensor, first: int, features: Tensor) -> Tensor:
    """Return a ``[b, n_train]`` block of distances (test rows ``first:first + b``) unless one
    is NaN or inf: a squared distance that overflows the dtype (embeddings ~1e20 in float32)
    would sort as a tie with every other overflow, and the values would mean nothing. One
    reduction per block; the error names the first pair and, for a NaN from a state not made
    by prepare, ``state``."""
    if all_finite(d):
        return d
    j, i = (int(v) for v in (~torch.isfinite(d)).nonzero()[0])
    other = "training example" if arg == "test" else "example"
    if not bool(torch.isfinite(features[i]).all()):
        raise ValueError(_msg(func, "state", "the KNNShapleyState returned by prepare (finite "
                              "features)", f"NaN or inf in the features of training example {i}",
                              "Use the state prepare returned."))
    fix = ("Scale the embeddings down (e.g. standardise the features)"
           + (" or compute in float64." if d.dtype != torch.float64 else "."))
    raise ValueError(_msg(func, arg, f"examples whose embeddings are a finite {d.dtype} distance "
                          "from the training examples'", f"a distance of {float(d[j, i])} "
                          f"between example {first + j} and {other} {i} (the squared distance "
                          f"overflows {d.dtype})", fix))


def knn_shapley(feature_fn: Callable[[Params, Any], Tensor] | None = None, *, k: int,
                metric: str = "euclidean", label_fn: Callable[[Any], Tensor] = example_label,
                chunk_size: int | None = None) -> Method:
    """Return KNN-Shapley as a Method: ``scores[i, j]`` = the exact Shapley value of train ``i``
    for the K-NN classifier's vote share on test ``j``.  # -> [n_train, n_test]

    ``prepare(params, train)`` embeds the training set once; ``score(params, state, train,
    test)`` embeds the test set and applies :func:`knn_shapley_values` to blocks of test
    points (``chunk_size`` per block); ``self_score`` is the diagonal
    of ``score(train, train)`` (each training point valued for itself as the test point, where
    it is its own nearest neighbour at distance 0). A data value per training point is
    ``scores.mean(1)``. ``score`` takes the rows ``prepare`` saw, in its order (or None).

    Note:
        Distance ties are broken by training index: the values are the exact Shapley values of
        that index-ordered game, so equal points at one distance to a test point are valued
        alike only when no point of another label falls between them in index order, and
        where a test point has ties, permuting the training set can change its values (the
        tied points', and nearer ones' whose coalitions' K-th neighbour is a tied point).
        Embeddings with a continuous part almost never tie.

    Args:
        feature_fn: ``(params, example) -> [F]``, the embedding of ONE example (e.g. a model's
            penultimate features); None: the raw inputs, flattened (the first element of a
            tuple example, or the example itself); ``params`` is then ignored (pass ``{}``).
        k: neighbours ``K >= 1``.
        metric: ``"euclidean"`` or ``"cosine"`` (``1 - cos``) distance between embeddings.
        label_fn: ``example -> y``; default the last element of a tuple example or
            ``example["labels"]``.
        chunk_size: test points per block of ``[chunk, n_train]`` distances, sort indices
            and ranks; None: a sixteenth of the test points, at most ``2**18 / n_train`` (the
            blocks' temporaries stay a small part of the ``[n_train, n_test]`` output). The
            values do not depend on it.

    References:
        Jia et al., VLDB 2019, arXiv 1908.08619 (exact recursion for unweighted K-NN).

    Example:
        >>> m = knn_shapley(k=5)
        >>> values = m.score({}, m.prepare({}, (x, y)), None, (xt, yt)).mean(1)  # [n_train]
    """
    name = "knn_shapley"
    k = check_int(name, "k", k)
    if metric not in METRICS:
        raise ValueError(_msg(name, "metric", f"one of {METRICS}", repr(metric)))
    if feature_fn is not None and not callable(feature_fn):
        raise TypeError(_msg(name, "feature_fn", "None or a callable (params, example) -> [F]",
                             type(feature_fn).__name__))
    if chunk_size is not None:
        check_int(name, "chunk_size", chunk_size)

    def raw(params, example) -> Tensor:
        x = example[0] if isinstance(example, (tuple, list)) else example
        return x.reshape(-1)

    embed = raw if feature_fn is None else feature_fn

    def rows(func: str, arg: str, params, data, *, copy: bool) -> tuple[Tensor, Tensor]:
        """``(embeddings [n, F], labels [n])``; a single batch's rows are not copied unless
        ``copy`` (a state must not alias the caller's tensors)."""
        feats, labels, seen = [], [], 0
        for batch in iter_batches(func, arg, data):
            seen += batch_size(func, arg, batch, first=seen)  # a NaN named by its data index
            if params:
                batch = batch_to(batch, next(iter(params.values())).device)
            pair = vmap(lambda ex: (embed(params, ex), label_fn(ex)))(batch)
            feats.append(pair[0])
            labels.append(pair[1])
        if not feats:
            raise ValueError(_msg(func, arg, "at least one batch", "an empty iterable"))
        h = feats[0] if len(feats) == 1 and not copy else torch.cat(feats)
        if h.ndim != 2:
            raise ValueError(_msg(func, "feature_fn", "a function returning [F] per example",
                                  f"features of shape {list(h.shape[1:])}"))
        if not h.is_floating_point():
            h = h.to(torch.get_default_dtype())
        return h, labels[0] if len(labels) == 1 and not copy else torch.cat(labels)

    def prepare(params, train) -> KNNShapleyState:
        func = f"{name}.prepare"
        printed = train_print.take(func, train)
        h, y = rows(func, "train", params, train, copy=True)
        return KNNShapleyState(_check_embeddings(func, "train", h), y, printed)

    def check_state(func: str, state) -> KNNShapleyState:
        if not isinstance(state, KNNShapleyState):
            raise TypeError(_msg(func, "state", "the KNNShapleyState returned by prepare",
                                 type(state).__name__))
        return state

    def values(state: KNNShapleyState, h: Tensor, y: Tensor, func: str, arg: str) -> Tensor:
        H, Y = state.features, state.labels
        if h.shape[1] != H.shape[1]:
            raise ValueError(_msg(func, arg, f"embeddings of size F={H.shape[1]} like the "
                                  "state's", f"size {h.shape[1]}"))
        h = _check_embeddings(func, arg, h.to(H.dtype), cast=h.dtype != H.dtype)
        m, n = h.shape[0], H.shape[0]
        distance = _distances(metric, H)
        # Block by block into one [m, n] buffer: the [block, n] distances, sort and ranks are
        # the only temporaries, never an [m, n] one.
        out, weight = H.new_empty(m, n), _weight(n, k, H)
        step = _test_rows(m, n, chunk_size)
        for a in range(0, m, step):
            d = _check_distances(func, arg, distance(h[a:a + step]), a, H)
            _block(d, Y, y[a:a + step], k, weight, out[a:a + step])
        return out.T

    def score(params, state, train, test, *, top_k: int | None = None, largest: bool = True):
        func = f"{name}.score"
        state = check_state(func, state)
        check_cached_train(func, train, state.features.shape[0], read=False,
                           rows=state.train_print)
        h, y = rows(func, "test", params, test, copy=False)
        S = values(state, h, y, func, "test")
        if top_k is None:
            return S
        from .pipeline import TopK

        top_k = check_int(func, "top_k", top_k)
        best = S.topk(min(top_k, S.shape[0]), dim=0, largest=largest)
        return TopK(best.values, best.indices)

    def self_score(params, state, train) -> Tensor:
        func = f"{name}.self_score"
        state = check_state(func, state)
        h, y = rows(func, "train", params, train, copy=False)
        if h.shape[0] != state.features.shape[0]:
            raise ValueError(_msg(func, "train", f"the {state.features.shape[0]} training "
                                  "examples of the state", f"{h.shape[0]}"))
        h = _check_embeddings(func, "train", h.to(state.features.dtype),
                              cast=h.dtype != state.features.dtype)
        # the diagonal pairs row i of train with row i of the state (a one-shot iterator,
        # read above, is not read again)
        train_print.check(func, train, state.train_print, consume=False)
        n = h.shape[0]
        distance = _distances(metric, state.features)
        step, weight = _test_rows(n, n, chunk_size), _weight(n, k, h)
        out, block = h.new_empty(n), h.new_empty(min(step, n), n)
        for a in range(0, n, step):  # one diagonal block at a time
            b = min(a + step, n)
            d = _check_distances(func, "train", distance(h[a:b]), a, state.features)
            _block(d, state.labels, y[a:b], k, weight, block[:b - a])
            out[a:b] = block[:b - a].diagonal(a)
        return out

    return Method(prepare, score, self_score, name)
