"""Truth tests of the deterministic inverse solvers: explicit (eigh), CG and Arnoldi."""

import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dattri_fn._types import LinOp
from dattri_fn.solve import arnoldi, cg_solve, ihvp_arnoldi, ihvp_cg, ihvp_explicit
from problems import DTYPE, dense_hessian, mlp, spd_matrix

dims = st.integers(2, 10)
seeds = st.integers(0, 2**31 - 1)
dampings = st.sampled_from([0.0, 1e-3, 0.1, 1.0])
conds = st.sampled_from([1.0, 10.0, 1e3])
rows = st.integers(1, 4)


def _randn(seed, *shape, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).to(device)


def _system(dim, seed, cond, damping, k, device):
    """Return (A, M = A + damping*I, X_true, B = X_true M) for an SPD A of condition cond."""
    A = spd_matrix(dim, seed, cond=cond, device=device)
    M = A + damping * torch.eye(dim, dtype=DTYPE, device=device)
    X = _randn(seed + 1, k, dim, device=device)
    return A, M, X, X @ M


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _matmul_op(A):
    """The same matrix as an opaque LinOp, so solvers cannot shortcut the dense path."""
    return LinOp(lambda V: V @ A, A.shape[0], A.dtype, A.device, name="matmul")


def _positive_part_inverse(A, damping, rtol):
    """Dense reference of the drop rule: inverse of A + damping*I on directions with mu > tol."""
    lam, U = torch.linalg.eigh(A)
    mu = lam + damping
    keep = mu > rtol * mu.abs().max()
    return (U[:, keep] / mu[keep]) @ U[:, keep].T, int((~keep).sum())


@given(dim=dims, seed=seeds, cond=conds, damping=dampings, k=rows)
def test_explicit_solves_back(device, dim, seed, cond, damping, k):
    """ihvp_explicit(A, damping)((A + damping I) x) = x = torch.linalg.solve, to 1e-10."""
    A, M, X, B = _system(dim, seed, cond, damping, k, device)
    for op in (A, _matmul_op(A)):
        Y = ihvp_explicit(op, damping=damping)(B)
        assert _rel(Y, X) < 1e-10
        assert _rel(Y, torch.linalg.solve(M, B.T).T) < 1e-10


@given(dim=dims, seed=seeds, cond=conds, damping=dampings, k=rows)
def test_cg_solves_back(device, dim, seed, cond, damping, k):
    """cg_solve(A, (A + damping I) x, rtol=1e-12).x = x to ~cond * 1e-12, all rows converged."""
    A, M, X, B = _system(dim, seed, cond, damping, k, device)
    res = cg_solve(_matmul_op(A), B, damping=damping, rtol=1e-12)
    assert res.converged.all() and not res.negative_curvature.any()
    assert (res.residual_norm <= 1e-12 * B.norm(dim=1)).all()
    bound = 10 * cond * 1e-12
    assert _rel(res.x, X) < bound
    assert _rel(res.x, torch.linalg.solve(M, B.T).T) < bound
    assert _rel(ihvp_cg(A, damping=damping, rtol=1e-12)(B), X) < bound


@given(dim=dims, seed=seeds, damping=st.sampled_from([1e-3, 0.1, 1.0]))
def test_cg_rows_are_independent(device, dim, seed, damping):
    """A zero row needs 0 steps, a row x0-started at its solution needs 0, the others converge."""
    A, _, X, B = _system(dim, seed, 10.0, damping, 3, device)
    B = B.clone()
    B[1] = 0
    x0 = torch.zeros_like(B)
    x0[2] = X[2]
    res = cg_solve(A, B, damping=damping, rtol=1e-12, x0=x0)
    assert res.num_iters[1] == 0 and res.num_iters[2] == 0 and res.num_iters[0] >= 1
    assert res.converged.all()
    assert torch.equal(res.x[1], torch.zeros_like(res.x[1])) and torch.equal(res.x[2], X[2])
    assert _rel(res.x[0], X[0]) < 1e-9


