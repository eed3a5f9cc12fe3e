"""nn.EmbeddingBag: torch has no forward-mode derivative or double backward for it, so the
Gauss-Newton and Hessian products are refused by name, not with torch's internal error
(review RU M2, stop 26); the empirical Fisher, which needs only gradients, runs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.operators import gauss_newton


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 4, mode="mean")
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.bag(ids)))


def _data():
    torch.manual_seed(0)
    ids, y = torch.randint(0, 20, (12, 5)), torch.randint(0, 3, (12,))
    return (ids[:8], y[:8]), (ids[8:], y[8:])


@pytest.mark.parametrize("curvature", [None, "gauss_newton", "hessian"])
@pytest.mark.parametrize("solver", ["cg", "explicit"])
def test_second_order_curvature_refused_naming_layer(solver, curvature):
    fm = functional_model(Bag().double().eval(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"influence\(curvature=\.\.\.\): expected 'fisher'.*'bag'"):
        influence(fm, solver=solver, damping=0.5, curvature=curvature)


def test_gauss_newton_builder_refused_naming_layer():
    fm = functional_model(Bag().double().eval(), F.cross_entropy)
    train, _ = _data()
    with pytest.raises(ValueError, match=r"gauss_newton\(fm=\.\.\.\).*'bag'"):
        gauss_newton(fm)(fm.params, train)


def test_fisher_and_unattributed_bag_run():
    fm = functional_model(Bag().double().eval(), F.cross_entropy)
    train, test = _data()
    m = influence(fm, solver="cg", damping=0.5, curvature="fisher")
    assert torch.isfinite(m.score(fm.params, m.prepare(fm.params, train), train, test)).all()
    head = functional_model(Bag().double().eval(), F.cross_entropy, params=["fc.weight", "fc.bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        A = gauss_newton(head)(head.params, train).dense()
        m = influence(head, solver="explicit", damping=0.5)
        S = m.score(head.params, m.prepare(head.params, train), train, test)
    assert torch.allclose(A, A.T, atol=1e-12) and torch.isfinite(S).all()
