"""Solvers as values (dattri_fn.solvers): configured once, applied to any operator."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn import functional_model, solvers
from dattri_fn._types import LinOp
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


def _fm_and_data():
    torch.manual_seed(0)
    fm = functional_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(),
                          F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    return fm, (x, torch.randint(0, 2, (12,), generator=g))


@pytest.mark.parametrize("value, name, options", [
    (solvers.lissa(scale=10.0, depth=50, batch_size=4, repeats=2, seed=3), "lissa",
     dict(scale=10.0, depth=50, batch_size=4, repeats=2, seed=3)),
    (solvers.kfac(fisher="true", seed=2), "kfac", dict(fisher="true", seed=2)),
    (solvers.ekfac(), "ekfac", {}),
    (solvers.datainf(), "datainf", {}),
])
def test_every_influence_solver_has_a_value(value, name, options):
    """influence(fm, solver=<value>) gives bit-identical scores to influence(fm, solver=name,
    **options): LiSSA's mini-batches, K-FAC/EK-FAC's factors and DataInf's gradients are drawn
    the same way."""
    fm, (x, y) = _fm_and_data()
    a = influence(fm, solver=value, damping=0.1)
    b = influence(fm, solver=name, damping=0.1, **options)
    Sa = a.score(fm.params, a.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    Sb = b.score(fm.params, b.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    torch.testing.assert_close(Sa, Sb, rtol=0, atol=0)


def test_lissa_value_on_an_operator_and_closed_forms_on_kfac_operator():
    """solvers.lissa on a dense SPD A is the full-batch Neumann series -> (A + dI)^-1 V;
    solvers.kfac/ekfac on kfac_operator(factors) equal ihvp_kfac/ihvp_ekfac(factors)."""
    from dattri_fn.operators import kfac_operator
    from dattri_fn.solve import ekfac_factors, ihvp_ekfac, ihvp_kfac, kfac_factors

    g = torch.Generator().manual_seed(1)
    R = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = R @ R.T / 5 + 0.5 * torch.eye(5, dtype=torch.float64)
    V = torch.randn(2, 5, generator=g, dtype=torch.float64)
    scale = float(torch.linalg.eigvalsh(A).max()) + 1.0
    got = solvers.lissa(scale=scale, depth=2000)(A, 0.2)(V)
    want = torch.linalg.solve(A + 0.2 * torch.eye(5, dtype=torch.float64), V.T).T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    fm, data = _fm_and_data()
    W = torch.randn(3, sum(p.numel() for p in fm.params.values()), generator=g, dtype=torch.float64)
    for value, factor_fn, inverse_fn in ((solvers.kfac(), kfac_factors, ihvp_kfac),
                                         (solvers.ekfac(), ekfac_factors, ihvp_ekfac)):
        factors = factor_fn(fm.module, fm.loss_fn, fm.params, data)
        torch.testing.assert_close(value(kfac_operator(factors), 0.3)(W),
                                   inverse_fn(factors, damping=0.3)(W), rtol=1e-12, atol=1e-14)


def test_values_that_need_the_model_say_so():
    """Closed forms refuse an operator without one, DataInf refuses an operator without
    gradients, LiSSA refuses mini-batch settings on an operator, and a K-FAC setting typo fails
    when the value is made."""
    A = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"datainf\(op=...\): expected operators.empirical_fisher"):
        solvers.datainf()(A, 0.1)
    with pytest.raises(ValueError, match=r"lissa\(batch_size=...\): expected None"):
        solvers.lissa(scale=2.0, batch_size=1)(A, 0.1)
    with pytest.raises(ValueError, match=r"lissa\(seed=...\): expected None .*operators.sampled"):
        solvers.lissa(scale=2.0, seed=1)(A, 0.1)
    with pytest.raises(ValueError, match=r"kfac\(op=...\): expected K-FAC/EK-FAC factors or an "
                                         r"operator with a closed-form inverse .*, got a dense 2 x 2"):
        solvers.kfac()(A, 0.1)
    with pytest.raises(ValueError, match=r"ekfac\(op=...\): .* got I \(no closed-form"):
        solvers.ekfac()(LinOp.identity(2, torch.float64), 0.1)
    with pytest.raises(TypeError, match=r"ekfac\(op=...\): expected a LinOp, a \[P, P\] Tensor, "
                                        r"K-FAC/EK-FAC factors"):
        solvers.ekfac()("A", 0.1)
    with pytest.raises(ValueError, match=r"ihvp_lissa\(scale=...\)"):
        solvers.lissa(scale=-1.0)
    with pytest.raises(TypeError, match=r"^ekfac\(damping_rule=\.\.\.\): expected some of \[.*\] "
                       r"\(the settings of ekfac_factors\), got unexpected settings "
                       r"\['damping_rule'\]\.$"):
        solvers.ekfac(damping_rule=1)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_factors_are_a_curvature_value(kind):
    """Factors F as the first argument: as_linop(F) = kfac_operator(F); ihvp_explicit(F) and
    solvers.<kind>()(F) = ihvp_<kind>(F) bit for bit; ihvp_cg(F) = the same inverse (1e-10);
    ihvp_lissa(F) = ihvp_lissa(kfac_operator(F)); ihvp_<kind>(kfac_operator(F)) = ihvp_<kind>(F);
    DataInf refuses factors by name."""
    from dattri_fn._types import as_linop
    from dattri_fn.operators import kfac_operator
    from dattri_fn.solve import (
        ekfac_factors,
        ihvp_cg,
        ihvp_datainf,
        ihvp_ekfac,
        ihvp_explicit,
        ihvp_kfac,
        ihvp_lissa,
        kfac_factors,
    )

    fm, data = _fm_and_data()
    fit, inverse = (kfac_factors, ihvp_kfac) if kind == "kfac" else (ekfac_factors, ihvp_ekfac)
    F = fit(fm.module, fm.loss_fn, fm.params, data)
    P = sum(p.numel() for p in fm.params.values())
    V = torch.randn(3, P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(as_linop(F)(V), kfac_operator(F)(V))
    want = inverse(F, damping=0.3)(V)
    assert torch.equal(ihvp_explicit(F, damping=0.3)(V), want)
    assert torch.equal(getattr(solvers, kind)()(F, 0.3)(V), want)
    torch.testing.assert_close(ihvp_cg(F, damping=0.3, rtol=1e-14, max_iter=4 * P)(V), want,
                               rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    lissa = dict(damping=0.3, scale=2.0 * float(torch.linalg.eigvalsh(kfac_operator(F).dense())
                                                .max()) + 1.0, depth=5)
    assert torch.equal(ihvp_lissa(F, **lissa)(V), ihvp_lissa(kfac_operator(F), **lissa)(V))
    assert torch.equal(inverse(kfac_operator(F), damping=0.3)(V), want)
    with pytest.raises(ValueError, match=rf"ihvp_{kind}\(damping=...\)"):
        inverse(kfac_operator(F), damping=-1.0)
    with pytest.raises(TypeError, match=rf"ihvp_datainf\(op=...\): expected .* got {type(F).__name__}"):
        ihvp_datainf(F)


def test_damping_none_is_zero_or_datainfs_rule():
    """Solver(op) without damping: 0 for the operator solvers, DataInf's lam_l rule for datainf."""
    from dattri_fn.operators.datainf import empirical_fisher, ihvp_datainf

    g = torch.Generator().manual_seed(3)
    G = torch.randn(4, 3, generator=g, dtype=torch.float64)
    A = G.T @ G + torch.eye(3, dtype=torch.float64)
    V = torch.randn(2, 3, generator=g, dtype=torch.float64)
    assert torch.equal(solvers.explicit()(A)(V), solvers.explicit()(A, 0.0)(V))
    op = empirical_fisher(G)
    assert torch.equal(solvers.datainf()(op)(V), ihvp_datainf(G)(V))
