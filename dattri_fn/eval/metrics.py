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

Modules: :mod:`.correlation` (``rank``, ``pearson``, ``spearman``, ``correlation_pvalue``), this
one (``lds``, ``loo_correlation``) and :mod:`.detection` (``noisy_label_detection``,
``brittleness``, ``brittleness_curve``); every name stays importable from here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import _msg, check_int, check_tensor
from .correlation import _pearson, correlation_pvalue, pearson, rank, spearman  # noqa: F401
from .detection import (  # noqa: F401
    BrittlenessResult,
    NoisyLabelResult,
    brittleness,
    brittleness_curve,
    noisy_label_detection,
)

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
