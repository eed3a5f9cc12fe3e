"""Noisy-label detection by self-influence (ROC-AUC) and brittleness (removals that flip a prediction)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._checks import _msg, check_int, check_tensor
from .correlation import rank


class NoisyLabelResult(NamedTuple):
    """ROC-AUC of flagging flipped labels, the fraction of them found in the top ``x``, and the
    ROC curve: ``fpr``, ``tpr`` ``[T + 1]`` at ``thresholds`` ``[T]`` (every distinct
    self-influence, descending; the curve starts at (0, 0))."""

    auc: Tensor
    found_fraction_at: dict[float, Tensor]
    fpr: Tensor | None = None
    tpr: Tensor | None = None
    thresholds: Tensor | None = None


class BrittlenessResult(NamedTuple):
    """Smallest number of removed top proponents that flips the prediction (``None`` if no k
    tried does), ``{k: flipped?}`` and ``{k: prediction}`` for every ``k`` evaluated (the
    removal curve of one test point; :func:`brittleness_curve` aggregates test points)."""

    smallest_k: int | None
    flipped: dict[int, bool]
    predictions: dict[int, Any] | None = None


def noisy_label_detection(self_influence: Tensor, flipped: Tensor,
                          fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3)
                          ) -> NoisyLabelResult:
    """Return the ROC-AUC of ``self_influence`` as a flipped-label detector, and recall at top-x.

    Training points are inspected from the HIGHEST self-influence down (self-influence is
    ``scores[i, i]`` of training point ``i`` on its own loss; mislabelled points are the ones the
    model must bend most to fit, so they score high). AUC = P(score of a flipped point > score
    of a clean one), ties counted 1/2 (Mann-Whitney U / (n_pos n_neg)). ``found_fraction_at[x]``
    is the share of all flipped points among the top ``ceil(x * n)`` (ties broken by index).
    # [n], [n] -> [], {x: []}

    Args:
        self_influence: ``[n]`` floating self-influence.
        flipped: ``[n]`` bool, which labels were flipped (``Task.flipped``).
        fractions: inspection budgets in ``(0, 1]``.

    Returns:
        ``NoisyLabelResult(auc, found_fraction_at, fpr, tpr, thresholds)``: the ROC curve
        flags every point with self-influence ``>= thresholds[t]`` at point ``t + 1`` (point 0
        is (0, 0), the last (1, 1)); its trapezoid area is ``auc``.

    Raises:
        TypeError: non-tensor inputs or a non-bool ``flipped``.
        ValueError: shapes differ, no flipped or no clean point, fractions outside ``(0, 1]``.

    References:
        Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017,
        arXiv:1703.04730 (Sec. 5.4).
    """
    func = "noisy_label_detection"
    check_tensor(func, "self_influence", self_influence, ndim=1, floating=True)
    n = self_influence.shape[0]
    check_tensor(func, "flipped", flipped, ndim=1, dim_size={0: n})
    if flipped.dtype != torch.bool:
        raise TypeError(_msg(func, "flipped", "a bool tensor", str(flipped.dtype)))
    n_pos = int(flipped.sum())
    if n_pos == 0 or n_pos == n:
        raise ValueError(_msg(func, "flipped", "both flipped and clean points",
                              f"{n_pos} flipped out of {n}"))
    fractions = tuple(fractions)
    for x in fractions:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1:
            raise ValueError(_msg(func, "fractions", "numbers in (0, 1]", repr(x)))
    n_neg = n - n_pos
    r = rank(self_influence)
    auc = (r[flipped].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    order = torch.argsort(self_influence, descending=True, stable=True)
    recall = flipped[order].cumsum(0).to(self_influence.dtype) / n_pos
    # round() guards against 0.1 * 100 = 10.000000000000002 becoming 11.
    found = {x: recall[max(1, math.ceil(round(x * n, 9))) - 1] for x in fractions}
    fpr, tpr, thresholds = _roc_curve(self_influence, flipped, order, n_pos, n_neg)
    return NoisyLabelResult(auc, found, fpr, tpr, thresholds)


def _roc_curve(scores: Tensor, positive: Tensor, order: Tensor, n_pos: int, n_neg: int):
    """``(fpr, tpr, thresholds)`` at every distinct score, descending; ties enter together."""
    srt = scores[order]
    pos = positive[order].to(scores.dtype).cumsum(0)
    neg = (~positive[order]).to(scores.dtype).cumsum(0)
    last = torch.ones_like(srt, dtype=torch.bool)  # the last index of each run of equal scores
    last[:-1] = srt[1:] != srt[:-1]
    zero = scores.new_zeros(1)
    return (torch.cat([zero, neg[last] / n_neg]), torch.cat([zero, pos[last] / n_pos]),
            srt[last])


def _same_prediction(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return bool(a == b)


def brittleness(scores: Tensor, retrain_fn: Callable[[Tensor], Any],
                ks: Sequence[int] = (10, 20, 40, 80, 160), *, prediction: Any = None,
                stop_at_first: bool = True) -> BrittlenessResult:
    """Return the smallest k whose top-k proponents, once removed, flip one test prediction.

    For each ``k`` (ascending) the ``k`` training points with the largest ``scores`` (the
    strongest proponents; ties broken by index) are dropped, ``retrain_fn(keep_mask)`` retrains
    on the rest and predicts the test point, and the result is compared with ``prediction``
    (the full-data prediction). A better method flips predictions with a smaller ``k``.
    # scores [n_train] -> smallest_k

    Args:
        scores: ``[n_train]`` scores of every training point for ONE test point.
        retrain_fn: ``keep_mask [n_train] bool -> prediction`` (an int, a tensor, anything with
            ``==``); e.g. :func:`dattri_fn.eval.retrain.make_predict_fn`. Seed it inside.
        ks: numbers of proponents to remove, each in ``[1, n_train]``.
        prediction: the full-data prediction; ``None`` = ``retrain_fn(all True)``.
        stop_at_first: stop retraining at the first flip (the remaining ``k`` are not tried).

    Returns:
        ``BrittlenessResult(smallest_k, flipped={k: bool}, predictions={k: prediction})``.

    Raises:
        TypeError: ``scores`` is not a tensor or ``retrain_fn`` is not callable.
        ValueError: ``scores`` not 1-d or non-finite, or a ``k`` outside ``[1, n_train]``.

    References:
        Ilyas et al., "Datamodels: Predicting Predictions from Training Data", arXiv:2202.00622.
    """
    check_tensor("brittleness", "scores", scores, ndim=1, floating=True)
    if not callable(retrain_fn):
        raise TypeError(_msg("brittleness", "retrain_fn", "a callable keep_mask -> prediction",
                             type(retrain_fn).__name__))
    n = scores.shape[0]
    ks = sorted(set(ks))
    for k in ks:
        check_int("brittleness", "ks", k)
        if k > n:
            raise ValueError(_msg("brittleness", "ks", f"values <= n_train = {n}", repr(k)))
    if prediction is None:
        prediction = retrain_fn(torch.ones(n, dtype=torch.bool, device=scores.device))
    order = torch.argsort(scores, descending=True, stable=True)
    flipped: dict[int, bool] = {}
    predictions: dict[int, Any] = {}
    smallest = None
    for k in ks:
        keep = torch.ones(n, dtype=torch.bool, device=scores.device)
        keep[order[:k]] = False
        predictions[k] = retrain_fn(keep)
        flipped[k] = not _same_prediction(predictions[k], prediction)
        if flipped[k] and smallest is None:
            smallest = k
            if stop_at_first:
                break
    return BrittlenessResult(smallest, flipped, predictions)


def brittleness_curve(results: Sequence[BrittlenessResult],
                      ks: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Return ``(ks, fraction)``: the share of test points flipped by removing at most ``k``
    top proponents, i.e. with ``smallest_k <= k``.  # -> [K] int64, [K] float64

    Args:
        results: one :func:`brittleness` result per test point.
        ks: where to evaluate the curve; default every ``k`` any result evaluated.

    Raises:
        TypeError: an element is not a BrittlenessResult.
        ValueError: no results.
    """
    func = "brittleness_curve"
    results = list(results)
    if not results:
        raise ValueError(_msg(func, "results", "at least one BrittlenessResult", "none"))
    for r in results:
        if not isinstance(r, BrittlenessResult):
            raise TypeError(_msg(func, "results", "BrittlenessResult values (one per test "
                                 "point)", type(r).__name__))
    if ks is None:
        ks = sorted({k for r in results for k in r.flipped})
    ks_t = torch.tensor(sorted(set(ks)), dtype=torch.int64)
    smallest = torch.tensor([math.inf if r.smallest_k is None else r.smallest_k
                             for r in results], dtype=torch.float64)
    fraction = (smallest[None, :] <= ks_t[:, None]).to(torch.float64).mean(1)
    return ks_t, fraction
