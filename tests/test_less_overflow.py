"""LESS on an example whose gradient is finite but whose square overflows (~1e20 in float32,
~1e160 in float64): Adam's direction there is computed on the entry scaled by a power of two
(``v = inf`` made it 0), and a test gradient whose norm overflows is normalised after dividing
by its largest magnitude (``G / inf`` was 0). Normal input keeps its bits (stop 25, F2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute import less
from dattri_fn.attribute.less import RecordedCheckpoints, adam_direction, unit_rows
from dattri_fn.model import functional_model

F32, F64 = torch.float32, torch.float64
BIG = {F32: 1e20, F64: 1e160}
TINY = {F32: 1e-30, F64: 1e-200}
TOL = {F32: 1e-6, F64: 1e-14}


def _ck(dtype, C=2, P=7):
    g = torch.Generator().manual_seed(0)
    mu = (1e-2 * torch.randn(C, P, generator=g, dtype=F64)).to(dtype)
    nu = (1e-4 * torch.rand(C, P, generator=g, dtype=F64)).to(dtype)
    G = torch.randn(C, 3, P, generator=g, dtype=F64).to(dtype)
    ck = RecordedCheckpoints({}, torch.ones(C, dtype=dtype), torch.tensor([3.0, 10.0][:C],
                             dtype=dtype), mu, nu, (0.9, 0.999), 1e-8, tuple(range(C)))
    return G, ck


def _reference_direction(G, ck):
    """Adam's bias-corrected direction in numpy's long double (nothing overflows)."""
    ld = lambda x: x.numpy().astype(np.longdouble)  # noqa: E731
    b1, b2 = ck.betas
    t = ld(ck.counts + 1)[:, None, None]
    g = ld(G)
    m = (b1 * ld(ck.mu)[:, None] + (1 - b1) * g) / (1 - np.longdouble(b1) ** t)
    v = (b2 * ld(ck.nu)[:, None] + (1 - b2) * g * g) / (1 - np.longdouble(b2) ** t)
    return m / (np.sqrt(v) + np.longdouble(ck.eps))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_adam_direction_of_overflowing_entries(dtype):
    """Entries ~1e20 / 1e160 (g^2 = inf): Adam's direction ~ +-(1-b1)/sqrt(1-b2) x bias
    factors, equal to the long-double reference entrywise (was 0)."""
    G, ck = _ck(dtype)
    G[0, 1, 2] *= BIG[dtype]
    G[1, 2] *= BIG[dtype]
    G[1, 0, 0] *= -BIG[dtype]
    got = adam_direction(G, ck)
    want = _reference_direction(G, ck)
    gap = np.abs(got.numpy().astype(np.longdouble) - want) / np.abs(want)
    assert float(gap.max()) < TOL[dtype] * 10
    assert float(got[1, 2].abs().min()) > 0.1  # the huge entries' steps, not 0


@pytest.mark.parametrize("dtype", [F32, F64])
def test_normal_input_keeps_its_bits(dtype):
    G, ck = _ck(dtype)
    b1, b2 = ck.betas
    t = (ck.counts + 1)[:, None, None]
    m = (b1 * ck.mu[:, None] + (1 - b1) * G) / (1 - b1 ** t)
    v = (b2 * ck.nu[:, None] + (1 - b2) * G * G) / (1 - b2 ** t)
    assert torch.equal(adam_direction(G, ck), m / (v.sqrt() + ck.eps))
    norm = G.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    assert torch.equal(unit_rows(G), G / norm)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_unit_rows_of_huge_and_tiny_rows(dtype):
    """Rows x1e20 / x1e-30 (float32), x1e160 / x1e-200 (float64): the direction of the unscaled
    row (before: 0 for the huge row, garbage for the tiny one); a zero row stays 0."""
    G, _ = _ck(dtype)
    X = G.clone()
    X[0, 1] *= BIG[dtype]
    X[1, 0] *= TINY[dtype]
    X[1, 2] = 0
    got = unit_rows(X)
    want = G.double() / G.double().norm(dim=-1, keepdim=True)
    want[1, 2] = 0
    assert float((got.double() - want).abs().max()) < TOL[dtype] * 10
    assert torch.equal(got[0, 0], unit_rows(G)[0, 0])  # other rows: the same bits


def _record(fm, data, dtype):
    from dattri_fn.training import (
        adamw,
        batch_order,
        finish_record,
        make_step,
        record_step,
        start_record,
        take,
    )

    opt = adamw(1e-2)
    step = make_step(fm, opt)
    params, state = fm.params, opt.init(fm.params)
    rec = start_record("adamw", checkpoint_every=2)
    for rows in batch_order(16, batch_size=4, epochs=2, seed=0):
        batch = take(data, rows)
        rec = record_step(rec, rows, lr=1e-2, params=params, opt_state=state, batch=batch)
        params, state = step(params, state, batch, torch.ones(len(rows), dtype=dtype))
    return finish_record(rec, params=params, opt_state=state)


def _problem(dtype):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(16, 4, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)
    xt, yt = torch.randn(4, 4, generator=g).to(dtype), torch.randint(0, 3, (4,), generator=g)
    fm = functional_model(net, F.cross_entropy)
    rec = _record(fm, (x, y), dtype)  # trained on the clean data
    for data, i in (((x, y), 2), ((xt, yt), 1)):
        data[0][i] *= 1e20
        with torch.no_grad():
            data[1][i] = net(data[0][i:i + 1]).argmin()  # a gradient ~1e20
    return rec, (x, y), (xt, yt)


def test_less_with_a_huge_train_and_test_example_matches_float64():
    """The survey's case (train example 2 and test example 1 ~1e20 in float32): score and
    self_score equal float64's to 1e-4 relative (were off by up to 100%)."""
    out = {}
    for dtype in (F32, F64):
        rec, train, test = _problem(dtype)
        fm_loss = functional_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                                                 nn.Linear(8, 3)).to(dtype), F.cross_entropy)
        m = less(fm_loss)
        st = m.prepare(rec, train)
        out[dtype] = (m.score(rec, st, train, test).double(),
                      m.self_score(rec, st, train).double())
    for got, want in zip(out[F32], out[F64], strict=True):
        scale = want.abs().max()
        assert float(((got - want).abs() / scale).max()) < 1e-4
        assert float(scale) > 1e-3
