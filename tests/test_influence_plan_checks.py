"""Influence's score/self_score check the capture plan once per call, shared by both sides."""

import pytest
import torch
import torch.nn.functional as F
from plan_counting import count_plan_decisions
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.attribute import influence_score as score_module

DT = torch.float64


def _fm(seed):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return functional_model(net.eval(), F.cross_entropy)


def _xy(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("relatif", [None, "l"])
def test_one_plan_check_per_call(ensemble, relatif, monkeypatch):
    """score and self_score check the plan once each (was once per side and checkpoint); the
    scores equal those of one stream per side and checkpoint (torch.equal)."""
    fms = [_fm(0), _fm(1)]
    params = [f.params for f in fms] if ensemble else fms[0].params
    train, test = [_xy(1, 5), _xy(2, 4)], _xy(3, 3)
    m = influence(fms[0], solver="explicit", damping=0.1, relatif=relatif)
    state = m.prepare(params, train)
    calls = count_plan_decisions(monkeypatch)  # the check's and a certified MLP's decisions
    S, diag = m.score(params, state, train, test), m.self_score(params, state, train)
    assert len(calls) == 2
    monkeypatch.setattr(score_module, "shared_stream", lambda cfg: None)
    assert torch.equal(S, m.score(params, state, train, test))
    assert torch.equal(diag, m.self_score(params, state, train))
    assert len(calls) == 2 + 2 * 2 * (2 if ensemble else 1)
