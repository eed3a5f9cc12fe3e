"""Solvers as values (dattri_fn.solvers): configured once, applied to any operator."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn import functional_model, solvers
from dattri_fn.attribute import influence


@given(seed=st.integers(0, 2**16), P=st.integers(1, 8), damping=st.floats(0.05, 2.0))
def test_solver_values_solve_the_damped_system(seed, P, damping):
    """cg, explicit and full-rank arnoldi values give (A + damping I)^-1 V == linalg.solve."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(P, P, generator=g, dtype=torch.float64)
    A = R @ R.T / P
    V = torch.randn(3, P, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(A + damping * torch.eye(P, dtype=torch.float64), V.T).T
    for s in (solvers.cg(rtol=1e-13, max_iter=10 * P), solvers.explicit(),
              solvers.arnoldi(rank=P, max_iter=P)):
        torch.testing.assert_close(s(A, damping)(V), want, rtol=1e-8, atol=1e-10, msg=s.name)


def test_bad_settings_fail_at_construction():
    """A typo fails when the value is made, naming the setting."""
    with pytest.raises(ValueError, match=r"ihvp_cg\(rtol=...\)"):
        solvers.cg(rtol=-1.0)
    with pytest.raises(ValueError, match=r"ihvp_explicit\(method=...\)"):
        solvers.explicit(method="qr")
    with pytest.raises(ValueError, match=r"arnoldi\(rank=...\)"):
        solvers.arnoldi(rank=0)
    with pytest.raises(ValueError, match=r"cg\(M=...\): expected a LinOp"):
        solvers.cg(M="ekfac")(torch.eye(2))


def test_influence_takes_a_solver_value():
    """influence(fm, solver=solvers.cg(...)) == influence(fm, solver='cg', ...); a setting given
    twice is refused."""
    torch.manual_seed(0)
    fm = functional_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(),
                          F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)
    a = influence(fm, solver=solvers.cg(max_iter=40, rtol=1e-10, M="ekfac"), damping=0.1)
    b = influence(fm, solver="cg", max_iter=40, rtol=1e-10, M="ekfac", damping=0.1)
    Sa = a.score(fm.params, a.prepare(fm.params, (x, y)), (x, y), (x[:2], y[:2]))
    Sb = b.score(fm.params, b.prepare(fm.params, (x, y)), (x, y), (x[:2], y[:2]))
    torch.testing.assert_close(Sa, Sb, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"influence\(solver=...\): settings \['max_iter'\] given both"):
        influence(fm, solver=solvers.cg(max_iter=5), max_iter=6)


def test_literal_inverse_settings_are_solver_values_too():
    """solvers.cg(negative_curvature="continue") and solvers.arnoldi(keep="all") equal their
    ihvp_* forms: the literal (A + dI)^-1 of an indefinite symmetric A (linalg.solve)."""
    from dattri_fn.solve import ihvp_arnoldi, ihvp_cg

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.tensor([3.0, 2.0, 1.5, -0.5, -1.0, -2.5], dtype=torch.float64)) @ Q.T
    V = torch.randn(3, 6, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(A + 0.1 * torch.eye(6, dtype=torch.float64), V.T).T
    cg_value = solvers.cg(negative_curvature="continue", rtol=1e-12, max_iter=60)(A, 0.1)(V)
    torch.testing.assert_close(cg_value, ihvp_cg(A, damping=0.1, negative_curvature="continue",
                                                 rtol=1e-12, max_iter=60)(V))
    torch.testing.assert_close(cg_value, exact, rtol=1e-8, atol=1e-8)
    ar = solvers.arnoldi(rank=6, keep="all")(A, 0.1)(V)
    torch.testing.assert_close(ar, ihvp_arnoldi(A, rank=6, damping=0.1, keep="all")(V))
    torch.testing.assert_close(ar, exact, rtol=1e-8, atol=1e-8)
