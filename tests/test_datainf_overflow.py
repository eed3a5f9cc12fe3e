"""DataInf on an example whose gradient is finite but whose squared norm overflows (a row
~1e20 in float32, ~1e154 in float64): the row's Sherman-Morrison term is applied scaled by a
power of two instead of dropping out (``g / inf = 0``, engineer F's survey: up to 7% off), the
default damping is the same mean computed scaled, and a default damping beyond the dtype is
refused naming ``damping``. Normal input keeps its bits (stop 25, engineer F2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.datainf import datainf_damping, ihvp_datainf

F32, F64 = torch.float32, torch.float64
BIG = {F32: 1e20, F64: 1e154}
TOL = {F32: 1e-5, F64: 1e-12}


def _grads(dtype):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 5, generator=g, dtype=F64).to(dtype)
    G[2] *= BIG[dtype]
    V = torch.randn(3, 5, generator=g, dtype=F64).to(dtype)
    return G, V


def _reference(G, V, lam):
    """The Sherman-Morrison average in numpy's long double (range ~1e4932: nothing overflows)."""
    g = G.numpy().astype(np.longdouble)
    v = V.numpy().astype(np.longdouble)
    lam = np.longdouble(lam)
    sq = (g * g).sum(1, keepdims=True)
    out = (v - ((v @ g.T) / (lam + sq).T) @ g / g.shape[0]) / lam
    return out, (0.1 * sq.mean() / g.shape[1])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_overflowing_row_keeps_its_term(dtype):
    """damping=0.1: equal to the long-double reference to a few ulps of the largest entry
    (the row dropped out before: off by ~|projection of V on g_2| / n)."""
    G, V = _grads(dtype)
    assert not torch.isfinite((G * G).sum(1)).all()
    got = ihvp_datainf(G, damping=0.1)(V)
    want, _ = _reference(G, V, 0.1)
    gap = np.abs(got.numpy().astype(np.longdouble) - want).max() / np.abs(want).max()
    assert gap < TOL[dtype]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_default_damping_of_an_overflowing_block(dtype):
    """datainf_damping and the default lam: the same mean, computed scaled (was inf, which made
    the whole inverse 0)."""
    G, V = _grads(dtype)
    want, lam = _reference(G, V, _reference(G, V, 1.0)[1])
    got_lam = float(datainf_damping(G)["all"])
    assert abs(np.longdouble(got_lam) - lam) / lam < TOL[dtype]
    got = ihvp_datainf(G)(V)
    gap = np.abs(got.numpy().astype(np.longdouble) - want).max() / np.abs(want).max()
    assert gap < TOL[dtype]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_default_damping_beyond_the_dtype_is_refused(dtype):
    G, _ = _grads(dtype)
    G[2] *= 1e10 if dtype == F32 else 1e150
    with pytest.raises(ValueError, match=r"^ihvp_datainf\(damping=\.\.\.\): expected a finite "
                                         r"default lam_l .* got inf in block 'all'"):
        ihvp_datainf(G)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("damping", [0.1, None])
def test_normal_input_keeps_its_bits(dtype, damping):
    """Without an overflowing row the operator is the formula as before, bit for bit."""
    G, V = _grads(dtype)
    G[2] /= BIG[dtype]
    blocks = {"a": slice(0, 2), "b": slice(2, 5)}
    got = ihvp_datainf(G, damping=damping, blocks=blocks)(V)
    out = []
    for s in blocks.values():
        g, v = G[:, s], V[:, s]
        lam = 0.1 * (g * g).sum(1).mean() / g.shape[1] if damping is None else damping
        scaled = g / (lam + (g * g).sum(1, keepdim=True))
        out.append((v - ((v @ scaled.T) @ g) / g.shape[0]) / lam)
    assert torch.equal(got, torch.cat(out, dim=1))


def _problem(dtype):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(16, 4, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)
    xt, yt = torch.randn(4, 4, generator=g).to(dtype), torch.randint(0, 3, (4,), generator=g)
    x[2] *= 1e20
    with torch.no_grad():
        y[2] = net(x[2:3]).argmin()  # the least likely class: a gradient ~1e20
    return functional_model(net, F.cross_entropy), (x, y), (xt, yt)


def test_influence_datainf_train_side_matches_float64():
    """The survey's case: influence(solver='datainf') with training example 2 ~1e20 in float32
    equals the same model in float64 entrywise (was up to 7% off)."""
    out = {}
    for dtype in (F32, F64):
        fm, train, test = _problem(dtype)
        m = influence(fm, solver="datainf", damping=0.1)
        out[dtype] = m.score(fm.params, m.prepare(fm.params, train), train, test).double()
    want = out[F64]
    gap = ((out[F32] - want).abs() / want.abs().clamp_min(1e-3 * want.abs().median())).max()
    assert float(want.abs().max()) > 1e19
    assert float(gap) < 1e-4
