"""TRAK's cached rows belong to the train passed to score (review RU6 M2, L1; patch G_to_F).

Math: a state caching per-row features scores ``train`` only where ``print(train)`` equals
``state.train_print`` (the same rows, in prepare's order); a NaN example is named by its index."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import trak

DT = torch.float64


def problem(n=24, m=5):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT).eval()
    x, y = torch.randn(n, 5, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)
    xt, yt = torch.randn(m, 5, dtype=DT, generator=g), torch.randint(0, 3, (m,), generator=g)
    return functional_model(model, F.cross_entropy), (x, y), (xt, yt)


@pytest.mark.parametrize("kw", [{}, {"proj_dim": 8}, {"proj_dim": 300}])
def test_trak_refuses_other_rows_and_keeps_its_scores(kw):
    """primal (proj 8), dual (no projection: factored; proj 300 > n: dense dual) forms."""
    fm, (x, y), test = problem()
    m = trak(fm, **kw)
    st = m.prepare(fm.params, (x, y))
    S = m.score(fm.params, st, (x, y), test)
    split = [(x[:8], y[:8]), (x[8:], y[8:])]
    for same in (split, (x.clone(), y.clone()), None):
        assert torch.equal(m.score(fm.params, st, same, test), S)
    assert torch.equal(m.self_score(fm.params, st, split), m.self_score(fm.params, st, None))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    for bad in ((x[perm], y[perm]), (x + 1, y)):
        with pytest.raises(ValueError, match=r"^trak\.score\(train=\.\.\.\): expected the rows "
                           r"prepare saw, in its order .*row \d+ differs"):
            m.score(fm.params, st, bad, test)
        with pytest.raises(ValueError, match=r"^trak\.self_score\(train=\.\.\.\): expected the "
                           "rows prepare saw"):
            m.self_score(fm.params, st, bad)


def test_trak_names_the_nan_example_by_its_index():
    """NaN at example 20 of [8, 8, 8]: 'example 20', not 'row 4 of the batch' (RU6 L1)."""
    fm, (x, y), _ = problem()
    x = x.clone()
    x[20, 1] = float("nan")
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    for kw in ({}, {"proj_dim": 8}):
        with pytest.raises(ValueError, match=r"trak\.prepare\(train=\.\.\.\): expected finite "
                           r"values, got NaN or inf in example 20\."):
            trak(fm, **kw).prepare(fm.params, batches)
