"""Block CG's column-held blocks: the Cholesky-QR basis and float32 solves of near-dependent rows."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn.solve.block_cg import _orth, block_cg_solve

DT = torch.float64


@settings(max_examples=25, deadline=None)
@given(P=st.integers(4, 40), m=st.integers(1, 8), seed=st.integers(0, 2**16),
       log_scale=st.floats(-3, 3), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_orth_is_an_orthonormal_basis_of_the_columns(P, m, seed, log_scale, dtype):
    """For W [P, m] of independent columns at any scale: Q^T Q = I and Q Q^T W = W (the same
    span), to 1e-10 in float64 and 1e-4 in float32."""
    m = min(m, P)
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(P, m, generator=g, dtype=DT) * 10.0 ** log_scale).to(dtype)
    Q = _orth(W).double()
    tol = 1e-10 if dtype == DT else 1e-4
    assert Q.shape == (P, m)
    torch.testing.assert_close(Q.T @ Q, torch.eye(m, dtype=DT), rtol=0, atol=tol)
    W64 = W.double()
    torch.testing.assert_close(Q @ (Q.T @ W64), W64, rtol=0, atol=tol * float(W64.abs().max()))


def test_orth_drops_a_dependent_column():
    """A column equal to a sum of earlier ones (and a zero column) is dropped: rank-many
    orthonormal columns spanning W (float32 and float64)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 5, generator=g, dtype=DT)
    W[:, 3] = W[:, 0] + 2 * W[:, 1]
    W[:, 4] = 0.0
    for dtype, tol in ((DT, 1e-10), (torch.float32, 1e-4)):
        Q = _orth(W.to(dtype)).double()
        assert Q.shape == (30, 3)
        torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=DT), rtol=0, atol=tol)
        torch.testing.assert_close(Q @ (Q.T @ W), W, rtol=0, atol=tol * float(W.abs().max()))


@settings(max_examples=20, deadline=None)
@given(P=st.integers(8, 40), k=st.integers(2, 10), seed=st.integers(0, 2**16),
       log_spread=st.sampled_from([-1.0, -3.0, -5.0]))
def test_float32_near_dependent_rows_meet_the_tolerance(P, k, seed, log_spread):
    """Rows b + 10^s noise (s = -1, -3, -5: blocks whose Cholesky pivots fall below the float32
    Gram's threshold and are decided in float64): every row's TRUE residual
    ||(A + d I) x - b|| in float64 is within 10 rtol ||b||, and x matches linalg.solve to
    float32's accuracy."""
    g = torch.Generator().manual_seed(seed)
    Wa = torch.randn(P, 2 * P, generator=g, dtype=DT)
    A = Wa @ Wa.T / (2 * P)
    B = torch.randn(1, P, generator=g, dtype=DT) + 10.0 ** log_spread * torch.randn(
        k, P, generator=g, dtype=DT)
    damping, rtol = 0.1, 1e-5
    res = block_cg_solve(A.float(), B.float(), damping=damping, rtol=rtol)
    Ad = A + damping * torch.eye(P, dtype=DT)
    x = res.x.double()
    true = (x @ Ad - B).norm(dim=1)
    assert bool((true <= 10 * rtol * B.norm(dim=1)).all()), (true / B.norm(dim=1)).max()
    want = torch.linalg.solve(Ad, B.T).T
    torch.testing.assert_close(x, want, rtol=0, atol=1e-3 * float(want.abs().max()))
