"""LoGra's cached rows and RelatIF's row scales belong to the train passed to score (review
RU6 H1, M2; patch G_to_C).

Math: RelatIF ``s_ij = g_i^T H^-1 g_j / n_i`` with ``n_i`` the i-th row's own denominator for
any order of ``train``; LoGra scores ``train`` only where its print equals the state's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri_fn import functional_model
from dattri_fn.attribute import influence, logra

DT = torch.float64


def problem(n=24, m=5):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT).eval()
    x, y = torch.randn(n, 5, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)
    xt, yt = torch.randn(m, 5, dtype=DT, generator=g), torch.randint(0, 3, (m,), generator=g)
    return functional_model(model, F.cross_entropy), (x, y), (xt, yt)


PERM = torch.randperm(24, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["l", "theta"])
def test_relatif_scores_a_permuted_train_by_its_own_rows(mode):
    """score(train[perm]) == S[perm] (was 0.22-0.28 off: prepare's 1/n_i on the wrong rows)."""
    fm, (x, y), test = problem()
    m = influence(fm, solver="explicit", damping=0.1, relatif=mode)
    st = m.prepare(fm.params, (x, y))
    S = m.score(fm.params, st, (x, y), test)
    Sp = m.score(fm.params, st, (x[PERM], y[PERM]), test)
    torch.testing.assert_close(Sp, S[PERM], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m.self_score(fm.params, st, (x[PERM], y[PERM])),
                               m.self_score(fm.params, st, (x, y))[PERM], rtol=1e-12,
                               atol=1e-14)
    split = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert torch.equal(m.score(fm.params, st, split, test), S)  # the prepared scales


def test_relatif_under_a_shuffled_loader_gives_each_row_its_own_scale():
    """prepare and score on DataLoader(shuffle=True): each call's rows equal the true scores of
    the rows it drew (sorted per test column, as the draw is not returned)."""
    fm, (x, y), test = problem()
    m = influence(fm, solver="explicit", damping=0.1, relatif="l")
    S = m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), test)
    dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                    generator=torch.Generator().manual_seed(3))
    try:
        st = m.prepare(fm.params, dl)
    except ValueError as err:  # a refusal of shuffled loaders at prepare is right too
        assert "shuffle" in str(err)
        return
    S1 = m.score(fm.params, st, dl, test)
    torch.testing.assert_close(S1.sort(0).values, S.sort(0).values, rtol=1e-12, atol=1e-14)


def test_logra_refuses_other_rows():
    """score(train[perm]) / other rows raise naming logra.score(train=...); same rows pass."""
    fm, (x, y), test = problem()
    m = logra(fm, proj_dim=2)
    st = m.prepare(fm.params, (x, y))
    S = m.score(fm.params, st, (x, y), test)
    for same in ([(x[:8], y[:8]), (x[8:], y[8:])], (x.clone(), y.clone()), None):
        assert torch.equal(m.score(fm.params, st, same, test), S)
    for bad in ((x[PERM], y[PERM]), (x + 1, y)):
        with pytest.raises(ValueError, match=r"^logra\.score\(train=\.\.\.\): expected the rows "
                           r"prepare saw, in its order"):
            m.score(fm.params, st, bad, test)
    with pytest.raises(ValueError, match=r"^logra\.self_score\(train=\.\.\.\): expected the rows"):
        m.self_score(fm.params, st, (x[PERM], y[PERM]))


def test_logra_names_the_nan_example_of_a_loader_by_its_index():
    """NaN at example 20 of a DataLoader of 8s: 'example 20' (review RU6 L1)."""
    fm, (x, y), _ = problem()
    x = x.clone()
    x[20, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in example 20\."):
        logra(fm, proj_dim=2).prepare(fm.params, DataLoader(TensorDataset(x, y), batch_size=8))
