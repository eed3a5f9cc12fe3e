"""Block CG's float32 Cholesky-QR: the smallest pivot it trusts from a float32 Gram grows with
sqrt(sqrt(P) eps), so the basis stays orthonormal at millions of parameters."""

import math

import pytest
import torch

from dattri_fn.solve import block_cg
from dattri_fn.solve.block_cg import FAST, _orth, fast_pivot

DT = torch.float64


def _tilted(P: int, m: int, pivot: float, seed: int = 0) -> torch.Tensor:
    """float32 [P, m]: column 0 and columns at sin = ``pivot`` from it (unit-column Cholesky
    pivots ``pivot``), norms spread over two decades."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(P, m, generator=g, dtype=DT)).Q
    W = Q.clone()
    W[:, 1:] = math.sqrt(1 - pivot * pivot) * Q[:, :1] + pivot * Q[:, 1:]
    return (W * torch.logspace(0, 2, m, dtype=DT)).float()


def test_fast_pivot_is_fast_up_to_ten_thousand_parameters_then_grows():
    """fast_pivot = max(FAST, sqrt(8 sqrt(P) eps)): FAST for float32 at P <= 10,900 (the 9.6k MLP
    keeps its path), 0.0406 at P = 3e6; bfloat16's Gram is never trusted (bar > 1)."""
    assert fast_pivot(9_610, torch.float32) == FAST
    assert fast_pivot(10_900, torch.float32) == FAST
    eps = torch.finfo(torch.float32).eps
    assert fast_pivot(3_000_000, torch.float32) == pytest.approx(math.sqrt(8 * 3e6 ** 0.5 * eps),
                                                                 rel=1e-12)
    assert 0.040 < fast_pivot(3_000_000, torch.float32) < 0.041
    assert fast_pivot(650, torch.bfloat16) > 1


@pytest.mark.parametrize("P", [9_610, 1_000_000])
def test_orth_basis_orthonormal_near_the_bar(P):
    """A pivot of 0.02 (between FAST and the bar at P = 1e6): |Q^T Q - I| <= 2e-3 (the float64
    Gram decides at P = 1e6; under the former fixed bar the float32 Gram gave 0.05-0.2 there)."""
    Q = _orth(_tilted(P, 4, 0.02)).double()
    err = float((Q.T @ Q - torch.eye(4, dtype=DT)).abs().max())
    assert err <= 2e-3, err


def test_former_fixed_bar_fails_at_a_million(monkeypatch):
    """The same block with the fixed bar FAST (the former rule): the float32 Gram is trusted and
    the basis is off orthonormal by more than 10x the tolerance above (why the bar scales)."""
    monkeypatch.setattr(block_cg, "fast_pivot", lambda P, dtype: FAST)
    Q = _orth(_tilted(1_000_000, 4, 0.02)).double()
    assert float((Q.T @ Q - torch.eye(4, dtype=DT)).abs().max()) > 2e-2
