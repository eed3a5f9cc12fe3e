"""Evaluation metrics for attribution scores: LDS, leave-one-out correlation, noisy-label
detection and brittleness, plus the rank/linear correlations they are built on.

Score convention of the whole library: ``scores`` is ``[n_train, n_test]`` and
``scores[i, j] > 0`` means that up-weighting training example ``i`` LOWERS the loss of test
example ``j`` (``i`` is a *proponent* of ``j``); ``< 0`` marks an opponent.

Targets ("model outputs" in the datamodel literature) follow the matching orientation:
HIGHER = BETTER for the test point, e.g. the correct-class margin ``logit_y - max_{c != y}
logit_c`` or the negative test loss (see :mod:`dattri_fn.eval.tasks`). A correct method then
predicts high targets for subsets rich in proponents, so every metric here is "higher = better".

All functions take and return tensors (dtype and device follow ``scores``); they are pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._checks import _msg, check_int, check_tensor

_Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


class LDSResult(NamedTuple):
    """Linear datamodeling score: ``mean`` over test points, ``per_test`` ``[n_test]``, a
    95% confidence interval ``ci95 = (lo, hi)`` for the mean (0-d tensors) and ``pvalues``
    ``[n_test]``: the two-sided p-value of each test point's Spearman correlation (NaN where it
    is NaN; see :func:`correlation_pvalue`)."""

    mean: Tensor
    per_test: Tensor
    ci95: tuple[Tensor, Tensor]
    pvalues: Tensor | None = None


class LOOCorrelation(NamedTuple):
    """Mean over test points of the Pearson and Spearman correlations with LOO effects, and
    per test point ``[n_test]``: both correlations and their two-sided p-values."""

    pearson: Tensor
    spearman: Tensor
    pearson_per_test: Tensor | None = None
    spearman_per_test: Tensor | None = None
    pearson_pvalues: Tensor | None = None
    spearman_pvalues: Tensor | None = None


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


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _same_shape(func: str, x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(_msg(func, "y", f"the shape of x {list(x.shape)}",
                              f"shape {list(y.shape)}"))


def rank(x: Tensor, dim: int = -1) -> Tensor:
    """Return 1-based ranks along ``dim``, ties given their average rank.  # [..., n] -> [..., n]

    ``rank(tensor([3., 1., 3.]))`` is ``[2.5, 1., 2.5]``, as ``scipy.stats.rankdata``.
    The dtype is ``x``'s if floating, else the default float dtype.
    """
    xs = _float(x).movedim(dim, -1)
    lead, n = xs.shape[:-1], xs.shape[-1]
    flat = xs.reshape(-1, n)
    srt, order = torch.sort(flat, dim=-1, stable=True)
    new_group = torch.ones_like(srt, dtype=torch.bool)
    new_group[:, 1:] = srt[:, 1:] != srt[:, :-1]
    group = new_group.cumsum(-1) - 1
    pos = torch.arange(n, dtype=srt.dtype, device=srt.device).expand_as(srt)
    first = torch.full_like(srt, n).scatter_reduce(-1, group, pos, "amin")
    last = torch.zeros_like(srt).scatter_reduce(-1, group, pos, "amax")
    ranks_sorted = ((first + last) / 2 + 1).gather(-1, group)
    ranks = torch.empty_like(srt).scatter_(-1, order, ranks_sorted)
    return ranks.reshape(*lead, n).movedim(-1, dim)


def _pearson(x: Tensor, y: Tensor, dim: int) -> Tensor:
    xc = x - x.mean(dim, keepdim=True)
    yc = y - y.mean(dim, keepdim=True)
    return (xc * yc).sum(dim) / torch.sqrt((xc * xc).sum(dim) * (yc * yc).sum(dim))


def _betainc(a: Tensor, b: Tensor, x: Tensor, iters: int = 1000) -> Tensor:
    """Regularised incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz),
    elementwise; the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` keeps the fraction in its fast
    region ``x < (a + 1) / (a + b + 2)``."""
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = torch.where(flip, b, a), torch.where(flip, a, b), torch.where(flip, 1 - x, x)
    tiny = torch.finfo(x.dtype).tiny / torch.finfo(x.dtype).eps

    def guard(v: Tensor) -> Tensor:
        return torch.where(v.abs() < tiny, torch.full_like(v, tiny), v)

    c = torch.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    h = d.clone()
    eps = torch.finfo(x.dtype).eps
    for m in range(1, iters + 1):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / guard(1 + coef * d)
            c = guard(1 + coef / c)
            h = h * d * c
        # Converged once the last factor is 1 to rounding everywhere (NaN lanes are ignored).
        if not bool(((d * c - 1).abs() > eps).any()):
            break
    log_front = (a * torch.log(x) + b * torch.log1p(-x) + torch.lgamma(a + b) - torch.lgamma(a)
                 - torch.lgamma(b))
    value = torch.exp(log_front) * h / a
    value = torch.where(x <= 0, torch.zeros_like(value), value)
    return torch.where(flip, 1 - value, value)


def correlation_pvalue(r: Tensor, n: int) -> Tensor:
    """Return the two-sided p-value of correlations ``r`` over ``n`` pairs.  # [...] -> [...]

    Under independence ``t = r sqrt((n - 2) / (1 - r^2))`` is Student-t with ``n - 2`` degrees
    of freedom, so ``p = P(|T| >= |t|) = I_{1 - r^2}((n - 2) / 2, 1 / 2)`` (the regularised
    incomplete beta function). This is ``scipy.stats.pearsonr``'s exact p-value and
    ``scipy.stats.spearmanr``'s (t-approximation) p-value. NaN where ``r`` is NaN or
    ``n < 3``; 0 where ``|r| = 1``.
    """
    r = _float(r)
    if n < 3:
        return torch.full_like(r, float("nan"))
    x = (1 - r * r).clamp(0, 1)
    p = _betainc(torch.full_like(r, (n - 2) / 2), torch.full_like(r, 0.5), x)
    return torch.where(torch.isnan(r), r, p.clamp(0, 1))


def _check_pair(func: str, x: Tensor, y: Tensor, dim: int) -> None:
    check_tensor(func, "x", x)
    check_tensor(func, "y", y)
    _same_shape(func, x, y)
    if x.ndim == 0 or x.shape[dim] < 2:
        raise ValueError(_msg(func, "x", "at least 2 entries along dim",
                              f"shape {list(x.shape)} with dim={dim}"))


def pearson(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """Return Pearson's r between ``x`` and ``y`` along ``dim``.  # [..., n], [..., n] -> [...]

    r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2); NaN where
    either input is constant along ``dim`` (as scipy).

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shapes differ, fewer than 2 entries along ``dim``, or non-finite values.
    """
    _check_pair("pearson", x, y, dim)
    return _pearson(_float(x), _float(y).to(_float(x).dtype), dim)


def spearman(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """Return Spearman's rho = Pearson's r of the ranks (ties averaged).  # [..., n] x2 -> [...]

    Equals ``scipy.stats.spearmanr`` per slice; NaN where either input is constant.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shapes differ, fewer than 2 entries along ``dim``, or non-finite values.
    """
    _check_pair("spearman", x, y, dim)
    rx = rank(x, dim)
    return _pearson(rx, rank(y, dim).to(rx.dtype), dim)


def _mean_ci(values: Tensor, ci: str, n_boot: int, seed: int):
    finite = values[torch.isfinite(values)]
    mean = finite.mean()
    n = finite.numel()
    if n == 0:
        return mean, (mean, mean)  # all NaN: nothing to resample
    if ci == "normal":
        half = _Z95 * finite.std() / math.sqrt(n) if n > 1 else mean.new_tensor(float("nan"))
        return mean, (mean - half, mean + half)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g).to(finite.device)
    boots = finite[idx].mean(1)
    q = torch.quantile(boots, boots.new_tensor([0.025, 0.975]))
    return mean, (q[0], q[1])


def lds(scores: Tensor, subsets: Tensor, targets: Tensor, *, ci: str = "normal",
        n_boot: int = 1000, seed: int = 0) -> LDSResult:
    """Return LDS = mean_j spearman_k(sum_{i in S_k} scores[i, j], targets[k, j]), with a 95% CI.

    Shapes: ``scores [n_train, n_test]``, ``subsets [m, n_train]`` bool, ``targets [m, n_test]``.
    The attribution's prediction for subset ``S_k`` and test point ``j`` is the additive
    ``sum_{i in S_k} scores[i, j]``; ``per_test[j]`` is the Spearman correlation over the ``m``
    subsets between those predictions and the targets of models retrained on each subset
    (see :func:`dattri_fn.eval.retrain.subset_ground_truth`). ``targets`` must be HIGHER = BETTER for
    the test point (margin, negative loss) so that a perfect method under the library's
    convention (positive score = proponent) scores +1 and a reversed one -1.

    Test points whose predictions or targets are constant over the subsets get ``per_test = NaN``
    and are left out of ``mean`` and the interval.

    Args:
        scores: attribution scores ``[n_train, n_test]``.
        subsets: ``[m, n_train]`` bool, ``subsets[k, i]`` = example ``i`` is in subset ``k``.
        targets: ``[m, n_test]`` target of each test point under the model trained on each
            subset (averaged over seeds).
        ci: ``"normal"`` (mean +- 1.96 * std / sqrt(n_test)) or ``"bootstrap"`` (percentile
            interval of ``n_boot`` resamples of the test points drawn from ``seed``).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``LDSResult(mean, per_test [n_test], ci95=(lo, hi), pvalues [n_test])``; ``pvalues``
        are the two-sided p-values of the per-test Spearman correlations over the ``m``
        subsets (:func:`correlation_pvalue`, as ``scipy.stats.spearmanr``).

    Raises:
        TypeError: wrong kinds (non-tensors, non-bool ``subsets``).
        ValueError: mismatched shapes, ``m < 2``, non-finite values or an unknown ``ci``.

    References:
        Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023, arXiv:2303.14186.
        Ilyas et al., "Datamodels: Predicting Predictions from Training Data", arXiv:2202.00622.
    """
    check_tensor("lds", "scores", scores, ndim=2, floating=True)
    n_train, n_test = scores.shape
    check_tensor("lds", "subsets", subsets, ndim=2, dim_size={1: n_train})
    if subsets.dtype != torch.bool:
        raise TypeError(_msg("lds", "subsets", "a bool tensor", str(subsets.dtype)))
    m = subsets.shape[0]
    check_tensor("lds", "targets", targets, ndim=2, dim_size={0: m, 1: n_test}, floating=True)
    if m < 2:
        raise ValueError(_msg("lds", "subsets", "at least 2 subsets", f"m = {m}"))
    if ci not in ("normal", "bootstrap"):
        raise ValueError(_msg("lds", "ci", "'normal' or 'bootstrap'", repr(ci)))
    check_int("lds", "n_boot", n_boot)
    predicted = subsets.to(scores.dtype) @ scores
    per_test = _pearson(rank(predicted, 0), rank(targets.to(scores.dtype), 0), 0)
    mean, ci95 = _mean_ci(per_test, ci, n_boot, seed)
    return LDSResult(mean, per_test, ci95, correlation_pvalue(per_test, m))


def loo_correlation(scores: Tensor, loo_diffs: Tensor) -> LOOCorrelation:
    """Return (mean_j pearson_i, mean_j spearman_i) of ``scores[:, j]`` vs ``loo_diffs[:, j]``.

    ``loo_diffs[i, j] = target_j(full model) - target_j(model without i)`` with a HIGHER =
    BETTER target, i.e. how much removing ``i`` hurts test point ``j`` (for target = -loss it is
    ``loss_j(without i) - loss_j(full)``). Removing a proponent raises the test loss, so under the
    library's convention a correct method correlates POSITIVELY. This is what
    :func:`dattri_fn.eval.retrain.loo_ground_truth` returns; slice ``scores`` to its ``indices``.

    Args:
        scores: ``[n, n_test]`` scores of the ``n`` removed examples.
        loo_diffs: ``[n, n_test]`` leave-one-out effects, same rows.

    Returns:
        ``LOOCorrelation(pearson, spearman, pearson_per_test, spearman_per_test,
        pearson_pvalues, spearman_pvalues)``: the means are 0-d tensors over the test points
        whose columns are not constant (those are NaN per test); per test point ``[n_test]``
        the correlations and their two-sided p-values over the ``n`` rows
        (:func:`correlation_pvalue`).

    Raises:
        TypeError: a non-tensor input.
        ValueError: shapes differ, fewer than 2 rows, or non-finite values.
    """
    check_tensor("loo_correlation", "scores", scores, ndim=2, floating=True)
    check_tensor("loo_correlation", "loo_diffs", loo_diffs, ndim=2, floating=True)
    if loo_diffs.shape != scores.shape:
        raise ValueError(_msg("loo_correlation", "loo_diffs", f"shape {list(scores.shape)}",
                              f"shape {list(loo_diffs.shape)}", "Slice scores to the LOO rows."))
    if scores.shape[0] < 2:
        raise ValueError(_msg("loo_correlation", "scores", "at least 2 rows",
                              f"shape {list(scores.shape)}"))
    d = loo_diffs.to(scores.dtype)
    p = _pearson(scores, d, 0)
    s = _pearson(rank(scores, 0), rank(d, 0), 0)
    n = scores.shape[0]
    return LOOCorrelation(p[torch.isfinite(p)].mean(), s[torch.isfinite(s)].mean(), p, s,
                          correlation_pvalue(p, n), correlation_pvalue(s, n))


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
