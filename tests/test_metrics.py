"""Metrics against hand-computed values, scipy/sklearn references and exact properties."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dattri_fn.eval.metrics import (
    brittleness,
    brittleness_curve,
    correlation_pvalue,
    lds,
    loo_correlation,
    noisy_label_detection,
    pearson,
    rank,
    spearman,
)

F64 = torch.float64
scipy_stats = pytest.importorskip("scipy.stats")


def t(values, device, dtype=F64):
    return torch.tensor(values, dtype=dtype, device=device)


def test_pearson_hand(device):
    """r([1,2,3], [1,2,4]) = 3 / sqrt(2 * 42/9) = 9/sqrt(84)."""
    r = pearson(t([1, 2, 3], device), t([1, 2, 4], device))
    assert abs(r.item() - 9 / math.sqrt(84)) < 1e-12
    assert r.device.type == device.type and r.dtype == F64


def test_spearman_ties_hand(device):
    """ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: rho = 4.5 / sqrt(4.5 * 5)."""
    x, y = t([1, 2, 2, 3], device), t([1, 3, 2, 4], device)
    assert torch.equal(rank(x), t([1, 2.5, 2.5, 4], device))
    assert abs(spearman(x, y).item() - 4.5 / math.sqrt(22.5)) < 1e-12


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 30), batch=st.integers(1, 4),
       levels=st.integers(2, 6))
def test_spearman_matches_scipy_with_ties(device, seed, n, batch, levels):
    """spearman(x, y, dim=0)[b] == scipy.stats.spearmanr(x[:, b], y[:, b]) with heavy ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, batch), generator=g).to(F64)
    y = torch.randint(0, levels, (n, batch), generator=g).to(F64)
    for b in range(batch):
        assume(x[:, b].unique().numel() > 1 and y[:, b].unique().numel() > 1)
    got = spearman(x.to(device), y.to(device), dim=0).cpu()
    ref = torch.tensor([scipy_stats.spearmanr(x[:, b], y[:, b]).statistic for b in range(batch)],
                       dtype=F64)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    assert torch.equal(rank(x, 0)[:, 0], torch.tensor(scipy_stats.rankdata(x[:, 0]), dtype=F64))


def test_constant_input_gives_nan(device):
    """A constant input has no correlation: NaN, as scipy."""
    assert torch.isnan(spearman(t([1, 1, 1], device), t([1, 2, 3], device)))


def test_lds_hand_three_subsets(device):
    """S={0,1},{1,2},{0,2}: rho_0 = 1, rho_1 = -1/2 by hand; mean 1/4, CI 1/4 +- 1.96*0.75."""
    scores = t([[1, 0], [2, 1], [3, -1]], device)
    subsets = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool, device=device)
    # predicted = [[3, 1], [5, 0], [4, -1]]
    targets = t([[10, 0], [30, 5], [20, 1]], device)
    res = lds(scores, subsets, targets)
    assert torch.allclose(res.per_test, t([1.0, -0.5], device), atol=1e-12, rtol=0)
    assert abs(res.mean.item() - 0.25) < 1e-12
    half = 1.959963984540054 * 0.75  # std([1, -0.5], ddof=1) / sqrt(2) = 0.75
    assert abs(res.ci95[0].item() - (0.25 - half)) < 1e-12
    assert abs(res.ci95[1].item() - (0.25 + half)) < 1e-12


@given(seed=st.integers(0, 2**31 - 1), n_train=st.integers(4, 20), n_test=st.integers(1, 5),
       m=st.integers(3, 12))
