"""Influence with params in another order than the model's: every path scores it as the
model-ordered dict (review H F3: the captured test path accepted it, the plan path refused)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.influence import influence

DT = torch.float64


def _init(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return module.double().eval()


class _Tied(nn.Module):
    """Embedding tied to the output head (K-FAC's tied path: the layer-gradient plan)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))).mean(1))


def _case(name):
    g = torch.Generator().manual_seed(0)
    if name == "tied-ekfac":
        fm = functional_model(_init(_Tied(), 1), F.cross_entropy)
        x, y = torch.randint(0, 7, (12, 3), generator=g), torch.randint(0, 7, (12,), generator=g)
        return fm, {"solver": "ekfac"}, (x, y)
    mlp = _init(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), 0)
    fm = functional_model(mlp, F.cross_entropy)
    x, y = torch.randn(12, 4, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    solver, _, target = name.partition("+")
    kw = {"solver": solver}
    if target:
        kw["target"] = functional_model(mlp, lambda o, t: -F.cross_entropy(o, t))
    return fm, kw, (x, y)


@pytest.mark.parametrize("name", ["ekfac", "ekfac+target", "kfac+target", "cg", "cg+target",
                                  "explicit", "tied-ekfac"])
def test_a_reordered_params_dict_scores_as_the_model_ordered_one(name):
    """score/self_score with params reversed (in prepare, in score, or both) == the
    model-ordered call, torch.equal (the same computation after the reorder)."""
    fm, kw, (x, y) = _case(name)
    method = influence(fm, damping=0.1, **kw)
    p = fm.params
    rev = {k: p[k] for k in reversed(list(p))}
    train, test = [(x[:8], y[:8])], (x[8:], y[8:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S = method.score(p, method.prepare(p, train), train, test)
        D = method.self_score(p, method.prepare(p, train), train)
        for pp, pq in ((rev, rev), (p, rev), (rev, p)):
            state = method.prepare(pp, train)
            assert torch.equal(method.score(pq, state, train, test), S)
            assert torch.equal(method.self_score(pq, state, train), D)
        ens = method.prepare([rev, p], train)  # checkpoints in either order
        assert torch.equal(method.score([p, rev], ens, train, test),
                           method.score([p, p], method.prepare([p, p], train), train, test))


def test_other_keys_still_raise_naming_params():
    """A dict missing a key is not reordered: the usual error (naming params=...) is raised."""
    fm, kw, (x, y) = _case("cg+target")
    method = influence(fm, damping=0.1, **kw)
    bad = {k: v for k, v in list(fm.params.items())[1:]}
    with pytest.raises(ValueError, match=r"params=\.\.\.\): expected the keys"):
        method.prepare(bad, [(x[:8], y[:8])])


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_given_factors_of_a_reordered_dict(solver):
    """prepare(params, factors) where the factors were computed for the same keys in another
    order (review R1 F4: refused after the reordering at the boundary): the scores equal the
    model-ordered factors' at 1e-12, whichever side is reordered."""
    from dattri_fn.operators.kfac import ekfac_factors, kfac_factors

    g = torch.Generator().manual_seed(3)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    for p in mlp.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) / 2
    fm = functional_model(mlp, F.cross_entropy)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    train, test = [(x[:8], y[:8])], (x[8:], y[8:])
    rev = {k: fm.params[k] for k in reversed(list(fm.params))}
    fit = kfac_factors if solver == "kfac" else ekfac_factors
    m = influence(fm, solver=solver, damping=0.1)
    want = m.score(fm.params, m.prepare(fm.params, fit(mlp, F.cross_entropy, fm.params, train)),
                   train, test)
    for params in (rev, fm.params):
        state = m.prepare(params, fit(mlp, F.cross_entropy, rev, train))
        torch.testing.assert_close(m.score(params, state, train, test), want, rtol=0,
                                   atol=1e-12 * float(want.abs().max()))