@given(dim=dims, seed=seeds, cond=conds, damping=dampings, k=rows)
def test_arnoldi_full_rank_is_exact(device, dim, seed, cond, damping, k):
    """ihvp_arnoldi(rank = max_iter = P) = torch.linalg.solve; Ritz values = eigvalsh(A)."""
    A, M, X, B = _system(dim, seed, cond, damping, k, device)
    eig = arnoldi(_matmul_op(A), max_iter=dim, seed=seed)
    ref = torch.linalg.eigvalsh(A)
    assert _rel(torch.sort(eig.values).values, ref) < 1e-10
    assert _rel(eig.vectors.T @ eig.vectors, torch.eye(dim, dtype=DTYPE, device=device)) < 1e-12
    op = ihvp_arnoldi(A, rank=dim, max_iter=dim, damping=damping, seed=seed)
    assert bool(op.kept.all())
    assert _rel(op(B), torch.linalg.solve(M, B.T).T) < 1e-9 * cond
    assert _rel(op(B), X) < 1e-9 * cond


@given(dim=st.integers(3, 10), distinct=st.integers(1, 3), seed=seeds)
def test_arnoldi_handles_invariant_subspaces(device, dim, distinct, seed):
    """A with <= 3 distinct eigenvalues (Krylov space invariant early): all P eigvalsh recovered."""
    lam = torch.tensor([2.0, -1.0, 0.5], dtype=DTYPE)[torch.arange(dim) % distinct]
    Q, _ = torch.linalg.qr(_randn(seed, dim, dim))
    A = ((Q * lam) @ Q.T).to(device)
    eig = arnoldi(A, max_iter=dim, seed=seed)
    assert torch.isfinite(eig.vectors).all()
    assert _rel(torch.sort(eig.values).values, torch.sort(lam).values.to(device)) < 1e-10
    assert _rel(eig.vectors.T @ eig.vectors, torch.eye(dim, dtype=DTYPE, device=device)) < 1e-10


@given(dim=st.integers(4, 10), seed=seeds, damping=dampings, data=st.data())
def test_arnoldi_low_rank_is_projected_inverse(device, dim, seed, damping, data):
    """rank r < P: ihvp_arnoldi = sum over eigh's top-r |lam| pairs of u u^T / (lam + damping)."""
    rank = data.draw(st.integers(1, dim - 1), label="rank")
    A = spd_matrix(dim, seed, cond=100.0, device=device)
    lam, U = torch.linalg.eigh(A)
    top = torch.argsort(lam.abs(), descending=True)[:rank]
    ref = (U[:, top] / (lam[top] + damping)) @ U[:, top].T
    V = _randn(seed + 1, 3, dim, device=device)
    op = ihvp_arnoldi(A, rank=rank, max_iter=dim, damping=damping, seed=seed)
    assert _rel(op.eigen.values, lam[top]) < 1e-10
    assert _rel(op(V), V @ ref) < 1e-9


@given(dim=st.integers(12, 24), rank=st.integers(1, 3), seed=seeds)
def test_arnoldi_few_steps_find_gapped_top(device, dim, rank, seed):
    """Top-r eigenvalues 1e2..1e3 over a bulk in [0, 1]: max_iter = 2r + 6 < P gets them to 1e-8."""
    Q, _ = torch.linalg.qr(_randn(seed, dim, dim))
    gen = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.logspace(2, 3, rank, dtype=DTYPE),
                     torch.rand(dim - rank, generator=gen, dtype=DTYPE)])
    A = ((Q * lam) @ Q.T).to(device)
    Ut = Q[:, :rank].to(device)
    ref = (Ut / lam[:rank].to(device)) @ Ut.T
    op = ihvp_arnoldi(A, rank=rank, max_iter=2 * rank + 6, seed=seed)
    V = _randn(seed + 1, 2, dim, device=device)
    assert _rel(torch.sort(op.eigen.values).values, lam[:rank].to(device)) < 1e-8
    assert _rel(op(V), V @ ref) < 1e-6


# -- indefinite curvature: no NaN, a warning, the documented rule -------------------------------


def _shifted(dim, seed, shift, device):
    """SPD (eigenvalues 1..10) minus shift*I: indefinite for shift > 1."""
    return spd_matrix(dim, seed, cond=10.0, device=device) - shift * torch.eye(
        dim, dtype=DTYPE, device=device)


@given(dim=st.integers(3, 10), seed=seeds, shift=st.sampled_from([2.0, 5.0, 9.0]),
       damping=st.sampled_from([0.0, 0.5]))
