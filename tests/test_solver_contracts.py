"""Contracts every inverse solver keeps, checked through dattri_fn.testing: accuracy against
linalg.solve, dtype/device, row batching, vectors, seeds, never silent on indefinite or singular
operators (``check_inverse`` over the registry), and the clear errors of each factory."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn._types import LinOp
from dattri_fn.operators.datainf import empirical_fisher
from dattri_fn.operators.stochastic import sampled
from dattri_fn.solve import SOLVERS, cg_solve, ihvp_arnoldi, ihvp_cg, ihvp_explicit, ihvp_lissa
from dattri_fn.testing import check_inverse, check_linop, spd_matrix
from dattri_fn.testing import registry as kit_registry
from dattri_fn.testing.strategies import seeds

DIM = 6
# The factories callable as factory(op, damping=...): the library's SOLVERS and the kit's LiSSA.
REGISTRY = {**SOLVERS, "lissa": kit_registry.SOLVERS["lissa"].build()}
EXACT = ("explicit", "cg", "arnoldi")  # lissa is stochastic: truth tested in test_solve_lissa.py


def _matrix(dtype, device, seed=0):
    return spd_matrix(DIM, seed, cond=10.0).to(dtype=dtype, device=device)


def _V(k, dtype, device, seed=1):
    return torch.randn(k, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("name", sorted(kit_registry.SOLVERS))
@given(seed=seeds(), dim=st.integers(1, 7), damping=st.sampled_from([0.01, 0.1, 1.0]),
       cond=st.sampled_from([1.0, 10.0, 100.0]))
@settings(max_examples=4)
def test_solvers_keep_the_inverse_contract(device, name, seed, dim, damping, cond):
    """check_inverse: (A + damping I)^-1 V == linalg.solve (dense and LinOp, float64/float32),
    rows, vectors, determinism; accurate or loud on indefinite and singular operators."""
    entry = kit_registry.SOLVERS[name]
    drawn = {"seed": seed, "dim": dim, "damping": damping, "cond": cond, "device": device}
    check_inverse(entry.build(), name=name, **{**drawn, **entry.options})


def _stochastic_lissa(op, *, damping=0.0, seed=0):
    """LiSSA on mini-batches of 2 of 4 per-example curvatures A + E_i (sum_i E_i = 0)."""
    A = op if isinstance(op, torch.Tensor) else op.dense()
    gen = torch.Generator().manual_seed(123)
    E = 0.05 * torch.randn(4, *A.shape, generator=gen, dtype=torch.float64).to(A)
    E = E + E.transpose(1, 2)
    Hs = A + (E - E.mean(0))
    scale = 1.2 * (float(torch.linalg.eigvalsh(Hs).max()) + damping)
    return ihvp_lissa(sampled(lambda idx: Hs[idx].mean(0), torch.arange(4), batch_size=2,
                              seed=seed), damping=damping, scale=scale, depth=40, repeats=2)


def test_seed_changes_stochastic_solvers(device):
    """LiSSA and Arnoldi(rank < P) draw from their seed: another seed, another answer."""
    A = _matrix(torch.float64, device)
    V = _V(2, torch.float64, device)
    assert not torch.equal(_stochastic_lissa(A, seed=0)(V), _stochastic_lissa(A, seed=1)(V))
    a0 = ihvp_arnoldi(A, rank=2, max_iter=3, seed=0)(V)
    assert not torch.equal(a0, ihvp_arnoldi(A, rank=2, max_iter=3, seed=1)(V))


# -- errors: "<func>(<arg>=...): expected ..., got ..." -------------------------------------------

FACTORY_NAMES = {"explicit": "ihvp_explicit", "cg": "ihvp_cg", "arnoldi": "ihvp_arnoldi",
                 "lissa": "ihvp_lissa", "minres": "ihvp_minres"}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bad_right_hand_sides(device, name):
    """Wrong shape, non-finite values, wrong dtype or a non-tensor V: a clear error."""
    A = _matrix(torch.float64, device)
    op = REGISTRY[name](A, damping=0.1)
    func = FACTORY_NAMES[name]
    with pytest.raises(ValueError, match=rf"{func}\(V=...\): expected shape \[k, {DIM}\]"):
        op(torch.zeros(2, DIM + 1, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=rf"{func}\(V=...\): expected shape"):
        op(torch.zeros(2, 2, DIM, dtype=torch.float64, device=device))
    bad = _V(2, torch.float64, device)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{func}\(V=...\): expected finite values"):
        op(bad)
    with pytest.raises(TypeError, match=rf"{func}\(V=...\): expected dtype torch.float64"):
        op(_V(2, torch.float32, device))
    with pytest.raises(TypeError, match=rf"{func}\(V=...\): expected a Tensor"):
        op([[0.0] * DIM])


@pytest.mark.parametrize("name", EXACT)
def test_bad_operators_and_damping(device, name):
    """Negative damping, non-square, non-finite or non-tensor operators: a clear error."""
    factory, func = REGISTRY[name], FACTORY_NAMES[name]
    A = _matrix(torch.float64, device)
    with pytest.raises(ValueError, match=rf"{func}\(damping=...\): expected a finite number >= 0"):
        factory(A, damping=-0.1)
    with pytest.raises(ValueError, match=rf"{func}\(op=...\): expected a square \[P, P\] matrix"):
        factory(A[:, :-1], damping=0.1)
    with pytest.raises(ValueError, match=rf"{func}\(op=...\): expected a 2-d tensor"):
        factory(A[0], damping=0.1)
    nan = A.clone()
    nan[0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"{func}\(op=...\): expected finite values"):
        factory(nan, damping=0.1)
    with pytest.raises(TypeError, match=rf"{func}\(op=...\): expected a LinOp"):
        factory("A", damping=0.1)
    with pytest.raises(TypeError, match=rf"{func}\(op=...\): expected a floating-point"):
        factory(torch.eye(DIM, dtype=torch.int64, device=device), damping=0.1)


def test_bad_solver_settings(device):
    """rank > P, rank > max_iter, negative rtol, max_iter = 0: ValueError naming the argument."""
    A = _matrix(torch.float64, device)
    with pytest.raises(ValueError, match=rf"ihvp_arnoldi\(rank=...\): expected rank <= P = {DIM}"):
        ihvp_arnoldi(A, rank=DIM + 1)
    with pytest.raises(ValueError, match=r"ihvp_arnoldi\(max_iter=...\): expected max_iter >= rank"):
        ihvp_arnoldi(A, rank=3, max_iter=2)
    with pytest.raises(ValueError, match=r"ihvp_explicit\(rtol=...\): expected a finite number"):
        ihvp_explicit(A, rtol=-1.0)
    with pytest.raises(ValueError, match=r"ihvp_cg\(max_iter=...\): expected an int >= 1"):
        ihvp_cg(A, max_iter=0)
    with pytest.raises(ValueError, match=r"cg_solve\(atol=...\): expected a finite number >= 0"):
        cg_solve(A, _V(1, torch.float64, device), atol=-1.0)
    with pytest.raises(ValueError, match=r"cg_solve\(x0=...\): expected shape \[2, 6\]"):
        cg_solve(A, _V(2, torch.float64, device), x0=_V(3, torch.float64, device))
    with pytest.raises(ValueError, match=r"cg_solve\(B=...\): expected size 6 at dim 1"):
        cg_solve(A, torch.zeros(2, DIM + 1, dtype=torch.float64, device=device))


def test_nonfinite_linop_output_raises(device):
    """An operator that returns NaN is caught: explicit on its dense form, CG on its iterates."""
    P = DIM
    nan_op = LinOp(lambda V: V * float("nan"), P, torch.float64, device, name="nan")
    with pytest.raises(ValueError, match=r"ihvp_explicit\(op=...\): expected finite values"):
        ihvp_explicit(nan_op)
    with pytest.raises(ValueError, match=r"cg_solve\(op=...\): expected an operator returning"):
        cg_solve(nan_op, _V(1, torch.float64, device))
    with pytest.raises(ValueError, match=r"ihvp_arnoldi\(op=...\): expected an operator returning"):
        ihvp_arnoldi(nan_op, rank=2)


@given(k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_cg_reports_non_convergence(device, k, seed):
    """max_iter = 1 on an ill-conditioned A: converged is False, a warning says raise max_iter."""
    A = spd_matrix(DIM, seed, cond=1e3, device=device)
    B = _V(k, torch.float64, device, seed=seed)
    with pytest.warns(RuntimeWarning, match=r"did not reach rtol.*Raise max_iter"):
        res = cg_solve(A, B, max_iter=1)
    assert not res.converged.any() and not res.negative_curvature.any()
    assert (res.num_iters == 1).all() and res.residual_norm.shape == (k,)
    assert (res.residual_norm > 1e-6 * B.norm(dim=1)).all()
    with pytest.warns(RuntimeWarning, match="Raise max_iter"):
        ihvp_cg(A, max_iter=1)(B)


def test_cg_vector_input_gives_scalar_diagnostics(device):
    """cg_solve on a [P] vector returns x [P] and 0-d diagnostics."""
    A = _matrix(torch.float64, device)
    res = cg_solve(A, _V(1, torch.float64, device)[0], rtol=1e-12)
    assert res.x.shape == (DIM,)
    assert all(t.ndim == 0 for t in res[1:])
    assert bool(res.converged)


@pytest.mark.parametrize("name", EXACT)
def test_bare_callable_is_refused(device, name):
    """A bare function (no P, dtype, device) is refused with the LinOp wrapping spelled out."""
    with pytest.raises(TypeError, match=r"\(op=...\): expected a LinOp .* got a bare callable"):
        REGISTRY[name](lambda V: V, damping=0.1)


@given(seed=st.integers(0, 2**16), P=st.integers(1, 6), a=st.floats(-2, 2), c=st.floats(0, 3))
def test_linop_arithmetic_equals_dense(seed, P, a, c):
    """(a A + B - c).dense() == a A + B - c I; rows are independent; damping as a value:
    ihvp_cg(A + c) == ihvp_cg(A, damping=c)."""
    from dattri_fn._types import LinOp, as_linop
    from dattri_fn.solve import ihvp_cg

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=torch.float64)
    A = A @ A.T
    B = torch.randn(P, P, generator=g, dtype=torch.float64)
    eye = torch.eye(P, dtype=torch.float64)
    op = a * as_linop(A) + B - c
    torch.testing.assert_close(op.dense(), a * A + B - c * eye, rtol=1e-12, atol=1e-12)
    check_linop(op, reference=a * A + B - c * eye, symmetric=False, rtol=1e-12)
    check_linop(a * as_linop(A) + B @ B.T - c, rtol=1e-12)
    V = torch.randn(3, P, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op(V)[1:2], op(V[1:2]), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close((LinOp.identity(P, torch.float64) * 2 + A).dense(), A + 2 * eye)
    torch.testing.assert_close(ihvp_cg(as_linop(A) + (c + 0.1), rtol=1e-12)(V),
                               ihvp_cg(A, damping=c + 0.1, rtol=1e-12)(V), rtol=1e-8, atol=1e-10)


def test_linop_arithmetic_errors():
    from dattri_fn._types import as_linop

    A = as_linop(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"LinOp.__add__\(other=...\): expected an operator of "
                                         r"size 3 and dtype torch.float64, got size 2"):
        A + torch.eye(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"LinOp.__add__\(other=...\): expected a LinOp"):
        A + "I"
    with pytest.raises(TypeError):
        A * torch.ones(3)


def test_dense_requests_that_cannot_fit_are_refused_before_allocating(monkeypatch):
    """P = 100k in float32 asks 37 GiB: LinOp.dense, ihvp_explicit and linear_hessian refuse it
    naming P and the bytes, before any allocation (the available memory is faked small)."""
    import dattri_fn._checks as checks
    from dattri_fn._types import LinOp

    monkeypatch.setattr(checks, "available_bytes", lambda device: 2**30)
    big = LinOp(lambda V: V, 100_000, torch.float32, "cpu", name="big")
    with pytest.raises(MemoryError, match=r"big.dense: a dense \[P, P\] matrix with P = 100,000 "
                                          r"needs 37.3 GiB .* but 1.0 GiB are available"):
        big.dense()
    with pytest.raises(MemoryError, match=r"ihvp_explicit: a dense \[P, P\] matrix with "
                                          r"P = 100,000 needs 74.5 GiB \(2 x"):
        ihvp_explicit(big, damping=1.0)
    small = LinOp(lambda V: 2 * V, 3, torch.float64, "cpu", name="small")
    torch.testing.assert_close(small.dense(), 2 * torch.eye(3, dtype=torch.float64))


@given(seed=seeds(), n=st.integers(1, 6), dim=st.integers(1, 6), batch_size=st.integers(1, 6))
@settings(max_examples=8)
def test_curvature_values_keep_the_linop_contract(device, seed, n, dim, batch_size):
    """check_linop on sampled(f, data) (reference mean_i H_i) and empirical_fisher(G)
    (reference G^T G / n): shapes, dtype, rows, linearity, symmetry, determinism, dense."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dim, generator=g, dtype=torch.float64).to(device)
    Hs = X[:, :, None] * X[:, None, :]
    op = sampled(lambda idx: Hs[idx].mean(0), torch.arange(n), batch_size=min(batch_size, n),
                 seed=seed)
    check_linop(op, reference=Hs.mean(0), name="sampled")
    check_linop(empirical_fisher(X), reference=X.T @ X / n, name="empirical_fisher")
