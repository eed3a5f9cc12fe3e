"""K-FAC/EK-FAC on a model that applies one nn.Linear twice (review RL F2, stop 25): the layer is
one Kronecker layer whose two uses are its positions, A = E[(1/T) sum_t a_t a_t^T] and
G = E[sum_t g_t g_t^T] with T = 2, as for a sequence input (it raised KeyError '4' before:
the tied-weight scan took one module's two names for two modules sharing a weight)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.operators.kfac import kfac_factors

DT = torch.float64


def _reused():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), lin, nn.Tanh(), lin, nn.Linear(5, 3))
    return m.to(DT).eval(), lin


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(9, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g)


def test_factors_of_a_linear_applied_twice_equal_brute_force():
    m, lin = _reused()
    x, y = _data()
    f = kfac_factors(m, F.cross_entropy, functional_model(m, F.cross_entropy).params, [(x, y)])
    assert list(f.A) == ["0", "2", "5"]
    ins, outs = [], []

    def hook(mod, i, o):
        ins.append(i[0])
        o.retain_grad()
        outs.append(o)

    handle = lin.register_forward_hook(hook)
    A, G = torch.zeros(6, 6, dtype=DT), torch.zeros(5, 5, dtype=DT)
    for n in range(len(y)):
        ins.clear()
        outs.clear()
        F.cross_entropy(m(x[n:n + 1]), y[n:n + 1], reduction="sum").backward()
        a = [torch.cat([t[0].detach(), torch.ones(1, dtype=DT)]) for t in ins]
        A += sum(torch.outer(v, v) for v in a) / len(a)
        G += sum(torch.outer(o.grad[0], o.grad[0]) for o in outs)
    handle.remove()
    torch.testing.assert_close(f.A["2"], A / len(y), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.G["2"], G / len(y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_influence_runs_and_leaves_the_module_alone(solver):
    m, _ = _reused()
    x, y = _data()
    fm = functional_model(m, F.cross_entropy)
    meth = influence(fm, solver=solver, damping=0.1)
    S = meth.score(fm.params, meth.prepare(fm.params, [(x, y)]), [(x, y)], (x[:4], y[:4]))
    assert S.shape == (9, 4) and bool(torch.isfinite(S).all())
    fresh, _ = _reused()
    fm2 = functional_model(fresh, F.cross_entropy)
    meth2 = influence(fm2, solver=solver, damping=0.1)
    S2 = meth2.score(fm2.params, meth2.prepare(fm2.params, [(x, y)]), [(x, y)], (x[:4], y[:4]))
    torch.testing.assert_close(S, S2, rtol=0, atol=0)