def test_explicit_and_arnoldi_drop_rule_on_shifted_spd(device, dim, seed, shift, damping):
    """Indefinite A: both equal the inverse on {lam + damping > tol}, warn 'raise damping', no NaN."""
    A = _shifted(dim, seed, shift, device)
    lam = torch.linalg.eigvalsh(A)
    assume(bool(((lam + damping).abs() > 1e-6).all()))  # no eigenvalue on the threshold
    V = _randn(seed + 1, 3, dim, device=device)
    for make in (lambda: ihvp_explicit(A, damping=damping),
                 lambda: ihvp_arnoldi(A, rank=dim, max_iter=dim, damping=damping, seed=seed)):
        with pytest.warns(RuntimeWarning, match="Raise damping") as record:
            op = make()
        ref, dropped = _positive_part_inverse(A, damping, rtol=dim * torch.finfo(DTYPE).eps)
        assert dropped >= 1 and f"dropped {dropped} of {dim}" in str(record[0].message)
        assert int((~op.kept).sum()) == dropped
        Y = op(V)
        assert torch.isfinite(Y).all()
        assert _rel(Y, V @ ref) < 1e-9


@given(seed=st.integers(0, 50), damping=st.sampled_from([0.01, 0.05]))
def test_mlp_hessian_drop_rule(device, seed, damping):
    """MLP Hessian (indefinite): explicit and Arnoldi(P) both give the positive-part inverse."""
    params, loss, batch = mlp(n=8, seed=seed, device=device)
    H = dense_hessian(params, loss, batch)
    lam = torch.linalg.eigvalsh(H)
    assume(bool((lam + damping < -1e-8).any() and ((lam + damping).abs() > 1e-8).all()))
    P = H.shape[0]
    ref, dropped = _positive_part_inverse(H, damping, rtol=P * torch.finfo(DTYPE).eps)
    V = _randn(seed, 2, P, device=device)
    with pytest.warns(RuntimeWarning, match="Raise damping"):
        explicit = ihvp_explicit(H, damping=damping)
    with pytest.warns(RuntimeWarning, match="Raise damping"):
        krylov = ihvp_arnoldi(H, rank=P, max_iter=P, damping=damping, seed=seed)
    for op in (explicit, krylov):
        assert int((~op.kept).sum()) == dropped
        assert torch.isfinite(op(V)).all()
        assert _rel(op(V), V @ ref) < 1e-7


@given(dim=st.integers(3, 10), seed=seeds, shift=st.sampled_from([2.0, 5.0]), k=rows)
def test_cg_negative_curvature_rule(device, dim, seed, shift, k):
    """CG on indefinite A: each row converges or is flagged and stopped at its last iterate."""
    A = _shifted(dim, seed, shift, device)
    lam, U = torch.linalg.eigh(A)
    B = _randn(seed + 1, k, dim, device=device)
    B[0] = U[:, 0]  # an eigenvector with lam < 0: p^T A p < 0 at the very first step
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        res = cg_solve(A, B, rtol=1e-10)
    assert torch.isfinite(res.x).all()
    assert res.negative_curvature[0] and res.num_iters[0] == 0
    assert torch.equal(res.x[0], torch.zeros_like(res.x[0]))
    assert not (res.converged & res.negative_curvature).any()
    assert (res.converged | res.negative_curvature).all()
    for i in torch.nonzero(res.negative_curvature).flatten().tolist():
        steps = int(res.num_iters[i])
        if steps == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            replay = cg_solve(A, B[i], rtol=0.0, max_iter=steps).x
        torch.testing.assert_close(res.x[i], replay, rtol=1e-12, atol=1e-12)


def test_cg_flags_mlp_hessian(device):
    """CG on the undamped MLP Hessian flags negative curvature and returns finite rows."""
    params, loss, batch = mlp(device=device)
    H = dense_hessian(params, loss, batch)
    B = _randn(0, 4, H.shape[0], device=device)
    with pytest.warns(RuntimeWarning, match="Raise damping"):
        res = cg_solve(H, B)
    assert res.negative_curvature.any() and torch.isfinite(res.x).all()
    assert not res.converged[res.negative_curvature].any()


@given(seed=st.integers(0, 2**16), P=st.integers(2, 12), k=st.integers(1, 3),
       damping=st.floats(0.0, 1.0))
