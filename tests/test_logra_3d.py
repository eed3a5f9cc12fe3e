"""LoGra end to end: a plain MLP's 2-d factors ([B, k], mlp_io's and the engine's on [B, in] inputs)
give the same prepare/score/self_score as their one-position form [B, 1, k] (review RC F3: since
8b8b634 both sides of test_mlp_io's engine test are 2-d; this pins the 3-d form against them)."""

import importlib

import pytest
import torch
from test_logra import _problem

from dattri_fn.attribute.logra import logra

logra_mod = importlib.import_module("dattri_fn.attribute.logra")  # (the package exports the function)


def _scores(m, fm, train, test):
    state = m.prepare(fm.params, train)
    top = m.score(fm.params, state, train, test, top_k=3)
    return [m.score(fm.params, state, train, test), top.values, top.indices,
            m.self_score(fm.params, state, train)]


@pytest.mark.parametrize("kw", [{}, {"proj_dim": None}, {"proj_dim": (3, 2)}, {"damping": 0.1},
                                {"cache_features": False}])
def test_one_position_form_gives_the_two_d_results(monkeypatch, kw):
    fm, (x, y) = _problem("mlp", 4, 17)
    train, test = [(x[:9], y[:9]), (x[9:], y[9:])], (x[:6] * 1.2, y[:6])
    m = logra(fm, **kw)
    two_d = _scores(m, fm, train, test)
    raw = logra_mod._raw
    seen = []

    def three_d(*a, **k):
        out = raw(*a, **k)
        seen.append([t.ndim for pair in out.values() for t in pair])
        return {n: (a_[:, None, :], g_[:, None, :]) if a_.ndim == 2 else (a_, g_)
                for n, (a_, g_) in out.items()}

    monkeypatch.setattr(logra_mod, "_raw", three_d)
    m3 = logra(fm, **kw)  # built after the patch: logra() binds _raw when it is called
    got = _scores(m3, fm, train, test)
    assert seen and all(d == 2 for nd in seen for d in nd)  # the 2-d path was the one wrapped
    assert len(got) == len(two_d)
    for g, r in zip(got, two_d, strict=True):
        assert torch.equal(g, r)
