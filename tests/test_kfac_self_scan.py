"""K-FAC/EK-FAC ``self_score`` scans each train batch for NaN/inf once (review RCD L1, stop 27):
the pipeline's ``batch_size`` checks it, the per-layer pass reads only its row count. The
refusal of a non-finite batch stays, naming the example."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dattri_fn._checks as checks
from dattri_fn import functional_model
from dattri_fn.attribute import influence


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    return fm, x, y


@pytest.mark.parametrize("solver", ["ekfac", "kfac"])
def test_self_score_scans_each_train_batch_once(solver, monkeypatch):
    fm, x, y = _setup()
    m = influence(fm, solver=solver, damping=0.1)
    st = m.prepare(fm.params, (x, y))
    seen = []
    real = checks.all_finite
    monkeypatch.setattr(checks, "all_finite", lambda t: (seen.append(t), real(t))[1])
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    m.self_score(fm.params, st, batches)
    for xb, _ in batches:  # each batch's float leaf: one scan (was two)
        assert sum(t is xb for t in seen) == 1


@pytest.mark.parametrize("solver", ["ekfac", "kfac"])
def test_self_score_still_refuses_a_nan_train_row(solver):
    fm, x, y = _setup()
    m = influence(fm, solver=solver, damping=0.1)
    st = m.prepare(fm.params, (x, y))
    bad = x.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\(train=\.\.\.\): expected finite values, got NaN or "
                       r"inf in example 7\."):
        m.self_score(fm.params, st, [(bad[:5], y[:5]), (bad[5:], y[5:])])