def test_preconditioned_cg_equals_solve(seed, P, k, damping):
    """PCG with any SPD M solves (A + damping I) X = B (== torch.linalg.solve); M = the exact
    inverse converges in one step."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(P, P, generator=g, dtype=torch.float64)
    A = R @ R.T / P + 0.1 * torch.eye(P, dtype=torch.float64)
    S = torch.randn(P, P, generator=g, dtype=torch.float64)
    M = S @ S.T / P + 0.5 * torch.eye(P, dtype=torch.float64)
    B = torch.randn(k, P, generator=g, dtype=torch.float64)
    Ad = A + damping * torch.eye(P, dtype=torch.float64)
    want = torch.linalg.solve(Ad, B.T).T
    res = cg_solve(A, B, damping=damping, rtol=1e-13, M=M, max_iter=10 * P)
    torch.testing.assert_close(res.x, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ihvp_cg(A, damping=damping, rtol=1e-13, M=M)(B), want,
                               rtol=1e-8, atol=1e-10)
    exact = cg_solve(A, B, damping=damping, rtol=1e-10, M=torch.linalg.inv(Ad))
    assert int(exact.num_iters.max()) == 1


def test_preconditioner_errors():
    """A preconditioner of the wrong kind or size is refused naming M."""
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"ihvp_cg\(M=...\): expected None, a LinOp"):
        ihvp_cg(A, M=lambda V: V)
    with pytest.raises(ValueError, match=r"cg_solve\(M=...\): expected a preconditioner of "
                                         r"size P = 3, got 4"):
        cg_solve(A, torch.ones(3, dtype=torch.float64), M=torch.eye(4, dtype=torch.float64))


@given(seed=st.integers(0, 2**16), P=st.integers(1, 10), k=st.integers(1, 3),
       damping=st.floats(0.0, 1.0))
def test_minres_solves_indefinite_systems(seed, P, k, damping):
    """MINRES: (A + damping I)^-1 B == torch.linalg.solve for symmetric INDEFINITE A whose damped
    eigenvalues are bounded away from zero (|lam| >= 0.2); CG could stop at negative curvature."""
    from dattri_fn.solve import ihvp_minres

    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.randn(P, generator=g, dtype=torch.float64) * 2
    lam = torch.where((lam + damping).abs() < 0.2, lam + 0.5, lam)
    assume(bool(((lam + damping).abs() >= 0.2).all()))
    A = Q @ torch.diag(lam) @ Q.T
    A = (A + A.T) / 2
    B = torch.randn(k, P, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(A + damping * torch.eye(P, dtype=torch.float64), B.T).T
    got = ihvp_minres(A, damping=damping, rtol=1e-13, max_iter=20 * P)(B)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


def test_minres_warns_when_not_converged_and_names_errors():
    """Too few iterations warn (no NaN); bad settings name ihvp_minres."""
    from dattri_fn.solve import ihvp_minres

    A = torch.diag(torch.linspace(-3, 3, 8, dtype=torch.float64)) + 0.05
    with pytest.warns(RuntimeWarning, match=r"ihvp_minres: 1 of 1 rows did not reach"):
        x = ihvp_minres(A, max_iter=2)(torch.ones(8, dtype=torch.float64))
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"ihvp_minres\(rtol=...\)"):
        ihvp_minres(A, rtol=-1.0)


def _indefinite(seed, P, damping):
    """Symmetric indefinite A with every |lam + damping| >= 0.2 (so A + damping I is invertible)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.randn(P, generator=g, dtype=torch.float64) * 2
    lam = torch.where((lam + damping).abs() < 0.2, lam + 0.5, lam)
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2, lam, g


@given(seed=st.integers(0, 2**16), P=st.integers(1, 8), k=st.integers(1, 3),
       damping=st.sampled_from([0.0, 0.1, 0.5]))
