"""KNN-Shapley: exact Shapley values of training points for a K-nearest-neighbour classifier.

For one test point ``(x_t, y_t)`` and the training points sorted by distance to it, nearest
first (``alpha_1, ..., alpha_N``, ties broken by index), the utility of a subset ``S`` is the
K-NN vote share of the true label, ``U(S) = (1/K) sum_{k <= min(K, |S|)} 1[y_{alpha_k(S)} =
y_t]``. Its Shapley values have a closed recursion (Jia et al. 2019, Theorem 1):

    s_{alpha_N} = 1[y_{alpha_N} = y_t] min(K, N) / (K N)      (= 1[...] / N for K <= N)
    s_{alpha_i} = s_{alpha_{i+1}} + (1[y_{alpha_i} = y_t] - 1[y_{alpha_{i+1}} = y_t]) min(K, i) / (K i)

so all N values cost one sort, ``O(N log N)``, instead of ``2^N`` utilities. Here it runs for
all test points at once: a reverse cumulative sum along the sorted axis. Positive = the point's
label agrees with the test label where it counts (a proponent), in the library's convention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import _msg, batch_size, batch_to, check_int, check_tensor, iter_batches
from .._types import Params
from .method import Method
from .outputs import example_label

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


def _values(distances: Tensor, train_labels: Tensor, test_labels: Tensor, k: int) -> Tensor:
    m, n = distances.shape
    order = torch.argsort(distances, dim=1, stable=True)  # [m, n], nearest first
    match = (train_labels[order] == test_labels[:, None]).to(distances.dtype)  # [m, n]
    i = torch.arange(1, n, dtype=distances.dtype, device=distances.device)  # 1-based ranks
    step = (match[:, :-1] - match[:, 1:]) * (i.clamp(max=k) / (k * i))  # [m, n - 1]
    # s_i = s_N + sum_{j >= i} step_j: a reverse cumulative sum along the sorted axis.
    tail = step.flip(1).cumsum(1).flip(1)
    # The farthest point changes the vote only when fewer than K others are in S:
    # s_N = 1[match_N] min(K, N) / (K N), Jia et al.'s 1[match_N] / N when K <= N.
    last = match[:, -1:] * (min(k, n) / (k * n))
    sorted_values = torch.cat([tail, torch.zeros_like(match[:, :1])], 1) + last
    out = torch.empty_like(sorted_values).scatter_(1, order, sorted_values)  # back to train order
    return out.T


class KNNShapleyState(NamedTuple):
    """``features``: the training points' embeddings ``[n_train, F]``; ``labels``: their
    labels ``[n_train]``."""

    features: Tensor
    labels: Tensor


def _distances(metric: str, test: Tensor, train: Tensor) -> Tensor:
    """``[n_test, n_train]`` distances; computed without the ``|a|^2 + |b|^2 - 2ab`` shortcut,
    whose rounding can reorder near-ties."""
    if metric == "cosine":
        a = test / test.norm(dim=1, keepdim=True).clamp_min(torch.finfo(test.dtype).tiny)
        b = train / train.norm(dim=1, keepdim=True).clamp_min(torch.finfo(train.dtype).tiny)
        return 1 - a @ b.T
    return torch.cdist(test, train, compute_mode="donot_use_mm_for_euclid_dist")


def knn_shapley(feature_fn: Callable[[Params, Any], Tensor] | None = None, *, k: int,
                metric: str = "euclidean", label_fn: Callable[[Any], Tensor] = example_label,
                chunk_size: int | None = None) -> Method:
    """Return KNN-Shapley as a Method: ``scores[i, j]`` = the exact Shapley value of train ``i``
    for the K-NN classifier's vote share on test ``j``.  # -> [n_train, n_test]

    ``prepare(params, train)`` embeds the training set once; ``score(params, state, train,
    test)`` embeds the test set and applies :func:`knn_shapley_values` to all test points at
    once (``chunk_size`` test points per block when given); ``self_score`` is the diagonal
    of ``score(train, train)`` (each training point valued for itself as the test point, where
    it is its own nearest neighbour at distance 0). A data value per training point is
    ``scores.mean(1)``.

    Args:
        feature_fn: ``(params, example) -> [F]``, the embedding of ONE example (e.g. a model's
            penultimate features); None: the raw inputs, flattened (the first element of a
            tuple example, or the example itself); ``params`` is then ignored (pass ``{}``).
        k: neighbours ``K >= 1``.
        metric: ``"euclidean"`` or ``"cosine"`` (``1 - cos``) distance between embeddings.
        label_fn: ``example -> y``; default the last element of a tuple example or
            ``example["labels"]``.
        chunk_size: test points per block of ``[chunk, n_train]`` distances.

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

    def rows(func: str, arg: str, params, data) -> tuple[Tensor, Tensor]:
        feats, labels = [], []
        for batch in iter_batches(func, arg, data):
            batch_size(func, arg, batch)
            if params:
                batch = batch_to(batch, next(iter(params.values())).device)
            pair = vmap(lambda ex: (embed(params, ex), label_fn(ex)))(batch)
            feats.append(pair[0])
            labels.append(pair[1])
        if not feats:
            raise ValueError(_msg(func, arg, "at least one batch", "an empty iterable"))
        h = torch.cat(feats)
        if h.ndim != 2:
            raise ValueError(_msg(func, "feature_fn", "a function returning [F] per example",
                                  f"features of shape {list(h.shape[1:])}"))
        if not h.is_floating_point():
            h = h.to(torch.get_default_dtype())
        return h, torch.cat(labels)

    def prepare(params, train) -> KNNShapleyState:
        return KNNShapleyState(*rows(f"{name}.prepare", "train", params, train))

    def check_state(func: str, state) -> KNNShapleyState:
        if not isinstance(state, KNNShapleyState):
            raise TypeError(_msg(func, "state", "the KNNShapleyState returned by prepare",
                                 type(state).__name__))
        return state

    def values(state: KNNShapleyState, h: Tensor, y: Tensor, func: str, arg: str) -> Tensor:
        H, Y = state
        if h.shape[1] != H.shape[1]:
            raise ValueError(_msg(func, arg, f"embeddings of size F={H.shape[1]} like the "
                                  "state's", f"size {h.shape[1]}"))
        h = h.to(H.dtype)
        step = h.shape[0] if chunk_size is None else chunk_size
        blocks = [_values(_distances(metric, h[a:a + step], H), Y, y[a:a + step], k)
                  for a in range(0, h.shape[0], step)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)

    def score(params, state, train, test, *, top_k: int | None = None, largest: bool = True):
        func = f"{name}.score"
        state = check_state(func, state)
        h, y = rows(func, "test", params, test)
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
        h, y = rows(func, "train", params, train)
        if h.shape[0] != state.features.shape[0]:
            raise ValueError(_msg(func, "train", f"the {state.features.shape[0]} training "
                                  "examples of the state", f"{h.shape[0]}"))
        step = h.shape[0] if chunk_size is None else chunk_size
        out = []
        for a in range(0, h.shape[0], step):  # one diagonal block at a time
            block = _values(_distances(metric, h[a:a + step].to(state.features.dtype),
                                       state.features), state.labels, y[a:a + step], k)
            out.append(block[a:a + step].diagonal())
        return torch.cat(out)

    return Method(prepare, score, self_score, name)
