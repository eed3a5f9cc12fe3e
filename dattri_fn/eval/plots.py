"""Plot helpers for the metrics' results: LDS per test point, the noisy-label ROC curve and the
brittleness removal curve. matplotlib is imported when a helper is called, never at import.

Each helper draws on ``ax`` (a new figure's axes when None), labels it and returns the axes, so
calls compose: ``ax = plot_roc(a, label="IF"); plot_roc(b, ax=ax, label="TRAK")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import _msg
from .detection import BrittlenessResult, NoisyLabelResult, brittleness_curve
from .metrics import LDSResult


def _axes(func: str, ax):
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # an optional dependency: say which extra brings it
        raise ImportError(f"{func}: matplotlib is needed for plots (pip install "
                          "'dattri_fn[plots]').") from err
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    return ax


def _check(func: str, arg: str, value, kind: type, fields: Sequence[str]) -> None:
    if not isinstance(value, kind):
        raise TypeError(_msg(func, arg, f"a {kind.__name__}", type(value).__name__))
    missing = [f for f in fields if getattr(value, f) is None]
    if missing:
        raise ValueError(_msg(func, arg, f"a {kind.__name__} with {missing}",
                              "None there (a result built by hand?)"))


def plot_lds(result: LDSResult, *, ax=None, label: str | None = None, sort: bool = True) -> Any:
    """Draw each test point's LDS (Spearman correlation over subsets), sorted ascending by
    default, with the mean and its 95% interval as a line and a band; NaN test points are
    left out. Returns the axes.

    Args:
        result: what :func:`dattri_fn.eval.metrics.lds` returned.
        ax: matplotlib axes to draw on; None makes a figure.
        label: legend label of the points (e.g. the method's name).
        sort: sort the test points by their LDS (a quantile plot); False keeps test order.
    """
    func = "plot_lds"
    _check(func, "result", result, LDSResult, ("per_test",))
    ax = _axes(func, ax)
    values = result.per_test.detach().cpu().double()
    values = values[torch.isfinite(values)]
    if sort:
        values = values.sort().values
    lo, hi = (float(v) for v in result.ci95)
    points = ax.plot(range(values.numel()), values.tolist(), ".", label=label)[0]
    ax.axhline(float(result.mean), color=points.get_color(), lw=1)
    ax.axhspan(lo, hi, color=points.get_color(), alpha=0.15)
    ax.set_xlabel("test point (sorted by LDS)" if sort else "test point")
    ax.set_ylabel("LDS (Spearman over subsets)")
    if label is not None:
        ax.legend()
    return ax


def plot_roc(result: NoisyLabelResult, *, ax=None, label: str | None = None) -> Any:
    """Draw the noisy-label detection ROC curve (false vs true positive rate) with its AUC in
    the legend, and the chance diagonal. Returns the axes.

    Args:
        result: what :func:`dattri_fn.eval.metrics.noisy_label_detection` returned.
        ax, label: as :func:`plot_lds`; the legend reads ``"<label> (AUC 0.xx)"``.
    """
    func = "plot_roc"
    _check(func, "result", result, NoisyLabelResult, ("fpr", "tpr"))
    ax = _axes(func, ax)
    name = f"AUC {float(result.auc):.3f}" if label is None else \
        f"{label} (AUC {float(result.auc):.3f})"
    ax.plot(result.fpr.detach().cpu().tolist(), result.tpr.detach().cpu().tolist(), label=name)
    ax.plot([0, 1], [0, 1], ls=":", color="gray", lw=1)
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (flipped found)")
    ax.legend(loc="lower right")
    return ax


def plot_brittleness(results: Sequence[BrittlenessResult], *, ks: Sequence[int] | None = None,
                     ax=None, label: str | None = None) -> Any:
    """Draw the removal curve: the share of test points whose prediction flips once at most
    ``k`` top proponents are removed (:func:`dattri_fn.eval.metrics.brittleness_curve`), against
    ``k``. Returns the axes.

    Args:
        results: one :func:`dattri_fn.eval.metrics.brittleness` result per test point.
        ks, ax, label: where to evaluate the curve (default every ``k`` evaluated), as
            :func:`plot_lds`.
    """
    func = "plot_brittleness"
    ks_t, fraction = brittleness_curve(results, ks)
    ax = _axes(func, ax)
    ax.plot(ks_t.tolist(), fraction.tolist(), "o-", label=label)
    ax.set_xlabel("top proponents removed (k)")
    ax.set_ylabel("fraction of test predictions flipped")
    ax.set_ylim(-0.02, 1.02)
    if label is not None:
        ax.legend()
    return ax
