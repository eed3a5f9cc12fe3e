"""ihvp_explicit's Cholesky fast path: method="cholesky", and "auto" choosing it only when the
drop rule of the eigh path would drop nothing."""

import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dattri_fn._types import LinOp
from dattri_fn.solve.explicit import CholeskyInverse, EigenInverse, LUInverse, ihvp_explicit
from problems import DTYPE, spd_matrix

dims = st.integers(2, 12)
seeds = st.integers(0, 2**31 - 1)
dampings = st.sampled_from([0.0, 1e-3, 0.1, 1.0])
conds = st.sampled_from([1.0, 10.0, 1e3])
rows = st.integers(1, 4)
EPS = torch.finfo(DTYPE).eps


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _randn(seed, *shape, device="cpu"):
    return torch.randn(*shape, generator=_gen(seed), dtype=DTYPE).to(device)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _eye(dim, device, dtype=DTYPE):
    return torch.eye(dim, dtype=dtype, device=device)


def _matmul_op(A):
    """The matrix as an opaque LinOp (rows times A), so the factory must densify it."""
    return LinOp(lambda V: V @ A, A.shape[0], A.dtype, A.device, name="matmul")


def _with_spectrum(mu, seed, device):
    """Q diag(mu) Q^T for a random orthogonal Q drawn from seed."""
    Q, _ = torch.linalg.qr(torch.randn(mu.numel(), mu.numel(), generator=_gen(seed), dtype=DTYPE))
    return ((Q * mu) @ Q.T).to(device)