def test_lds_perfect_and_reversed(device, seed, n_train, n_test, m):
    """targets = g(subsets @ scores) for increasing g gives LDS = 1; decreasing g gives -1."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_train, n_test, generator=g, dtype=F64).to(device)
    subsets = (torch.rand(m, n_train, generator=g) < 0.5).to(device)
    truth = subsets.to(F64) @ scores
    assume(all(truth[:, j].unique().numel() == m for j in range(n_test)))
    perfect = lds(scores, subsets, torch.exp(truth))
    assert torch.allclose(perfect.per_test, torch.ones_like(perfect.per_test), atol=1e-12)
    reverse = lds(scores, subsets, -truth)
    assert abs(reverse.mean.item() + 1) < 1e-12


def test_lds_bootstrap_and_nan_columns(device):
    """Bootstrap CI is seed-deterministic, brackets the mean; constant columns are NaN, skipped."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(10, 6, generator=g, dtype=F64).to(device)
    subsets = (torch.rand(8, 10, generator=g) < 0.5).to(device)
    targets = torch.randn(8, 6, generator=g, dtype=F64).to(device)
    targets[:, 0] = 1.0
    a = lds(scores, subsets, targets, ci="bootstrap", seed=3)
    b = lds(scores, subsets, targets, ci="bootstrap", seed=3)
    assert torch.isnan(a.per_test[0]) and torch.isfinite(a.mean)
    assert abs(a.mean.item() - a.per_test[1:].mean().item()) < 1e-12
    assert a.ci95[0] == b.ci95[0] and a.ci95[1] == b.ci95[1]
    assert a.ci95[0] <= a.mean <= a.ci95[1]


def test_loo_correlation_hand(device):
    """scores [1,2,3] vs diffs [1,2,4]: pearson 9/sqrt(84), spearman 1; negated diffs flip sign."""
    scores, diffs = t([[1], [2], [3]], device), t([[1], [2], [4]], device)
    p, s = loo_correlation(scores, diffs)[:2]
    assert abs(p.item() - 9 / math.sqrt(84)) < 1e-12 and abs(s.item() - 1) < 1e-12
    p, s = loo_correlation(scores, -diffs)[:2]
    assert abs(p.item() + 9 / math.sqrt(84)) < 1e-12 and abs(s.item() + 1) < 1e-12


def test_noisy_label_hand(device):
    """Flipped {.9, .3} vs clean {.1, .8, .5}: 4 of 6 pairs ordered, AUC 2/3; recall at top-k."""
    si = t([0.9, 0.1, 0.8, 0.3, 0.5], device)
    flipped = torch.tensor([True, False, False, True, False], device=device)
    auc, found = noisy_label_detection(si, flipped, fractions=(0.2, 0.4, 0.8, 1.0))[:2]
    assert abs(auc.item() - 2 / 3) < 1e-12
    assert [found[x].item() for x in (0.2, 0.4, 0.8, 1.0)] == [0.5, 0.5, 1.0, 1.0]


