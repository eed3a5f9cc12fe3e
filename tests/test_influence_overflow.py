"""Influence with CG/MINRES on an example whose gradient is finite but whose squared norm
overflows (a ReLU MLP's input scaled by 1e20 in float32, 1e160 in float64, relabelled to its
least likely class): the right-hand side is solved scaled down by a power of two, so its scores
equal the explicit (factorised) inverse's; a self-score beyond the dtype's range is refused
naming the example, never returned as finite garbage (engineer F's overflow survey, stop 25)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute import influence
from dattri_fn.model import functional_model

F32, F64 = torch.float32, torch.float64
SCALE = {F32: 1e20, F64: 1e160}


def _problem(dtype):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(16, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
    xt, yt = torch.randn(4, 4, generator=g, dtype=dtype), torch.randint(0, 3, (4,), generator=g)
    return fm, net, x, y, xt, yt


def _huge(net, x, y, i, dtype):
    """x[i] scaled to overflow, relabelled to its least likely class: a gradient ~scale."""
    x, y = x.clone(), y.clone()
    x[i] *= SCALE[dtype]
    with torch.no_grad():
        y[i] = net(x[i:i + 1]).argmin()
    return x, y


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_overflowing_test_gradient_is_solved_exactly(dtype, solver):
    """S[:, j] = G_train (C + d I)^-1 g_j with |g_1| ~ 1e20 (float32) / 1e160 (float64): equal
    to the explicit inverse's scores (a factorisation never squares the right-hand side) to
    1e-4 relative, entrywise; before the fix the column was finite garbage (gap ~1)."""
    fm, net, x, y, xt, yt = _problem(dtype)
    xt, yt = _huge(net, xt, yt, 1, dtype)
    ref = influence(fm, solver="explicit", damping=0.1)
    want = ref.score(fm.params, ref.prepare(fm.params, (x, y)), (x, y), (xt, yt))
    m = influence(fm, solver=solver, damping=0.1, max_iter=200, rtol=1e-10)
    got = m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (xt, yt))
    assert float(want[:, 1].abs().max()) > SCALE[dtype] ** 0.5  # the column is huge
    gap = ((got - want).abs() / (want.abs() + 1e-3 * want.abs().median())).max()
    assert float(gap) < 1e-4


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_self_score_beyond_the_dtype_is_refused_naming_the_example(dtype, solver):
    """g_2^T (C + d I)^-1 g_2 ~ |g_2|^2 / d overflows the dtype: self_score names example 2."""
    fm, net, x, y, _, _ = _problem(dtype)
    x, y = _huge(net, x, y, 2, dtype)
    m = influence(fm, solver=solver, damping=0.1)
    st = m.prepare(fm.params, (x, y))
    with pytest.raises(ValueError, match=rf"^if_{solver}\(train=\.\.\.\): expected examples whose "
                                         r"per-example features \(gradients\) are finite, got NaN "
                                         r"or inf in the self-score of example 2\."):
        m.self_score(fm.params, st, (x, y))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_kfac_factor_overflow_names_train_and_the_layer(dtype):
    """A_0 = E[a a^T] with |a_2| ~ 1e20 (float32) / 1e160 (float64): inf; influence's K-FAC
    refuses naming if_kfac(train=...) and layer '0' (as EK-FAC does), not ihvp_kfac's factors."""
    fm, net, x, y, _, _ = _problem(dtype)
    x, y = _huge(net, x, y, 2, dtype)
    with pytest.raises(ValueError, match=r"^if_kfac\(train=\.\.\.\): expected examples whose layer "
                                         r"inputs and gradients are finite, got NaN or inf in the "
                                         r"input \(A\) factor of layer '0'\."):
        influence(fm, solver="kfac", damping=0.1).prepare(fm.params, (x, y))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_explicit_curvature_overflow_names_train_and_the_example(dtype):
    """The dense curvature of a training example ~1e20 (float32) / 1e160 (float64) is not
    finite: prepare names if_explicit(train=...) and example 2 (was ihvp_explicit(op=...))."""
    fm, net, x, y, _, _ = _problem(dtype)
    x, y = _huge(net, x, y, 2, dtype)
    with pytest.raises(ValueError, match=r"^if_explicit\(train=\.\.\.\): expected examples whose "
                                         r"curvature is finite, got NaN or inf in the dense "
                                         r"curvature \(example 2's gradient has an entry"):
        influence(fm, solver="explicit", damping=0.1).prepare(fm.params, (x, y))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_lissa_self_score_beyond_the_dtype_is_refused_naming_the_example(dtype):
    """LiSSA's right-hand side row ~1e20 is solved scaled (row_scaled): the self-score beyond
    the dtype is refused naming if_lissa(train=...) and example 2 (was ihvp_lissa(scale=...))."""
    fm, net, x, y, xt, yt = _problem(dtype)
    x, y = _huge(net, x, y, 2, dtype)
    m = influence(fm, solver="lissa", damping=0.1, scale=10.0)
    st = m.prepare(fm.params, (x, y))
    with pytest.raises(ValueError, match=r"^if_lissa\(train=\.\.\.\): expected examples whose "
                                         r"per-example features \(gradients\) are finite, got NaN "
                                         r"or inf in the self-score of example 2\."):
        m.self_score(fm.params, st, (x, y))


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_a_large_row_that_cannot_overflow_keeps_the_users_atol(solver):
    """A float32 test gradient ~1e12 squares to ~1e24 * P: finite, solved unscaled as before,
    so a user's atol=1e-3 stays absolute in the user's units (review RF F1: scaled rows took atol
    relative to a unit row, 3e-7 -> 6e-4 off the float64 explicit inverse, silently)."""
    from dattri_fn import solvers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    xt, yt = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    xt[1] *= 1e12
    cols = {}
    for dtype in (F32, F64):
        fm = functional_model(net.to(dtype), F.cross_entropy)
        x, xt = x.to(dtype), xt.to(dtype)
        opt = "explicit" if dtype == F64 else (solvers.cg(M=None, atol=1e-3) if solver == "cg"
                                               else solvers.minres(atol=1e-3))
        m = influence(fm, damping=0.1, solver=opt)
        cols[dtype] = m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (xt, yt))[:, 1]
    ref = cols[F64]
    assert float((cols[F32].double() - ref).norm() / ref.norm()) < 1e-5
