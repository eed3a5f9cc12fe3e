"""Plot helpers draw exactly the data of the metric results they are given."""

import pytest
import torch

from dattri_fn.eval.metrics import brittleness, lds, noisy_label_detection
from dattri_fn.eval.plots import plot_brittleness, plot_lds, plot_roc

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
F64 = torch.float64


def test_plots_draw_the_results_data():
    """plot_lds draws sorted per-test LDS (NaN left out); plot_roc (fpr, tpr); plot_brittleness
    the removal curve k -> #{smallest_k <= k} / n_test."""
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 3, generator=g, dtype=F64)
    scores[:, 0] = 0  # a constant prediction: NaN LDS for test point 0
    subsets = torch.rand(5, 6, generator=g) < 0.5
    res = lds(scores, subsets, torch.randn(5, 3, generator=g, dtype=F64))
    ax = plot_lds(res, label="m")
    (xs, ys) = ax.lines[0].get_data()
    assert list(ys) == sorted(res.per_test[1:].tolist()) and len(xs) == 2
    assert ax.lines[1].get_ydata()[0] == pytest.approx(res.mean.item(), abs=1e-15)

    roc = noisy_label_detection(torch.tensor([0.9, 0.1, 0.8, 0.3], dtype=F64),
                                torch.tensor([True, False, False, True]))
    ax = plot_roc(roc, label="IF")
    fpr, tpr = ax.lines[0].get_data()
    assert list(fpr) == roc.fpr.tolist() and list(tpr) == roc.tpr.tolist()
    assert "AUC 0.750" in ax.get_legend().get_texts()[0].get_text()

    s = torch.arange(10, dtype=F64)
    results = [brittleness(s, lambda keep: int(keep[7:].any()), ks=(1, 3, 5)),
               brittleness(s, lambda keep: 1, ks=(1, 3, 5))]
    ax = plot_brittleness(results)
    ks, frac = ax.lines[0].get_data()
    assert list(ks) == [1, 3, 5] and list(frac) == [0.0, 0.5, 0.5]
    plt.close("all")


def test_plot_errors():
    """A wrong kind of result is refused naming the helper and the argument."""
    with pytest.raises(TypeError, match=r"plot_roc\(result=...\): expected a NoisyLabelResult"):
        plot_roc(3)
    with pytest.raises(ValueError, match=r"plot_roc\(result=...\): expected a NoisyLabelResult "
                                         r"with \['fpr', 'tpr'\]"):
        from dattri_fn.eval.metrics import NoisyLabelResult

        plot_roc(NoisyLabelResult(torch.tensor(0.5), {}))
    with pytest.raises(TypeError, match=r"plot_lds\(result=...\): expected a LDSResult"):
        plot_lds(None)
