"""FactGraSS's cached rows belong to the train passed to score (RU6 M2); every score block is
checked finite (RU6 M1); a NaN example is named by its index (RU6 L1). Patch G_to_D.

Math: ``S = T P^T`` streamed by blocks; a block with NaN/inf (finite float32 features ~1e20
overflow in the dot) raises naming ``func(train=...)``, top_k included."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import factgrass, grad_dot, influence, tracin

DT = torch.float64


def problem(n=24, m=5, dtype=DT, scale=1.0):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype).eval()
    x = torch.randn(n, 5, dtype=dtype, generator=g) * scale
    y = torch.randint(0, 3, (n,), generator=g)
    xt = torch.randn(m, 5, dtype=dtype, generator=g) * scale
    yt = torch.randint(0, 3, (m,), generator=g)
    return functional_model(model, F.cross_entropy), (x, y), (xt, yt)


def test_factgrass_refuses_other_rows():
    """score(train[perm]) / other rows raise naming factgrass.score(train=...)."""
    fm, (x, y), test = problem()
    m = factgrass(fm, proj_dim=8, blowup=2)
    st = m.prepare(fm.params, (x, y))
    S = m.score(fm.params, st, (x, y), test)
    for same in ([(x[:8], y[:8]), (x[8:], y[8:])], (x.clone(), y.clone()), None):
        assert torch.equal(m.score(fm.params, st, same, test), S)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    for bad in ((x[perm], y[perm]), (x + 1, y)):
        with pytest.raises(ValueError, match=r"^factgrass\.score\(train=\.\.\.\): expected the "
                           r"rows prepare saw, in its order"):
            m.score(fm.params, st, bad, test)


OVERFLOW = {
    "grad_dot_proj": lambda fm: (grad_dot(fm, proj_dim=6), "grad_dot"),
    "grad_dot_kron": lambda fm: (grad_dot(fm, proj_dim=2, projection="kronecker"), "grad_dot"),
    "grad_dot_loss": lambda fm: (grad_dot(fm.loss, proj_dim=6), "grad_dot"),
    "tracin_proj": lambda fm: (tracin(fm, lrs=[1.0], proj_dim=6), "tracin"),
    "if_cg": lambda fm: (influence(fm, solver="cg", damping=0.1), "if_cg"),
    "if_datainf": lambda fm: (influence(fm, solver="datainf", damping=0.1), "if_datainf"),
}


@pytest.mark.parametrize("name", sorted(OVERFLOW))
@pytest.mark.filterwarnings("ignore")
def test_overflowing_dot_is_refused_also_with_top_k(name):
    """float32 inputs ~1e20: finite features, NaN/inf scores -> ValueError (was silent)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).eval()
    fm = functional_model(model, F.cross_entropy)
    x, y = torch.randn(16, 5) * 1e20, torch.randint(0, 3, (16,))
    test = (torch.randn(3, 5) * 1e20, torch.randint(0, 3, (3,)))
    m, func = OVERFLOW[name](fm)
    p = [fm.params] if name.startswith("tracin") else fm.params
    st = m.prepare(p, (x, y))
    for kw in ({}, {"top_k": 2}):
        with pytest.raises(ValueError, match=rf"^{func}\(train=\.\.\.\): .*NaN or inf in the "
                           "scores"):
            m.score(p, st, (x, y), test, **kw)


def test_grad_dot_names_the_nan_example_by_its_index():
    """NaN at example 20 of [8, 8, 8]: 'example 20' in score (stream_scores)."""
    fm, (x, y), test = problem()
    x = x.clone()
    x[20, 1] = float("nan")
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    m = grad_dot(fm)
    st = m.prepare(fm.params, batches)
    with pytest.raises(ValueError, match=r"in example 20\."):
        m.score(fm.params, st, batches, test)
