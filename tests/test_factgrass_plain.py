"""FactGraSS on a plain softmax-CE MLP (stop 24): its capture passes take mlp_io's (a, g) (no capture
engine, no plan check), bit for bit the engine's: states, scores and self-scores torch.equal to the
engine path's; a model mlp_io refuses still takes the engine and its check."""

import sys

import pytest
import torch
import torch.nn.functional as F
from test_factgrass import DT, _brute_features, _problem

from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.model import functional_model

_ROWS = sys.modules["dattri_fn.attribute.factgrass_rows"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(fm, x, y, **kw):
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2, **kw)
    train = [(x[:10], y[:10]), (x[10:], y[10:])]
    st = m.prepare(fm.params, train)
    test = (x[:4], y[:4])
    return st, m.score(fm.params, st, None, test), m.self_score(fm.params, st, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cache", ["features", "factors"])
def test_plain_mlp_equals_the_engine_path_and_skips_it(monkeypatch, one_thread, dtype, cache):
    """mlp_io path vs the engine path (mlp_io refused by a patch): torch.equal everywhere; the
    mlp_io path runs no engine pass (batched_io never called) and decides the same plan."""
    monkeypatch.setattr(sys.modules["dattri_fn.attribute.factgrass"], "_keep_bytes",
                        (lambda: -1) if cache == "factors" else (lambda: 1 << 40))
    fm, (x, y) = _problem("mlp", n=24, seed=4)
    if dtype != DT:
        fm = functional_model(fm.module.to(dtype), F.cross_entropy)
        x = x.to(dtype)
    engine_calls = []
    real_flat, real_checked = _ROWS._flat_io, _ROWS._flat_io_checked
    monkeypatch.setattr(_ROWS, "_flat_io", lambda *a: engine_calls.append(1) or real_flat(*a))
    monkeypatch.setattr(_ROWS, "_flat_io_checked",
                        lambda *a: engine_calls.append(1) or real_checked(*a))
    plain = _run(fm, x, y)
    assert engine_calls == []
    monkeypatch.setattr(_ROWS, "_plain_io", lambda *a: None)
    engine = _run(fm, x, y)
    assert engine_calls  # the engine took every pass, and checked the plan
    (sp, Sp, selfp), (se, Se, selfe) = plain, engine
    assert sp.plan == se.plan and sp.blocks == se.blocks
    assert (sp.train_factors is not None) == (cache == "factors")
    assert torch.equal(Sp, Se) and torch.equal(selfp, selfe)
    for b in sp.inverses:
        assert torch.equal(sp.inverses[b], se.inverses[b])


def test_plain_mlp_scores_equal_brute_force():
    """float64: the mlp_io path's scores == autograd features masked and sketched (1e-10)."""
    fm, (x, y) = _problem("mlp", n=20, seed=9)
    st, S, _ = _run(fm, x, y)
    feats = _brute_features(fm, (x, y), 16, 5, 2)
    ref = 0
    for f in feats:
        Fb = f.T @ f / 20
        ref = ref + f @ torch.linalg.solve(Fb + 0.1 * Fb.diagonal().mean() * torch.eye(16, dtype=DT),
                                           f[:4].T)
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_a_hooked_mlp_takes_the_engine_and_its_check(monkeypatch):
    """A forward hook (mlp_io refuses it): the engine's checked pass runs, and its scores equal
    brute force on the hooked model (the hook is part of the model)."""
    fm, (x, y) = _problem("mlp", n=20, seed=9)
    fm.module[0].register_forward_hook(lambda mod, args, out: out * 2.0)
    calls = []
    real = _ROWS._flat_io_checked
    monkeypatch.setattr(_ROWS, "_flat_io_checked", lambda *a: calls.append(1) or real(*a))
    st, S, _ = _run(fm, x, y)
    assert calls == [1]
    feats = _brute_features(fm, (x, y), 16, 5, 2)
    ref = 0
    for f in feats:
        Fb = f.T @ f / 20
        ref = ref + f @ torch.linalg.solve(Fb + 0.1 * Fb.diagonal().mean() * torch.eye(16, dtype=DT),
                                           f[:4].T)
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
