"""LiSSA against torch.linalg.solve: exact-limit, mini-batch, divergence and validation tests;
the sampled curvature value against the dense mean of its batch operators and the old call form."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn import solvers
from dattri_fn._types import LinOp
from dattri_fn.operators.curvature import hvp
from dattri_fn.operators.stochastic import SampledLinOp, sampled
from dattri_fn.solve import ihvp_lissa
from problems import DTYPE, dense_hessian, linear_regression, mlp

seeds = st.integers(0, 2**31 - 1)
# Full batch, depth set so that (1 - mu_min/scale)^depth <= 1e-9: error of the Neumann series.
FULL_BATCH_RTOL = 1e-6
# Mini-batches of n/2 rows, 8 repeats: measured worst relative error 0.052 over seeds 0..199.
MINIBATCH_RTOL = 0.2


def _randn(seed, *shape, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).to(device)


def _per_example(n, dim, seed, device):
    """Per-example PSD curvatures x_i x_i^T ``[n, dim, dim]`` (least squares)."""
    X = _randn(seed, n, dim)
    return (X[:, :, None] * X[:, None, :]).to(device)


def _setup(n, dim, seed, damping, device):
    """Return (Hs, A, scale, depth): scale = 1.1 max_i lambda_max(H_i + damping I)."""
    Hs = _per_example(n, dim, seed, device)
    A = Hs.mean(0)
    scale = 1.1 * (float(torch.linalg.eigvalsh(Hs).max()) + damping)
    mu_min = float(torch.linalg.eigvalsh(A).min()) + damping
    depth = math.ceil(math.log(1e-9) / math.log1p(-mu_min / scale))
    return Hs, A, scale, depth


def _solve(A, damping, V):
    return torch.linalg.solve(A + damping * torch.eye(A.shape[0], dtype=A.dtype,
                                                      device=A.device), V.T).T


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@given(n=st.integers(2, 12), dim=st.integers(1, 6), seed=seeds,
       damping=st.sampled_from([0.2, 0.5, 1.0]))
def test_lissa_full_batch_converges(device, n, dim, seed, damping):
    """Full batch, depth >= log(1e-9)/log(1 - mu_min/scale): LiSSA = solve to FULL_BATCH_RTOL."""
    Hs, A, scale, depth = _setup(n, dim, seed, damping, device)
    V = _randn(seed + 1, 3, dim, device=device)
    op = ihvp_lissa(sampled(lambda idx: Hs[idx].mean(0), torch.arange(n)), damping=damping,
                    scale=scale, depth=depth)
    assert _rel(op(V), _solve(A, damping, V)) < FULL_BATCH_RTOL


@settings(max_examples=5)
@given(seed=seeds)
def test_lissa_minibatch_within_named_bound(device, seed):
    """n = 16, batch_size = 8, repeats = 8: ||LiSSA - solve|| / ||solve|| < MINIBATCH_RTOL."""
    n, dim, damping = 16, 5, 0.5
    Hs, A, scale, depth = _setup(n, dim, seed, damping, device)
    V = _randn(seed + 1, 2, dim, device=device)
    op = ihvp_lissa(sampled(lambda idx: Hs[idx].mean(0), torch.arange(n), batch_size=8,
                            seed=seed), damping=damping, scale=scale, depth=depth, repeats=8)
    out = op(V)
    assert _rel(out, _solve(A, damping, V)) < MINIBATCH_RTOL
    assert torch.equal(out, op(V))  # the sampler replays: a fixed linear map


def test_lissa_with_hvp_on_a_model(device):
    """LiSSA over hvp(loss, params, batch) on (x, y) tuples = solve(dense Hessian + damping I)."""
    params, loss, batch = linear_regression(n=10, dim=3, seed=0, device=device)
    H = dense_hessian(params, loss, batch)
    damping = 0.5
    scale = 1.1 * (float(torch.linalg.eigvalsh(H).max()) + damping)
    depth = math.ceil(math.log(1e-9) / math.log1p(-(float(torch.linalg.eigvalsh(H).min())
                                                     + damping) / scale))
    V = _randn(1, 2, H.shape[0], device=device)
    op = ihvp_lissa(lambda b: hvp(loss, params, b), batch, damping=damping, scale=scale,
                    depth=depth)
    assert _rel(op(V), _solve(H, damping, V)) < FULL_BATCH_RTOL
    sampled = ihvp_lissa(lambda b: hvp(loss, params, b), batch, damping=damping, scale=3 * scale,
                         depth=60, batch_size=5, seed=3)
    assert torch.isfinite(sampled(V)).all()


@given(n=st.integers(2, 8), dim=st.integers(1, 5), seed=seeds,
       factor=st.sampled_from([0.1, 0.3, 0.45]))
def test_lissa_small_scale_raises(device, n, dim, seed, factor):
    """scale < lambda_max(A + damping I) / 2: |1 - mu/scale| > 1, the recursion diverges: raise."""
    Hs, A, _, _ = _setup(n, dim, seed, 0.1, device)
    scale = factor * (float(torch.linalg.eigvalsh(A).max()) + 0.1)
    op = ihvp_lissa(lambda idx: Hs[idx].mean(0), torch.arange(n), damping=0.1, scale=scale,
                    depth=400)
    with pytest.raises(ValueError, match=r"ihvp_lissa\(scale=...\).*Raise scale"):
        op(_randn(seed, 2, dim, device=device))


def test_lissa_indefinite_raises(device):
    """Undamped MLP Hessian (lambda_min < 0): 1 - lambda_min/scale > 1 grows: raise, no NaN."""
    params, loss, batch = mlp(n=8, device=device)
    H = dense_hessian(params, loss, batch)
    scale = 2.0 * float(torch.linalg.eigvalsh(H).abs().max())
    op = ihvp_lissa(H, scale=scale, depth=2000)
    with pytest.raises(ValueError, match="raise damping"):
        op(_randn(0, H.shape[0], device=device))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"damping": -1.0}, ValueError, r"ihvp_lissa\(damping=...\): expected a finite number >= 0"),
        ({"scale": 0.0}, ValueError, r"ihvp_lissa\(scale=...\): expected a finite number > 0"),
        ({"depth": 0}, ValueError, r"ihvp_lissa\(depth=...\): expected an int >= 1"),
        ({"repeats": 0}, ValueError, r"ihvp_lissa\(repeats=...\): expected an int >= 1"),
        ({"batch_size": 0}, ValueError, r"ihvp_lissa\(batch_size=...\): expected an int >= 1"),
        ({"batch_size": 5}, ValueError, r"ihvp_lissa\(batch_size=...\): expected batch_size <= n"),
        ({"depth": 2.5}, TypeError, r"ihvp_lissa\(depth=...\): expected an int"),
        ({"seed": -1}, ValueError, r"ihvp_lissa\(seed=...\): expected an int >= 0"),
    ],
)
def test_lissa_validates_settings(device, kwargs, error, match):
    """Bad settings raise at construction with the argument named."""
    A = torch.eye(3, dtype=DTYPE, device=device)
    settings_ = {"scale": 2.0, **kwargs}
    with pytest.raises(error, match=match):
        ihvp_lissa(lambda b: A, torch.zeros(4), **settings_)


def test_lissa_validates_inputs(device):
    """A non-callable batch_op (old form), a bare callable without data, a non-Batch data, and
    mini-batch settings next to a curvature value raise errors naming the argument."""
    A = torch.eye(3, dtype=DTYPE, device=device)
    with pytest.raises(TypeError, match=r"ihvp_lissa\(op=...\): expected a callable batch"):
        ihvp_lissa(A, torch.zeros(4), scale=2.0)
    with pytest.raises(TypeError, match=r"ihvp_lissa\(data=...\): expected a Tensor"):
        ihvp_lissa(lambda b: A, [1, 2], scale=2.0)
    with pytest.raises(TypeError, match=r"ihvp_lissa\(op=...\): expected a curvature .* got a "
                                        r"bare callable. Pass the data too"):
        ihvp_lissa(lambda b: A, scale=2.0)
    for arg in ("batch_size", "seed"):
        with pytest.raises(ValueError, match=rf"ihvp_lissa\({arg}=...\): expected None with a "
                                             r"curvature value, got 2. .*operators.sampled"):
            ihvp_lissa(A, scale=2.0, **{arg: 2})
    with pytest.raises(TypeError, match=r"ihvp_lissa\(op=...\): expected a LinOp"):
        ihvp_lissa("A", scale=2.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_op": "A"}, TypeError, r"sampled\(batch_op=...\): expected a callable batch"),
        ({"data": [1, 2]}, TypeError, r"sampled\(data=...\): expected a Tensor"),
        ({"batch_size": 0}, ValueError, r"sampled\(batch_size=...\): expected an int >= 1"),
        ({"batch_size": 5}, ValueError, r"sampled\(batch_size=...\): expected batch_size <= n"),
        ({"seed": -1}, ValueError, r"sampled\(seed=...\): expected an int >= 0"),
        ({"seed": 1.5}, TypeError, r"sampled\(seed=...\): expected an int"),
    ],
)
def test_sampled_validates_its_arguments(device, kwargs, error, match):
    """sampled(batch_op, data, batch_size=, seed=) names its own bad argument."""
    A = torch.eye(3, dtype=DTYPE, device=device)
    args = {"batch_op": lambda b: A, "data": torch.zeros(4), **kwargs}
    with pytest.raises(error, match=match):
        sampled(args.pop("batch_op"), args.pop("data"), **args)


_SIZES = st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.just(n), st.one_of(st.none(), st.integers(1, n)), st.integers(1, 5)))


@settings(max_examples=25)
@given(sizes=_SIZES, seed=seeds, repeats=st.integers(1, 3), depth=st.integers(1, 40),
       damping=st.sampled_from([0.0, 0.3]))
def test_sampled_value_equals_old_call_form_bit_for_bit(device, sizes, seed, repeats, depth,
                                                        damping):
    """ihvp_lissa(sampled(f, data, batch_size=b, seed=s)) == ihvp_lissa(f, data, batch_size=b,
    seed=s) == solvers.lissa()(sampled(...)), bit for bit (same draws, same recursion)."""
    n, batch_size, dim = sizes
    Hs, _, scale, _ = _setup(n, dim, seed, damping + 0.1, device)
    f = lambda idx: Hs[idx].mean(0)
    V = _randn(seed + 1, 3, dim, device=device)
    settings_ = {"damping": damping, "scale": scale, "depth": depth, "repeats": repeats}
    old = ihvp_lissa(f, torch.arange(n), batch_size=batch_size, seed=seed % 1000, **settings_)(V)
    op = sampled(f, torch.arange(n), batch_size=batch_size, seed=seed % 1000)
    assert torch.equal(ihvp_lissa(op, **settings_)(V), old)
    value = solvers.lissa(scale=scale, depth=depth, repeats=repeats)
    assert torch.equal(value(op, damping)(V), old)


@given(sizes=_SIZES, seed=seeds)
def test_sampled_product_is_the_dense_mean_of_batch_operators(device, sizes, seed):
    """sampled(f, data).dense() == mean_i H_i (f(idx) = mean of H_idx, idx all rows); each draw
    is f of the rows its seeded generator picks, replayed alike by every draws()."""
    n, batch_size, dim = sizes
    Hs = _per_example(n, dim, seed, device)
    op = sampled(lambda idx: Hs[idx].mean(0), torch.arange(n), batch_size=batch_size, seed=7)
    assert isinstance(op, SampledLinOp) and isinstance(op, LinOp)
    assert (op.dim, op.dtype, op.device.type) == (dim, DTYPE, device.type)
    assert op.full == (batch_size in (None, n))
    torch.testing.assert_close(op.dense(), Hs.mean(0), rtol=0, atol=1e-12 * float(Hs.abs().max()))
    gen = torch.Generator().manual_seed(7)
    first, second = op.draws(), op.draws()
    for _ in range(3):
        rows = torch.arange(n) if op.full else torch.randperm(n, generator=gen)[:batch_size]
        want = Hs[rows].mean(0)
        a, b = next(first), next(second)
        assert torch.equal(a.dense(), b.dense())
        torch.testing.assert_close(a.dense(), want, rtol=0, atol=1e-12 * float(Hs.abs().max()))


@given(n=st.integers(2, 8), dim=st.integers(1, 5), seed=seeds,
       damping=st.sampled_from([0.2, 1.0]))
def test_lissa_on_a_plain_curvature_is_the_full_batch_recursion(device, n, dim, seed, damping):
    """ihvp_lissa(A) (dense, LinOp) == ihvp_lissa(lambda _: A, data) bit for bit, and ->
    (A + damping I)^-1 V = linalg.solve to FULL_BATCH_RTOL."""
    Hs, A, scale, depth = _setup(n, dim, seed, damping, device)
    V = _randn(seed + 1, 2, dim, device=device)
    old = ihvp_lissa(lambda _: A, torch.zeros(1), damping=damping, scale=scale, depth=depth)(V)
    assert torch.equal(ihvp_lissa(A, damping=damping, scale=scale, depth=depth)(V), old)
    as_op = LinOp(lambda W: W @ A.T, dim, DTYPE, device)
    assert torch.equal(ihvp_lissa(as_op, damping=damping, scale=scale, depth=depth,
                                  repeats=4)(V), old)
    assert _rel(old, _solve(A, damping, V)) < FULL_BATCH_RTOL


@settings(max_examples=15)
@given(sizes=_SIZES, seed=seeds, c=st.sampled_from([0.5, 2.0]), shift=st.sampled_from([0.1, 1.0]))
def test_sampled_arithmetic_keeps_the_draws(device, sizes, seed, c, shift):
    """(c A + shift I + B)_j = c A_j + shift I + B draw by draw (same rows), its product is
    c mean_i H_i + shift I + B; ihvp_lissa(A + d) = ihvp_lissa(A, damping=d) to 1e-10."""
    n, batch_size, dim = sizes
    Hs, A, scale, _ = _setup(n, dim, seed, 1.0, device)
    B = _per_example(1, dim, seed + 2, device)[0]
    op = sampled(lambda idx: Hs[idx].mean(0), torch.arange(n), batch_size=batch_size, seed=3)
    eye = torch.eye(dim, dtype=DTYPE, device=device)
    tol = 1e-12 * (float(Hs.abs().max()) + float(B.abs().max()) + 1.0)
    for derived in (c * op + shift + B, B + (shift + op * c), (c * op - (-shift)) - (-B)):
        assert isinstance(derived, SampledLinOp)
        torch.testing.assert_close(derived.dense(), c * A + shift * eye + B, rtol=0, atol=tol)
        plain, shifted = op.draws(), derived.draws()
        for _ in range(2):
            a, b = next(plain), next(shifted)
            torch.testing.assert_close(b.dense(), c * a.dense() + shift * eye + B, rtol=0, atol=tol)
    V = _randn(seed + 1, 2, dim, device=device)
    want = ihvp_lissa(op, damping=shift, scale=scale, depth=30, repeats=2)(V)
    got = ihvp_lissa(op + shift, scale=scale, depth=30, repeats=2)(V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
