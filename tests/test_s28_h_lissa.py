"""RU4 M1, L3, L4 (engineer H's patch): full-batch LiSSA warns on a residual above 1e-3, a
mini-batch LiSSA says once that its truncation is unchecked; the nystrom damping refusal
names damping=; solvers.cg refuses a Solver as M when made."""

import warnings

import pytest
import torch

from dattri_fn import solvers
from dattri_fn.operators.stochastic import sampled
from dattri_fn.solve import ihvp_cg, ihvp_lissa

F64 = torch.float64
RESIDUAL = r"ihvp_lissa: (\d+) of (\d+) rows have relative residual .* above 0.001 after depth="


def _spd(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    return Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T


def test_truncated_full_batch_lissa_warns_and_a_converged_one_does_not():
    A = _spd(torch.logspace(-3, 0, 8).tolist())
    V = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.warns(RuntimeWarning, match=RESIDUAL + r"50 .*Raise depth \(now 50\)"):
        ihvp_lissa(A, scale=1.5, depth=50)(V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = ihvp_lissa(A, damping=0.5, scale=2.0, depth=400)(V)
    torch.testing.assert_close(X, torch.linalg.solve(A + 0.5 * torch.eye(8, dtype=F64), V.T).T,
                               rtol=1e-10, atol=1e-12)


def test_singular_psd_with_tiny_damping_warns():
    A = _spd([1.0] * 6 + [0.0] * 6)  # RU4: rank 6 of 12, damping 1e-6
    V = torch.randn(2, 12, generator=torch.Generator().manual_seed(2), dtype=F64)
    with pytest.warns(RuntimeWarning, match=RESIDUAL):
        ihvp_lissa(A, damping=1e-6, scale=2.0, depth=2000)(V)


def test_mini_batch_lissa_says_once_that_truncation_is_unchecked():
    A = _spd([1.0, 2.0, 3.0])
    op = sampled(lambda b: A, torch.zeros(8), batch_size=4)
    solve = ihvp_lissa(op, damping=0.1, scale=8.0, depth=20)
    V = torch.ones(2, 3, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"ihvp_lissa: on mini-batch curvature \(batch_size=4 "
                      r"of 8 rows\) the truncation at depth=20 is unchecked"):
        solve(V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(V)  # once per operator
        solvers.lissa(scale=8.0, batch_size=4)  # the construction probe says nothing


def test_nystrom_damping_inside_the_operator_names_damping_keyword():
    A = as_op = _spd([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"Pass the damping as damping=, not inside the operator"):
        ihvp_cg(as_op + 0.1 * torch.eye(3, dtype=F64), M="nystrom")
    with pytest.raises(ValueError, match=r"Pass the damping as damping="):
        solvers.cg(M="nystrom")(A)


def test_solvers_cg_refuses_a_solver_as_preconditioner_when_made():
    with pytest.raises(TypeError, match=r"cg\(M=...\): expected 'auto', None, 'nystrom', "
                       r"'kfac'/'ekfac' .* got Solver 'ekfac'.*inverse\(damping\)"):
        solvers.cg(M=solvers.ekfac())
    solvers.cg(M="ekfac"), solvers.cg(M=None), solvers.cg(M=torch.eye(3))
