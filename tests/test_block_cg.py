"""Block CG (solve/block_cg.py) against dense solves, its step count and its errors."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dattri_fn import functional_model
from dattri_fn._types import LinOp
from dattri_fn.operators import gauss_newton
from dattri_fn.solve.block_cg import block_cg_solve, ihvp_block_cg

DT = torch.float64


def _spd(P: int, seed: int, n: int | None = None) -> torch.Tensor:
    """A PSD ``W W^T / n`` (rank ``min(P, n)``)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(P, n or 2 * P, generator=g, dtype=DT)
    return W @ W.T / W.shape[1]


def _rhs(k: int, P: int, seed: int) -> torch.Tensor:
    return torch.randn(k, P, generator=torch.Generator().manual_seed(seed + 100), dtype=DT)


def _exact(A, B, damping):
    return torch.linalg.solve(A + damping * torch.eye(A.shape[0], dtype=A.dtype), B.T).T


@pytest.mark.parametrize("block_size", [1, 3, 8, 256])
def test_equals_dense_solve_with_duplicate_and_zero_rows(block_size):
    """X = (A + d I)^-1 B at 1e-10 for every group size, a repeated row and a zero row included
    (rank-deficient blocks: dependent directions are dropped, never a breakdown)."""
    A, B = _spd(40, 0), _rhs(11, 40, 0)
    B[3], B[7] = B[5], 0.0
    res = block_cg_solve(A, B, damping=0.1, rtol=1e-13, block_size=block_size)
    torch.testing.assert_close(res.x, _exact(A, B, 0.1), rtol=1e-10, atol=1e-11)
    assert bool(res.converged.all()) and not bool(res.negative_curvature.any())
    assert int(res.num_iters[7]) == 0 and torch.equal(res.x[7], torch.zeros(40, dtype=DT))


def test_float32_cholesky_qr_path_with_dependent_rows():
    """In float32 (Cholesky-QR blocks; Householder once rows repeat) the solution equals the
    float64 dense solve to float32's tolerance, a repeated row and a zero row included."""
    A, B = _spd(64, 8), _rhs(20, 64, 8)
    B[4], B[9] = B[2], 0.0
    want = _exact(A, B, 0.05)
    for part in (slice(None), slice(0, 3), slice(10, None)):
        got = block_cg_solve(A.float(), B[part].float(), damping=0.05, rtol=1e-6).x
        ref = want[part]
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_shared_space_converges_in_p_over_k_steps():
    """k independent rows in one block: the shared Krylov space has k j dimensions after j steps,
    so the solve is exact within ceil(P / k) steps (plain CG needs many more here)."""
    P, k = 48, 12
    A, B = _spd(P, 1), _rhs(k, P, 1)
    res = block_cg_solve(A, B, damping=1e-3, rtol=1e-10)
    torch.testing.assert_close(res.x, _exact(A, B, 1e-3), rtol=1e-8, atol=1e-9)
    assert int(res.num_iters.max()) <= math.ceil(P / k)
    plain = block_cg_solve(A, B, damping=1e-3, rtol=1e-10, block_size=1)
    assert int(plain.num_iters.min()) > 2 * math.ceil(P / k)


