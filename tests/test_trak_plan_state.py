"""TRAK keeps its capture plan's check in TRAKState.plan: score and self_score check nothing."""

import pytest
import torch
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute.trak import (
    TRAKState,
    classification_margin_loss,
    classification_weight_loss,
    trak,
)
from dattri_fn.store_hash import state_hash
from dattri_fn.transforms import layer_grads as lgm
from dattri_fn.transforms.layer_grads import PlanDecisions

DT = torch.float64


def _model(act=nn.Tanh):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).double()
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return net.eval()


def _xy(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("C", [1, 2])
def test_trak_state_holds_the_plan_check(cache, C, act, monkeypatch):
    """score/self_score(prepare(train)) == with state.plan=None (each call checks itself), torch.equal;
    prepare checks once, score and self_score never; the state hashes (plain values). A plain
    MLP (Tanh: mlp_chain certifies it) is decided without the check (trak_mlp), a GELU MLP is
    checked."""
    net = _model(act)
    checks = 0 if act is nn.Tanh else 1
    out = functional_model(net, classification_margin_loss)
    w = functional_model(net, classification_weight_loss)
    g = torch.Generator().manual_seed(1)
    params = [dict(out.params)] + [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=DT)
                                    for k, v in out.params.items()} for _ in range(C - 1)]
    train, test = [_xy(1, 5), _xy(2, 4)], _xy(3, 3)
    m = trak(out, weight_fn=w, proj_dim=4, seed=2, damping=0.1, cache_features=cache)
    calls, real = [], lgm._check
    monkeypatch.setattr(lgm, "_check", lambda *a, **k: calls.append(1) or real(*a, **k))
    state = m.prepare(params, train)
    assert isinstance(state, TRAKState) and isinstance(state.plan, PlanDecisions)
    assert len(calls) == checks
    S, diag = m.score(params, state, train, test), m.self_score(params, state, train)
    assert len(calls) == checks
    bare = state._replace(plan=None)
    assert torch.equal(S, m.score(params, bare, train, test))
    assert torch.equal(diag, m.self_score(params, bare, train))
    assert len(state_hash(state)) == 64