def test_noisy_label_ties_hand(device):
    """si [1,1,0,0], flipped [T,F,T,F]: pairs score 1/2 + 1 + 0 + 1/2 over 4 = 1/2."""
    auc = noisy_label_detection(t([1, 1, 0, 0], device),
                                torch.tensor([True, False, True, False], device=device)).auc
    assert abs(auc.item() - 0.5) < 1e-12


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, 40))
def test_noisy_label_auc_matches_sklearn(seed, n):
    """AUC equals sklearn.metrics.roc_auc_score on drawn scores with ties."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(seed)
    si = torch.randint(0, 5, (n,), generator=g).to(F64)
    flipped = torch.rand(n, generator=g) < 0.3
    assume(0 < int(flipped.sum()) < n)
    auc = noisy_label_detection(si, flipped).auc
    assert abs(auc.item() - roc_auc_score(flipped.numpy(), si.numpy())) < 1e-12


def test_brittleness_fake_retrain(device):
    """prediction = [any of 7, 8, 9 kept]: removing the top-3 scores (9, 8, 7) flips it first."""
    scores = torch.arange(10, dtype=F64, device=device)
    calls = []

    def retrain(keep):
        calls.append(int((~keep).sum()))
        return int(keep[7:].any())

    res = brittleness(scores, retrain, ks=(5, 1, 2, 3))
    assert res.smallest_k == 3 and res.flipped == {1: False, 2: False, 3: True}
    assert calls == [0, 1, 2, 3]
    full = brittleness(scores, retrain, ks=(1, 3, 5), prediction=1, stop_at_first=False)
    assert full.flipped == {1: False, 3: True, 5: True}
    assert brittleness(scores, retrain, ks=(1, 2), prediction=1).smallest_k is None


def test_metric_errors(device):
    """Bad shapes, kinds and values raise errors that name the function and argument."""
    s = torch.zeros(3, 2, dtype=F64, device=device)
    sub = torch.ones(4, 3, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=r"lds\(targets=...\): expected size 4 at dim 0"):
        lds(s, sub, torch.zeros(5, 2, dtype=F64, device=device))
    with pytest.raises(TypeError, match=r"lds\(subsets=...\): expected a bool tensor"):
        lds(s, sub.to(F64), torch.zeros(4, 2, dtype=F64, device=device))
    with pytest.raises(ValueError, match=r"lds\(ci=...\): expected 'normal' or 'bootstrap'"):
        lds(s, sub, torch.zeros(4, 2, dtype=F64, device=device), ci="exact")
    with pytest.raises(ValueError, match=r"spearman\(y=...\): expected the shape of x"):
        spearman(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"pearson\(x=...\): expected finite values"):
        pearson(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"loo_correlation\(loo_diffs=...\): expected shape"):
        loo_correlation(s, torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"noisy_label_detection\(flipped=...\): expected both"):
        noisy_label_detection(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"noisy_label_detection\(fractions=...\)"):
        noisy_label_detection(torch.zeros(2), torch.tensor([True, False]), fractions=(1.5,))
    with pytest.raises(ValueError, match=r"brittleness\(ks=...\): expected values <= n_train"):
        brittleness(torch.zeros(3), lambda keep: 0, ks=(4,))
    with pytest.raises(TypeError, match=r"brittleness\(retrain_fn=...\): expected a callable"):
        brittleness(torch.zeros(3), 5)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 40), batch=st.integers(1, 4))
def test_pvalues_match_scipy(seed, n, batch):
    """correlation_pvalue(r, n) == scipy's pearsonr / spearmanr two-sided p-values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, batch, generator=g, dtype=F64)
    y = x * torch.rand(batch, generator=g, dtype=F64) * 2 + torch.randn(n, batch, generator=g,
                                                                        dtype=F64)
    p_got = correlation_pvalue(pearson(x, y, dim=0), n)
    s_got = correlation_pvalue(spearman(x, y, dim=0), n)
    for b in range(batch):
        p_ref = scipy_stats.pearsonr(x[:, b], y[:, b]).pvalue
        s_ref = scipy_stats.spearmanr(x[:, b], y[:, b]).pvalue
        assert abs(p_got[b].item() - p_ref) <= 1e-10 * max(1.0, p_ref)
        assert abs(s_got[b].item() - s_ref) <= 1e-10 * max(1.0, s_ref)


def test_pvalue_edges():
    """|r| = 1 gives p = 0, r = 0 gives p = 1, NaN stays NaN, n < 3 gives NaN."""
    p = correlation_pvalue(torch.tensor([1.0, -1.0, 0.0, float("nan")], dtype=F64), 10)
    assert p[:3].tolist() == [0.0, 0.0, 1.0] and torch.isnan(p[3])
    assert torch.isnan(correlation_pvalue(torch.tensor([0.5], dtype=F64), 2)).all()


@given(seed=st.integers(0, 2**31 - 1), n_train=st.integers(4, 12), n_test=st.integers(1, 4),
       m=st.integers(3, 12))
