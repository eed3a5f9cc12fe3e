"""Gradient similarity with params in another order than the model's: the same scores."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.gradsim import grad_cos, grad_dot, tracin

DT = torch.float64


def _setup():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)
    return fm, [(x[:4], y[:4]), (x[4:7], y[4:7])], (x[7:], y[7:])


@pytest.mark.parametrize("build", [
    lambda fm: grad_dot(fm), lambda fm: grad_cos(fm), lambda fm: grad_dot(fm, proj_dim=6),
    lambda fm: grad_dot(fm, proj_dim=2, projection="kronecker"),
    lambda fm: tracin(fm, lrs=[0.1, 0.2])])
def test_a_reordered_params_dict_scores_as_the_model_ordered_one(build):
    """score/self_score/prepare with params reversed == the model-ordered call, torch.equal
    (the dict is put in the model's order first: the same computation)."""
    fm, train, test = _setup()
    m = build(fm)
    p = fm.params
    rev = {k: p[k] for k in reversed(list(p))}
    two = [p, {k: v + 0.1 for k, v in p.items()}]
    # checkpoints share one key order (check_checkpoints): each one reversed alike
    ps, qs = ((two, [{k: c[k] for k in reversed(list(p))} for c in two]) if "tracin" in m.name
              else (p, rev))
    state = m.prepare(ps, train)
    assert m.prepare(qs, train) == state
    S = m.score(ps, state, train, test)
    assert torch.equal(m.score(qs, state, train, test), S)
    assert torch.equal(m.score(qs, (), train, test), S)
    assert torch.equal(m.self_score(qs, state, train), m.self_score(ps, state, train))


def test_other_keys_still_raise_naming_params():
    """A dict missing one of the model's keys is refused, naming params=."""
    fm, train, test = _setup()
    bad = dict(list(fm.params.items())[1:])
    with pytest.raises(ValueError, match=r"grad_dot\(params=...\): expected the keys of the model"):
        grad_dot(fm).score(bad, (), train, test)
