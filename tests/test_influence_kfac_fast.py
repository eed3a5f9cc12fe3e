"""K-FAC/EK-FAC influence's score takes its test gradients from the state's capture: no plan
check, the same scores as the layer-gradient plan's."""

import pytest
import torch
import torch.nn.functional as F
from plan_counting import count_plan_decisions
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.attribute import influence_score as score_module
from dattri_fn.attribute.influence_config import influence_config
from dattri_fn.operators.kfac import ekfac_factors, ihvp_ekfac

DT = torch.float64


def _fm(seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3)).double()
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) / 2
    return functional_model(net.eval(), F.cross_entropy)


def _xy(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
@pytest.mark.parametrize("ensemble", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_captured_test_side_equals_plan(solver, ensemble, bias, monkeypatch):
    """S = G_train (F + d I)^-1 G_test^T with G_test from the capture equals it with G_test
    from the plan (torch.equal: T = 1, each entry one product), and score checks no plan."""
    fms = [_fm(0, bias), _fm(1, bias)]
    params = [f.params for f in fms] if ensemble else fms[0].params
    train, test = [_xy(1, 5), _xy(2, 4)], [_xy(3, 3), _xy(4, 2)]
    m = influence(fms[0], solver=solver, damping=0.1, chunk_size=2)
    state = m.prepare(params, train)
    calls = count_plan_decisions(monkeypatch)  # the check's and a certified MLP's decisions
    S = m.score(params, state, train, test)
    assert calls == []
    monkeypatch.setattr(score_module, "captured_test", lambda cfg, ps: False)
    assert torch.equal(S, m.score(params, state, train, test))
    assert calls == [1]


def test_captured_rows_are_the_gradients():
    """captured_grads(batch) = [d loss_j / d params] raveled, against autograd per example
    (1e-12)."""
    fm = _fm(2)
    train, test = _xy(1, 6), _xy(5, 4)
    m = influence(fm, solver="ekfac", damping=0.1)
    state = m.prepare(fm.params, train)
    cfg = influence_config(fm, solver="ekfac", damping=0.1, curvature=None, target=None,
                           model=None, l2=0.0, chunk_size=None, batch_rows=None, relatif=None,
                           per_layer=False, solver_options={})
    rows = score_module.captured_grads(cfg, fm.params, state)(test)
    ref = []
    for x, y in zip(*test, strict=True):
        g = torch.func.grad(fm.loss)(fm.params, (x, y))
        ref.append(torch.cat([g[k].reshape(-1) for k in fm.params]))
    assert torch.allclose(rows, torch.stack(ref), rtol=0, atol=1e-12)


def test_ravel_inverts_blocks():
    """ravel(blocks(V)) == V bit for bit, for layers with and without a bias."""
    fm = _fm(3, bias=False)
    f = ekfac_factors(fm.module, F.cross_entropy, fm.params, [_xy(1, 8)])
    op = ihvp_ekfac(f, damping=0.1)
    V = torch.randn(5, op.dim, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert torch.equal(op.ravel(op.blocks(V)), V)


def test_target_keeps_the_plan(monkeypatch):
    """With a separate target the test side is the target's gradients: the plan's path (one
    check), not the capture of the training loss."""
    fm = _fm(4)
    train, test = _xy(1, 5), _xy(2, 3)
    target = functional_model(fm.module, lambda out, y: -F.cross_entropy(out, y, reduction="none"))
    m = influence(fm, solver="ekfac", damping=0.1, target=target)
    state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, test)
    plain = influence(fm, solver="ekfac", damping=0.1)
    assert torch.allclose(S, -plain.score(fm.params, plain.prepare(fm.params, train), train, test),
                          rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:.*outside the Kronecker-factored layers")
@pytest.mark.parametrize("layers", [None, ["0"]])
def test_prepare_builds_one_capture(layers, monkeypatch):
    """prepare builds the capture once and scores with it when the factors cover the captured
    layers (a 'layers' subset: the same); the scores equal those of a rebuilt capture."""
    from dattri_fn.operators import kfac

    fm = _fm(5)
    train, test = _xy(1, 5), _xy(2, 3)
    opts = {} if layers is None else {"layers": layers}
    m = influence(fm, solver="ekfac", damping=0.1, **opts)
    calls, real = [], kfac.kfac_tap
    monkeypatch.setattr(kfac, "kfac_tap", lambda *a, **k: calls.append(1) or real(*a, **k))
    state = m.prepare(fm.params, train)
    assert calls == [1]
    S = m.score(fm.params, state, train, test)
    rebuilt = state._replace(tap=real(fm.module, fm.params, layers=list(state.ihvp.eigen[0])))
    assert torch.equal(S, m.score(fm.params, rebuilt, train, test))


@pytest.mark.parametrize("opts", [{"l2": 0.01}, {"per_layer": True}, {"query_rank": 2},
                                  {"dtype": torch.float32}])
def test_captured_test_side_with_options(opts, monkeypatch):
    """With l2 (the test side has no l2 term), per-layer scores, low-rank query blocks or 32-bit
    factors, the capture's test gradients give the plan's scores (torch.equal)."""
    fm = _fm(6)
    train, test = [_xy(1, 5), _xy(2, 4)], _xy(3, 3)
    m = influence(fm, solver="ekfac", damping=0.1, **opts)
    state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, test)
    monkeypatch.setattr(score_module, "captured_test", lambda cfg, ps: False)
    ref = m.score(fm.params, state, train, test)
    if isinstance(S, dict):
        assert S.keys() == ref.keys() and all(torch.equal(S[k], ref[k]) for k in S)
    else:
        assert torch.equal(S, ref)