def test_lds_and_loo_per_test_pvalues(seed, n_train, n_test, m):
    """lds.pvalues[j] == spearmanr(pred[:, j], targets[:, j]).pvalue; LOO per test likewise."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_train, n_test, generator=g, dtype=F64)
    subsets = torch.rand(m, n_train, generator=g) < 0.5
    targets = torch.randn(m, n_test, generator=g, dtype=F64)
    res = lds(scores, subsets, targets)
    pred = subsets.to(F64) @ scores
    for j in range(n_test):
        ref = scipy_stats.spearmanr(pred[:, j], targets[:, j])
        if math.isnan(ref.statistic):
            assert torch.isnan(res.pvalues[j])
            continue
        assert abs(res.pvalues[j].item() - ref.pvalue) <= 1e-10 * max(1.0, ref.pvalue)
    diffs = torch.randn(n_train, n_test, generator=g, dtype=F64)
    loo = loo_correlation(scores, diffs)
    for j in range(n_test):
        p_ref = scipy_stats.pearsonr(scores[:, j], diffs[:, j])
        s_ref = scipy_stats.spearmanr(scores[:, j], diffs[:, j])
        assert abs(loo.pearson_per_test[j].item() - p_ref.statistic) < 1e-12
        assert abs(loo.spearman_per_test[j].item() - s_ref.statistic) < 1e-12
        assert abs(loo.pearson_pvalues[j].item() - p_ref.pvalue) <= 1e-10 * max(1.0, p_ref.pvalue)
        assert abs(loo.spearman_pvalues[j].item() - s_ref.pvalue) <= 1e-10 * max(1.0,
                                                                                  s_ref.pvalue)
    assert abs(loo.pearson.item() - loo.pearson_per_test.mean().item()) < 1e-12


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, 40))
def test_roc_curve_matches_sklearn(seed, n):
    """(fpr, tpr, thresholds) == sklearn roc_curve(drop_intermediate=False); trapezoid = AUC."""
    from sklearn.metrics import roc_curve

    g = torch.Generator().manual_seed(seed)
    si = torch.randint(0, 6, (n,), generator=g).to(F64)
    flipped = torch.rand(n, generator=g) < 0.3
    assume(0 < int(flipped.sum()) < n)
    res = noisy_label_detection(si, flipped)
    fpr, tpr, thr = roc_curve(flipped.numpy(), si.numpy(), drop_intermediate=False)
    assert torch.allclose(res.fpr, torch.tensor(fpr, dtype=F64), rtol=0, atol=1e-15)
    assert torch.allclose(res.tpr, torch.tensor(tpr, dtype=F64), rtol=0, atol=1e-15)
    assert torch.equal(res.thresholds, torch.tensor(thr[1:], dtype=F64))
    area = torch.trapezoid(res.tpr, res.fpr)
    assert abs(area.item() - res.auc.item()) < 1e-12


def test_brittleness_removal_curve():
    """predictions[k] is the retrained prediction; curve(k) = #{smallest_k <= k} / n_test."""
    scores = torch.arange(10, dtype=F64)
    res = brittleness(scores, lambda keep: int(keep[7:].any()), ks=(1, 2, 3, 5),
                      stop_at_first=False)
    assert res.predictions == {1: 1, 2: 1, 3: 0, 5: 0}
    never = brittleness(scores, lambda keep: 1, ks=(1, 5))
    early = brittleness(scores, lambda keep: int(keep[9]), ks=(1, 5))
    ks, frac = brittleness_curve([res, never, early])
    assert ks.tolist() == [1, 2, 3, 5]
    assert torch.equal(frac, torch.tensor([1 / 3, 1 / 3, 2 / 3, 2 / 3], dtype=F64))
    ks, frac = brittleness_curve([res], ks=[4, 2])
    assert ks.tolist() == [2, 4] and frac.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"brittleness_curve\(results=...\): expected at least"):
        brittleness_curve([])
    with pytest.raises(TypeError, match=r"brittleness_curve\(results=...\): expected "
                                        r"BrittlenessResult"):
        brittleness_curve([3])