def test_literal_cg_and_arnoldi_equal_lu_on_indefinite(seed, P, k, damping):
    """negative_curvature='continue' (CG) and keep='all' (Arnoldi, rank P) ==
    ihvp_explicit(method='lu') == linalg.solve(A + damping I) on symmetric indefinite A."""
    A, lam, g = _indefinite(seed, P, damping)
    assume(bool(((lam + damping).abs() >= 0.2).all()))
    B = torch.randn(k, P, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(A + damping * torch.eye(P, dtype=torch.float64), B.T).T
    lu = ihvp_explicit(A, damping=damping, method="lu")(B)
    torch.testing.assert_close(lu, want, rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the literal options never warn about negative lam
        res = cg_solve(_matmul_op(A), B, damping=damping, rtol=1e-14, max_iter=50 * P,
                       negative_curvature="continue")
        arn = ihvp_arnoldi(_matmul_op(A), rank=P, max_iter=P, damping=damping, keep="all")(B)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.x, want, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(arn, want, rtol=1e-9, atol=1e-9)
    cg_op = ihvp_cg(A, damping=damping, rtol=1e-14, max_iter=50 * P, negative_curvature="continue")
    torch.testing.assert_close(cg_op(B), want, rtol=1e-8, atol=1e-8)


def test_literal_arnoldi_low_rank_keeps_negative_pairs():
    """keep='all', rank r: V -> sum over the r largest-|lam| pairs of (V.u) u / (lam + damping),
    the negative pair included; keep='positive' drops it with a warning."""
    lam = torch.tensor([-4.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64))
    A = Q @ torch.diag(lam) @ Q.T
    A = (A + A.T) / 2
    V = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    U = Q[:, :2]
    want = ((V @ U) / (lam[:2] + 0.1)) @ U.T
    got = ihvp_arnoldi(A, rank=2, max_iter=4, damping=0.1, keep="all")(V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.warns(RuntimeWarning, match=r"dropped 1 of 2 eigen-directions"):
        pos = ihvp_arnoldi(A, rank=2, max_iter=4, damping=0.1)(V)
    torch.testing.assert_close(pos, ((V @ U[:, 1:]) / (lam[1:2] + 0.1)) @ U[:, 1:].T,
                               rtol=1e-10, atol=1e-12)
    with pytest.warns(RuntimeWarning, match=r"numerically singular"):
        ihvp_arnoldi(A, rank=4, max_iter=4, damping=0.0, keep="all", rtol=0.2)
    with pytest.raises(ValueError, match=r"ihvp_arnoldi\(keep=...\): expected 'positive' or"):
        ihvp_arnoldi(A, rank=2, keep="none")
    with pytest.raises(ValueError, match=r"ihvp_cg\(negative_curvature=...\): expected 'stop'"):
        ihvp_cg(A, negative_curvature="skip")


def test_literal_options_through_influence_on_mlp_hessian():
    """influence on a tanh MLP's indefinite Hessian: CG 'continue' and Arnoldi 'all' (rank P)
    == explicit method='lu' == G (H + damping I)^-1 G_t^T; CG flags the negative curvature."""
    from dattri_fn.attribute import influence

    params, loss, train = mlp(n=8, seed=3)
    _, _, test = mlp(n=2, seed=4)
    H = dense_hessian(params, loss, train)
    lam = torch.linalg.eigvalsh(H)
    damping = 0.05
    assert float(lam.min()) + damping < -0.05  # the damped Hessian stays indefinite
    P = H.shape[0]
    ref_m = influence(loss, solver="explicit", damping=damping, method="lu")
    ref = ref_m.score(params, ref_m.prepare(params, train), train, test)
    for solver, opts in (("cg", dict(negative_curvature="continue", rtol=1e-13, max_iter=40 * P)),
                         ("arnoldi", dict(keep="all", rank=P, max_iter=P))):
        m = influence(loss, solver=solver, damping=damping, **opts)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            S = m.score(params, m.prepare(params, train), train, test)
        torch.testing.assert_close(S, ref, rtol=1e-6, atol=1e-8 * float(ref.abs().max()))
    res = cg_solve(H, torch.ones(1, P, dtype=DTYPE), damping=damping, rtol=1e-13,
                   max_iter=40 * P, negative_curvature="continue")
    assert bool(res.negative_curvature.all()) and bool(res.converged.all())


# -- randomized Nystrom preconditioner ---------------------------------------------------------
def _psd_of_rank(P, r, seed):
    """A = R R^T with R [P, r] Gaussian: positive semi-definite of rank r."""
    R = _randn(seed, P, r)
    return R @ R.T


@given(seed=st.integers(0, 2**16), P=st.integers(2, 12), damping=st.sampled_from([1e-3, 0.1, 1]))
def test_nystrom_at_full_rank_is_the_exact_damped_inverse(seed, P, damping):
    """rank >= P: the sketch is A itself, so M = (lambda_min(A) + damping) (A + damping I)^-1
    (1e-10)."""
    from dattri_fn.solve.nystrom import nystrom_preconditioner

    A = _psd_of_rank(P, P, seed)
    M = nystrom_preconditioner(_matmul_op(A), damping=damping, rank=P + 3, seed=seed).dense()
    lo = float(torch.linalg.eigvalsh(A)[0])
    want = (lo + damping) * torch.linalg.inv(A + damping * torch.eye(P, dtype=DTYPE))
    torch.testing.assert_close(M, want, rtol=0, atol=1e-10 * float(want.abs().max()))


@given(seed=st.integers(0, 2**16), P=st.integers(6, 20), r=st.integers(1, 5),
       damping=st.sampled_from([1e-3, 0.1]))
def test_nystrom_captures_a_low_rank_operator_and_pcg_takes_one_step(seed, P, r, damping):
    """A of rank r <= rank: the sketch is exact, M (A + damping I) = damping * I' with
    M = I + U diag((s_r + d) / (s + d) - 1) U^T symmetric positive definite; PCG then needs one
    step per row and equals torch.linalg.solve (1e-10)."""
    from dattri_fn.solve.nystrom import nystrom_preconditioner

    A = _psd_of_rank(P, r, seed)
    M = nystrom_preconditioner(A, damping=damping, rank=r + 1, seed=seed + 1)
    Md = M.dense()
    torch.testing.assert_close(Md, Md.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(Md).min()) > 0
    B = _randn(seed + 2, 3, P)
    res = cg_solve(A, B, damping=damping, rtol=1e-10, M=M, max_iter=50)
    want = torch.linalg.solve(A + damping * torch.eye(P, dtype=DTYPE), B.T).T
    torch.testing.assert_close(res.x, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    assert int(res.num_iters.max()) <= 2


def test_nystrom_preconditioner_cuts_iterations_and_keeps_the_solution():
    """A decaying spectrum (eigenvalues 2^-i): M='nystrom' (rank 200 >= P) solves in fewer CG
    steps than plain CG, to the same solution (1e-10), also as solvers.cg(M="nystrom"); a seeded
    sketch is reproducible."""
    from dattri_fn.solve.nystrom import nystrom_preconditioner

    P = 60
    Q = torch.linalg.qr(_randn(0, P, P)).Q
    A = (Q * 2.0 ** -torch.arange(P, dtype=DTYPE)) @ Q.T
    B = _randn(1, 4, P)
    plain = cg_solve(A, B, damping=1e-4, rtol=1e-12, max_iter=500)
    pre = cg_solve(A, B, damping=1e-4, rtol=1e-12, max_iter=500, M="nystrom")
    torch.testing.assert_close(pre.x, plain.x, rtol=0, atol=1e-10 * float(plain.x.abs().max()))
    assert int(pre.num_iters.max()) < int(plain.num_iters.min())
    from dattri_fn import solvers

    value = solvers.cg(rtol=1e-12, max_iter=500, M="nystrom")(A, 1e-4)(B)
    torch.testing.assert_close(value, pre.x, rtol=0, atol=1e-12 * float(pre.x.abs().max()))
    small = [nystrom_preconditioner(A, damping=1e-4, rank=8, seed=3).dense() for _ in range(2)]
    assert torch.equal(small[0], small[1])


def test_nystrom_errors():
    """M='nystrom' needs damping > 0; a bad rank or an indefinite operator is named."""
    from dattri_fn.solve.nystrom import nystrom_preconditioner

    A = torch.eye(3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"cg_solve\(M=...\): expected damping > 0 with "
                                         r"M='nystrom'"):
        cg_solve(A, torch.ones(3, dtype=DTYPE), M="nystrom")
    with pytest.raises(ValueError, match=r"ihvp_cg\(M=...\): expected None, 'nystrom'"):
        ihvp_cg(A, damping=0.1, M="nystrm")
    with pytest.raises(ValueError, match=r"nystrom_preconditioner\(rank=...\): expected an int "
                                         r">= 1"):
        nystrom_preconditioner(A, damping=0.1, rank=0)
    with pytest.raises(ValueError, match=r"nystrom_preconditioner\(op=...\): expected a positive "
                                         r"semi-definite operator"):
        nystrom_preconditioner(-A, damping=0.1)