def _no_warning(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make()


@given(dim=dims, seed=seeds, cond=conds, damping=dampings, k=rows, skew=st.booleans())
def test_spd_takes_cholesky_and_solves(device, dim, seed, cond, damping, k, skew):
    """SPD A (+ skew): auto = cholesky = solve((A+A^T)/2 + damping I) to 1e-10, = eigh to 1e-9."""
    A = spd_matrix(dim, seed, cond=cond, device=device)
    K = _randn(seed + 2, dim, dim, device=device) if skew else torch.zeros_like(A)
    A_in = A + (K - K.T)  # the factory must symmetrise: (A_in + A_in^T) / 2 = A
    M = A + damping * _eye(dim, device)
    B = _randn(seed + 1, k, dim, device=device)
    X = torch.linalg.solve(M, B.T).T
    ref_eigh = ihvp_explicit(A_in, damping=damping, method="eigh")(B)
    for op_in in (A_in, _matmul_op(A_in.T)):
        for method, rtol in (("auto", None), ("auto", 0.0), ("cholesky", None)):
            op = _no_warning(lambda: ihvp_explicit(op_in, damping=damping, rtol=rtol,
                                                   method=method))
            assert isinstance(op, CholeskyInverse) and op.damping == damping
            L = op.factor
            assert L.shape == (dim, dim) and torch.equal(L, L.tril())
            assert _rel(L @ L.T, M) < 1e-12
            Y = op(B)
            assert Y.shape == (k, dim)
            assert _rel(Y, X) < 1e-10
            assert _rel(Y, ref_eigh) < 1e-9
            y0 = op(B[0])
            assert y0.shape == (dim,)
            torch.testing.assert_close(y0, Y[0], rtol=1e-12, atol=0.0)


@given(dim=st.integers(3, 10), seed=seeds, shift=st.sampled_from([2.0, 5.0, 9.0]),
       frac=st.sampled_from([0.0, 0.5, 0.9]))
def test_indefinite_falls_back_to_eigh(device, dim, seed, shift, frac):
    """lam_min(A) + damping = (1 - shift)(1 - frac) < 0: auto = eigh (warns, drops), cholesky
    raises; damping = shift makes every lam + damping >= 1 and auto takes Cholesky."""
    A = spd_matrix(dim, seed, cond=10.0, device=device) - shift * _eye(dim, device)
    damping = frac * (shift - 1.0)
    lam = torch.linalg.eigvalsh(A)
    assume(bool(((lam + damping).abs() > 1e-6).all()))  # no eigenvalue on the threshold
    V = _randn(seed + 1, 3, dim, device=device)
    with pytest.warns(RuntimeWarning, match="Raise damping"):
        auto = ihvp_explicit(A, damping=damping)
    with pytest.warns(RuntimeWarning, match="Raise damping"):
        eigh = ihvp_explicit(A, damping=damping, method="eigh")
    assert isinstance(auto, EigenInverse)
    assert torch.equal(auto.kept, eigh.kept) and not bool(auto.kept.all())
    assert torch.equal(auto(V), eigh(V)) and torch.isfinite(auto(V)).all()
    with pytest.raises(ValueError, match=r"ihvp_explicit\(op=..., damping=...\): expected "
                       r"A \+ damping\*I positive definite.*Raise damping or use method='eigh'"):
        ihvp_explicit(A, damping=damping, method="cholesky")
    fixed = _no_warning(lambda: ihvp_explicit(A, damping=shift))
    assert isinstance(fixed, CholeskyInverse)
    assert _rel(fixed(V), torch.linalg.solve(A + shift * _eye(dim, device), V.T).T) < 1e-10


def test_zero_operator_drops_everything(device):
    """A = 0, damping = 0: auto falls back and returns 0 (all dropped, a warning), never NaN."""
    A = torch.zeros(4, 4, dtype=DTYPE, device=device)
    with pytest.warns(RuntimeWarning, match="dropped 4 of 4"):
        op = ihvp_explicit(A)
    assert isinstance(op, EigenInverse)
    assert torch.equal(op(torch.ones(4, dtype=DTYPE, device=device)),
                       torch.zeros(4, dtype=DTYPE, device=device))
    with pytest.raises(ValueError, match=r"expected A \+ damping\*I positive definite"):
        ihvp_explicit(A, method="cholesky")


@given(dim=st.integers(3, 10), seed=seeds, damping=st.sampled_from([0.0, 0.1]),
       rtol=st.sampled_from([1e-6, 1e-4, 1e-2]),
       ratio=st.sampled_from([0.5, 0.9, 0.99, 1.01, 1.1, 2.0, 10.0]))
def test_drop_rule_boundary(device, dim, seed, damping, rtol, ratio):
    """mu = lam + damping in [0.1, 1] plus mu_s = ratio * rtol * max mu: ratio < 1 -> auto is the
    eigh pseudo-inverse (one drop, not Cholesky's full inverse); ratio > 1 -> auto = eigh to
    100 eps cond(M); mu_s > rtol ||M||_F -> auto is a CholeskyInverse."""
    mu = torch.cat([torch.ones(1, dtype=DTYPE),
                    0.1 + 0.9 * torch.rand(dim - 2, generator=_gen(seed + 3), dtype=DTYPE),
                    torch.tensor([ratio * rtol], dtype=DTYPE)])
    A = _with_spectrum(mu - damping, seed, device)
    V = _randn(seed + 1, 3, dim, device=device)
    if ratio < 1:
        with pytest.warns(RuntimeWarning, match="dropped 1 of"):
            eigh = ihvp_explicit(A, damping=damping, rtol=rtol, method="eigh")
        with pytest.warns(RuntimeWarning, match="dropped 1 of"):
            auto = ihvp_explicit(A, damping=damping, rtol=rtol)
        assert isinstance(auto, EigenInverse) and int((~auto.kept).sum()) == 1
        assert torch.equal(auto(V), eigh(V))
        full = ihvp_explicit(A, damping=damping, rtol=rtol, method="cholesky")(V)
        assert _rel(auto(V), full) > 0.1  # Cholesky would invert the dropped direction
        return
    eigh = _no_warning(lambda: ihvp_explicit(A, damping=damping, rtol=rtol, method="eigh"))
    auto = _no_warning(lambda: ihvp_explicit(A, damping=damping, rtol=rtol))
    assert bool(eigh.kept.all())
    assert _rel(auto(V), eigh(V)) < 100 * EPS / (ratio * rtol)
    M = A + damping * _eye(dim, device)
    if ratio * rtol > rtol * float(torch.linalg.matrix_norm(M)):
        assert isinstance(auto, CholeskyInverse)


def test_bad_method(device):
    """An unknown method is a ValueError, a non-str one a TypeError, both naming method=."""
    A = spd_matrix(4, 0, device=device)
    with pytest.raises(ValueError, match=r"ihvp_explicit\(method=...\): expected one of 'auto', "
                       r"'eigh', 'cholesky', 'lu', got 'qr'"):
        ihvp_explicit(A, method="qr")
    with pytest.raises(TypeError,
                       match=r"ihvp_explicit\(method=...\): expected a str, got NoneType"):
        ihvp_explicit(A, method=None)


@pytest.mark.parametrize("method", ["auto", "eigh", "cholesky", "lu"])
def test_float32_in_float32_out(device, method):
    """float32 SPD A: op, factor and output are float32 on A's device, = float64 solve to 1e-4."""
    A64 = spd_matrix(6, 0, cond=10.0, device=device)
    V64 = _randn(1, 3, 6, device=device)
    A, V = A64.float(), V64.float()
    op = _no_warning(lambda: ihvp_explicit(A, damping=0.1, method=method))
    kind = {"eigh": EigenInverse, "lu": LUInverse}.get(method, CholeskyInverse)
    assert isinstance(op, kind)
    assert (op.dtype, op.device) == (torch.float32, A.device)
    if method != "eigh":
        factor = op.factor[0] if method == "lu" else op.factor
        assert factor.dtype == torch.float32 and factor.device == A.device
    out = op(V)
    assert out.dtype == torch.float32 and out.device == V.device
    ref = torch.linalg.solve(A64 + 0.1 * _eye(6, device), V64.T).T
    assert _rel(out.double(), ref) < 1e-4
    with pytest.raises(TypeError, match=r"ihvp_explicit\(V=...\): expected dtype torch.float32"):
        op(V64)


def test_auto_accepts_a_matrix_that_requires_grad(device):
    """A dense operator with requires_grad (e.g. a torch.func.hessian) works and stays
    differentiable: d/dA of sum((A + dI)^-1 v) matches the eigh path."""
    A0 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64, device=device)
    v = torch.tensor([1.0, -2.0], dtype=torch.float64, device=device)
    grads = []
    for method in ("auto", "eigh"):
        A = A0.clone().requires_grad_(True)
        ihvp_explicit(A, damping=0.1, method=method)(v).sum().backward()
        grads.append(A.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


@given(dim=dims, seed=seeds, k=rows, neg=st.integers(0, 3), grad=st.booleans())
def test_lu_is_the_literal_inverse_even_when_indefinite(device, dim, seed, k, neg, grad):
    """method='lu' == solve((A+A^T)/2 + damping I) to 1e-10 with `neg` negative damped
    eigenvalues (nothing dropped, no warning); differentiable when A requires grad."""
    neg = min(neg, dim - 1)
    mu = torch.linspace(0.5, 3.0, dim, dtype=DTYPE)
    mu[:neg] = -mu[:neg]
    damping = 0.25
    A = _with_spectrum(mu - damping, seed, device)
    V = _randn(seed + 1, k, dim, device=device)
    M = A + damping * _eye(dim, device)
    op = A.clone().requires_grad_(True) if grad else _matmul_op(A)
    inv = _no_warning(lambda: ihvp_explicit(op, damping=damping, method="lu"))
    assert isinstance(inv, LUInverse) and inv.damping == damping
    x = inv(V)
    assert _rel(x.detach(), torch.linalg.solve(M, V.T).T) < 1e-10
    if grad:
        (x * V).sum().backward()  # d/dA of <V, V M^-1> = -M^-1 V^T V M^-1 (symmetrised)
        W = torch.linalg.solve(M, V.T)
        assert _rel(op.grad, -(W @ W.T)) < 1e-9


def test_lu_refuses_a_singular_matrix(device):
    """method='lu' on a (numerically) singular A + damping I raises, naming damping: zeros,
    and a rank-1 v v^T whose pivots fall under P * eps * max pivot."""
    v = _randn(0, 5, 1, device=device)
    for A in (torch.zeros(3, 3, dtype=DTYPE, device=device), v @ v.T):
        with pytest.raises(ValueError, match=r"ihvp_explicit\(op=..., damping=...\): expected "
                                             r"A \+ damping\*I non-singular"):
            ihvp_explicit(A, damping=0.0, method="lu")