def test_preconditioned_and_vector_forms():
    """With M = a random SPD matrix or the exact inverse (one step), as ihvp_block_cg, and for one
    [P] vector: the same solution as the dense solve."""
    A, B = _spd(30, 2), _rhs(6, 30, 2)
    want = _exact(A, B, 0.05)
    M = _spd(30, 3) + 0.5 * torch.eye(30, dtype=DT)
    torch.testing.assert_close(block_cg_solve(A, B, damping=0.05, rtol=1e-13, M=M).x, want,
                               rtol=1e-10, atol=1e-11)
    inv = torch.linalg.inv(A + 0.05 * torch.eye(30, dtype=DT))
    one = block_cg_solve(A, B, damping=0.05, rtol=1e-10, M=inv)
    assert int(one.num_iters.max()) == 1
    torch.testing.assert_close(one.x, want, rtol=1e-10, atol=1e-11)
    op = ihvp_block_cg(LinOp(lambda V: V @ A, 30, DT, "cpu"), damping=0.05, rtol=1e-13,
                       block_size=4)
    torch.testing.assert_close(op(B), want, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(op(B[2]), want[2], rtol=1e-10, atol=1e-11)
    vec = block_cg_solve(A, B[2], damping=0.05, rtol=1e-13)
    assert vec.x.shape == (30,) and vec.num_iters.ndim == 0
    torch.testing.assert_close(vec.x, want[2], rtol=1e-10, atol=1e-11)


def test_nystrom_preconditioner_by_name():
    """M='nystrom' (rank min(200, P) sketch of A) still solves (A + d I) X = B exactly."""
    A, B = _spd(50, 4, n=20), _rhs(5, 50, 4)  # rank 20 < P: the sketch is exact
    res = block_cg_solve(A, B, damping=0.01, rtol=1e-12, M="nystrom")
    torch.testing.assert_close(res.x, _exact(A, B, 0.01), rtol=1e-9, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(P=st.integers(2, 30), k=st.integers(1, 12), block=st.integers(1, 12),
       seed=st.integers(0, 2**16), log_damping=st.floats(-3, 1))
def test_property_against_linalg_solve(P, k, block, seed, log_damping):
    """For drawn sizes, group sizes, seeds and damping: block CG == linalg.solve (float64)."""
    damping = 10.0 ** log_damping
    A, B = _spd(P, seed, n=max(1, P // 2)), _rhs(k, P, seed)
    res = block_cg_solve(A, B, damping=damping, rtol=1e-13, block_size=block)
    want = _exact(A, B, damping)
    torch.testing.assert_close(res.x, want, rtol=1e-8, atol=1e-9 * float(want.abs().max()))


def test_gauss_newton_of_an_mlp():
    """On the factored Gauss-Newton of a small float64 MLP: (G + d I)^-1 V equals the dense solve
    of G's own dense() at 1e-10 (relative to the largest entry)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(DT).eval()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 6, generator=g, dtype=DT), torch.randint(0, 4, (30,), generator=g)
    op = gauss_newton(fm)(fm.params, (x, y))
    V = torch.randn(9, op.dim, generator=g, dtype=DT)
    got = ihvp_block_cg(op, damping=1e-2, rtol=1e-13)(V)
    want = _exact(op.dense(), V, 1e-2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_errors_and_warning():
    """Settings are checked at construction and name the call (or the caller's func/arg); an
    indefinite A + d I and a NaN operator are refused; rows short of the tolerance warn."""
    A, B = _spd(10, 6), _rhs(3, 10, 6)
    with pytest.raises(ValueError, match=r"block_cg_solve\(block_size=...\): expected an int >= 1"):
        block_cg_solve(A, B, block_size=0)
    with pytest.raises(TypeError, match=r"ihvp_block_cg\(M=...\): expected None, a LinOp"):
        ihvp_block_cg(A, M=[1.0])
    with pytest.raises(ValueError, match=r"ihvp_block_cg\(M=...\): expected a preconditioner of "
                                         r"size P = 10, got 3"):
        ihvp_block_cg(A, M=torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match=r"block_cg_solve\(M=...\): expected damping > 0 with "
                                         r"M='nystrom'"):
        block_cg_solve(A, B, M="nystrom")
    with pytest.raises(ValueError, match=r"block_cg_solve\(op=...\): expected a positive-definite"):
        block_cg_solve(-A, B, damping=0.01)
    with pytest.raises(ValueError, match=r"block_cg_solve\(B=...\)|block_cg_solve\(V=...\)"):
        block_cg_solve(A, B[:, :5])
    nan_op = LinOp(lambda V: V * float("nan"), 10, DT, "cpu")
    with pytest.raises(ValueError, match=r"^if_cg\(curvature=...\): expected a positive-definite"):
        ihvp_block_cg(-A, damping=0.01, func="if_cg", arg="curvature")(B)  # a caller's names
    with pytest.raises(ValueError, match=r"^if_cg\(curvature=...\): expected an operator returning "
                                         r"finite values"):
        ihvp_block_cg(nan_op, func="if_cg", arg="curvature")(B)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = block_cg_solve(_spd(40, 7), _rhs(2, 40, 7), damping=1e-6, rtol=1e-14, max_iter=2)
    assert not bool(res.converged.all())
    assert any("block_cg_solve: 2 of 2 rows did not reach rtol=1e-14" in str(w.message)
               for w in seen)
