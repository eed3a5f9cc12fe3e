"""dattri_fn.testing: the kit's references are right, and each check catches a planted bug."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn import LinOp, per_sample_grad, ravel_batched
from dattri_fn.attribute import Method, TopK, grad_dot, influence
from dattri_fn.testing import (
    check_inverse,
    check_linop,
    check_method,
    check_projector,
    dense_curvature,
    exact_influence,
    exact_loo,
    linear_regression,
    logistic_regression,
    loo_params,
    mlp,
    per_example_grads,
    ridge_regression,
    sequence_model,
)
from dattri_fn.testing.matrices import MATRICES
from dattri_fn.testing.problems import BUILDERS
from dattri_fn.testing.strategies import dampings, linops, operators, problems
from dattri_fn.tree import ravel

F64 = torch.float64


def _design(problem):
    x, y = problem.data
    return torch.cat([x, torch.ones_like(x[:, :1])], 1), y


# -- the references ------------------------------------------------------------------------------
@given(problem=problems())
@settings(max_examples=5)
def test_references_agree_with_the_library_and_each_other(problem):
    """per_example_grads (autograd loop) == per_sample_grad (vmap); H, G, F symmetric; F = G^T G/n."""
    G = per_example_grads(problem.loss, problem.params, problem.data)
    lib = ravel_batched(per_sample_grad(problem.loss, problem.params, problem.data, flat=False))
    torch.testing.assert_close(lib, G, rtol=1e-10, atol=1e-12)
    for kind in ("hessian", "gauss_newton", "fisher"):
        C = dense_curvature(problem, kind)
        torch.testing.assert_close(C, C.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense_curvature(problem, "fisher"), G.T @ G / problem.n,
                               rtol=1e-12, atol=1e-14)


@given(problem=problems(kinds=("linear", "ridge", "logistic")))
@settings(max_examples=10)
def test_gauss_newton_is_the_hessian_of_a_glm(problem):
    """GLMs (squared error, softmax cross-entropy on a linear output): G == H to 1e-10 (relative)."""
    H = dense_curvature(problem, "hessian")
    torch.testing.assert_close(dense_curvature(problem, "gauss_newton"), H, rtol=1e-10,
                               atol=1e-12 * float(H.abs().max()))


def test_nonconvex_problems_have_indefinite_hessians_and_psd_gauss_newton():
    """mlp / conv / sequence (seed 0): lambda_min(H) < 0 <= lambda_min(G) (to round-off)."""
    for name in ("mlp", "conv", "sequence"):
        p = BUILDERS[name]()
        assert float(torch.linalg.eigvalsh(dense_curvature(p, "hessian"))[0]) < -1e-3, name
        assert float(torch.linalg.eigvalsh(dense_curvature(p, "gauss_newton"))[0]) > -1e-12, name


def test_ridge_references_match_the_closed_form():
    """Ridge: H = Z^T Z / n + 2 l2 I, g_i = z_i r_i + 2 l2 theta, IF = G (H + d I)^-1 G^T (1e-10)."""
    p = ridge_regression(n=14, dim=3, seed=4, l2=0.2)
    Z, y = _design(p)
    theta, _ = ravel(p.params)
    H = Z.T @ Z / p.n + 2 * p.l2 * torch.eye(4, dtype=F64)
    G = Z * (Z @ theta - y)[:, None] + 2 * p.l2 * theta
    torch.testing.assert_close(dense_curvature(p, "hessian"), H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact_influence(p, damping=0.3),
                               G @ torch.linalg.solve(H + 0.3 * torch.eye(4, dtype=F64), G.T),
                               rtol=1e-10, atol=1e-12)
    assert float(G.mean(0).norm()) < 1e-12  # fitted: the mean gradient vanishes


@given(problem=problems(kinds=("linear", "ridge", "logistic"), fitted=True))
def test_loo_params_minimise_the_leave_one_out_objective(problem):
    """grad of mean_{j != i} loss_j at theta_{-i} is 0 (< 1e-10) for every i; theta itself too."""
    thetas = loo_params(problem)
    flat, unravel = ravel(problem.params)
    x, y = problem.data
    for i in range(problem.n):
        keep = torch.arange(problem.n) != i
        f = lambda t: torch.func.vmap(lambda ex: problem.loss(unravel(t), ex))(
            (x[keep], y[keep])).mean()
        assert float(torch.func.grad(f)(thetas[i]).norm()) < 1e-10
    f = lambda t: torch.func.vmap(lambda ex: problem.loss(unravel(t), ex))(problem.data).mean()
    assert float(torch.func.grad(f)(flat).norm()) < 1e-10


def test_least_squares_loo_is_the_leverage_formula():
    """l2 = 0: theta_{-i} = theta + (Z^T Z)^-1 z_i r_i / (1 - h_i), r_i = z_i.theta - y_i, h_i leverage."""
    p = linear_regression(n=15, dim=3, seed=2, fit=True)
    Z, y = _design(p)
    theta, _ = ravel(p.params)
    A = torch.linalg.inv(Z.T @ Z)
    h = ((Z @ A) * Z).sum(1)
    want = theta + (Z @ A) * ((Z @ theta - y) / (1 - h))[:, None]
    torch.testing.assert_close(loo_params(p), want, rtol=1e-10, atol=1e-12)


def test_exact_loo_is_a_loss_difference():
    """exact_loo[i, j] = loss_j(theta_{-i}) - loss_j(theta); exact IF correlates > 0.9 with it."""
    p = logistic_regression(n=12, seed=1, l2=0.05, fit=True)
    loo = exact_loo(p)
    _, unravel = ravel(p.params)
    theta3 = unravel(loo_params(p)[3])
    ex = (p.data[0][5], p.data[1][5])
    torch.testing.assert_close(loo[3, 5], p.loss(theta3, ex) - p.loss(p.params, ex),
                               rtol=1e-12, atol=1e-14)
    IF = exact_influence(p)
    assert float(torch.corrcoef(torch.stack([IF.flatten(), loo.flatten()]))[0, 1]) > 0.9


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_same_seed_same_problem_in_any_dtype(device, name):
    """A float32 problem on any device is the float64 draw cast: params and data equal exactly."""
    p64, p32 = BUILDERS[name](seed=5), BUILDERS[name](seed=5, dtype=torch.float32, device=device)
    for k in p64.params:
        assert p32.params[k].dtype == torch.float32 and p32.params[k].device == device
        torch.testing.assert_close(p32.params[k].cpu(), p64.params[k].float(), rtol=0, atol=0)
    for a, b in zip(p64.data, p32.data, strict=True):
        assert torch.equal(b.cpu(), a.to(b.dtype))
    ex = (p32.data[0][0], p32.data[1][0])
    assert p32.loss(p32.params, ex).dtype == torch.float32


@given(A=operators())
def test_drawn_operators_have_their_spectrum(A):
    """spd: lambda > 0; psd: rank r and lambda >= 0; indefinite: both signs (P = 1: one
    negative); all symmetric."""
    torch.testing.assert_close(A, A.T, rtol=0, atol=1e-12)
    ev = torch.linalg.eigvalsh(A)
    assert float(ev[-1]) > 0 or A.shape[0] == 1
    assert float(ev[0]) > -1e-9 or float(ev[0]) <= -1 + 1e-9  # PSD, or a clear negative part


def test_matrix_kinds():
    """psd_matrix has a null space of P - rank; indefinite_matrix has `negative` eigenvalues <= -1."""
    ev = torch.linalg.eigvalsh(MATRICES["psd"](6, 0, rank=2))
    assert int((ev.abs() < 1e-12).sum()) == 4 and float(ev[-1]) > 0.9
    ev = torch.linalg.eigvalsh(MATRICES["indefinite"](6, 0, negative=2))
    assert int((ev <= -1 + 1e-9).sum()) == 2 and float(ev.abs().min()) >= 1 - 1e-9


def test_loo_refuses_a_problem_without_a_minimiser():
    """exact_loo on the MLP (non-convex, not fitted) names the reason."""
    with pytest.raises(ValueError, match=r"loo_params\(problem=...\): expected a convex problem "
                                         r"fitted at its minimiser"):
        exact_loo(mlp())
    with pytest.raises(ValueError, match=r"logistic_regression\(l2=...\): expected l2 > 0 with fit"):
        logistic_regression(fit=True)


def test_strategies_need_the_testing_extra():
    """In a fresh interpreter without hypothesis, dattri_fn.testing imports and its checks run;
    only the strategies refuse, naming the [testing] extra."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import dattri_fn.testing as kit\n"
        "kit.check_linop(kit.spd_matrix(3, 0))\n"
        "try:\n"
        "    kit.strategies\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "pip install 'dattri_fn[testing]'" in out.stdout


# -- planted bugs: each check names what broke ----------------------------------------------------
def _solve(op, damping):
    A = op if isinstance(op, torch.Tensor) else op.dense()
    return A + damping * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)


def test_check_inverse_catches_a_solver_that_forgets_damping():
    """A solver returning A^-1 V instead of (A + damping I)^-1 V fails on accuracy."""
    def forgets(op, damping=0.0):
        M = _solve(op, 0.0)
        return LinOp(lambda V: torch.linalg.solve(M, V.T).T, M.shape[0], M.dtype, M.device)

    with pytest.raises(AssertionError, match=r"check_inverse\(forgets\): \(A \+ damping I\)\^-1 V "
                                             r"== linalg.solve within rtol .* violated: worst row"):
        check_inverse(forgets)


def test_check_inverse_catches_a_silent_wrong_answer_on_an_indefinite_operator():
    """A solver inverting |lambda| (right on PD operators) without a word fails 'never silent'."""
    def abs_eig(op, damping=0.0):
        lam, U = torch.linalg.eigh(_solve(op, damping))
        return LinOp(lambda V: ((V @ U) / lam.abs()) @ U.T, U.shape[0], U.dtype, U.device)

    with pytest.raises(AssertionError, match=r"never silent on an indefinite operator .* no warning "
                                             r"and no error, row \d+ off by relative"):
        check_inverse(abs_eig)


def test_check_inverse_accepts_a_solver_that_says_so():
    """The same |lambda| solver with a warning on negative eigenvalues passes."""
    import warnings

    def honest(op, damping=0.0):
        lam, U = torch.linalg.eigh(_solve(op, damping))
        if bool((lam <= 0).any()):
            warnings.warn("non-positive eigenvalues inverted by magnitude", RuntimeWarning,
                          stacklevel=2)
        return LinOp(lambda V: ((V @ U) / lam.abs().clamp_min(1e-300)) @ U.T, U.shape[0],
                     U.dtype, U.device)

    check_inverse(honest, rtol=1e-9)


def test_check_linop_catches_broken_operators():
    """Non-symmetric, row-mixing, non-deterministic and off-by-2 operators: each property named."""
    p = mlp(n=6)
    H = dense_curvature(p, "hessian")
    P = H.shape[0]
    skew = torch.triu(torch.ones(P, P, dtype=F64), 1)
    cases = [
        (LinOp(lambda V: V @ (H + 1e-3 * skew).T, P, F64, "cpu", name="skewed"), "symmetry"),
        (LinOp(lambda V: V @ H + V.mean(0), P, F64, "cpu", name="mixing"), "row batching"),
        (LinOp(lambda V: V @ H * (1 + 1e-13 * torch.rand((), dtype=F64)), P, F64, "cpu", name="noisy"),
         "determinism"),
        (LinOp(lambda V: 2 * V @ H, P, F64, "cpu", name="doubled"), "equals the dense reference"),
        (LinOp(lambda V: (V @ H).float(), P, F64, "cpu", name="float32"), "dtype/device"),
    ]
    for op, prop in cases:
        with pytest.raises(AssertionError, match=rf"check_linop\({op.name}\): {prop}.* violated"):
            check_linop(op, reference=H)
    check_linop(LinOp(lambda V: V @ H, P, F64, "cpu", name="right"), reference=H)


def _bad_projector(kind):
    def make(dim, proj_dim, seed):
        g = torch.Generator().manual_seed(0 if kind == "unseeded" else seed)
        if kind == "repeated":  # one random column repeated: E[R R^T] = I but no averaging
            R = torch.randn(dim, 1, generator=g, dtype=F64).expand(dim, proj_dim) / proj_dim**0.5
        else:
            R = torch.randn(dim, proj_dim, generator=g, dtype=F64) / proj_dim**0.5
            R = 1.1 * R if kind == "scaled" else R
        return lambda X: X @ R.to(X.dtype)

    make.__name__ = kind
    return make


@pytest.mark.parametrize("kind,prop", [
    ("unseeded", "another seed, another projection"),
    ("scaled", r"E\[R R\^T\] = I"),
    ("repeated", "Johnson-Lindenstrauss"),
])
def test_check_projector_catches_broken_projectors(kind, prop):
    """Ignoring the seed, scaling by 1.1 and repeating one column: each named."""
    with pytest.raises(AssertionError, match=rf"check_projector\({kind}\): {prop}.* violated"):
        check_projector(_bad_projector(kind))


def test_check_projector_passes_a_correct_one():
    """The same Gaussian family, scaled by 1/sqrt(d), passes."""
    check_projector(_bad_projector("gaussian"))


def _wrapped(method, name, *, score=None, self_score=None):
    return Method(method.prepare, score or method.score, self_score or method.self_score, name)


def test_check_method_catches_broken_methods():
    """Flipped sign, wrong self-score, batch-dependent scores, top_k of the opponents, and an
    influence method that multiplies by H instead of H^-1: each property named."""
    p = ridge_regression(n=32, dim=3, seed=1, cond=10.0)
    loo = exact_loo(p)
    gd = grad_dot(p.loss)

    def flipped(params, state, train, test, *, top_k=None):
        if top_k is None:
            return -gd.score(params, state, train, test)
        low = gd.score(params, state, train, test, top_k=top_k, largest=False)
        return TopK(-low.values, low.indices)

    def per_batch(params, state, train, test, *, top_k=None):
        if isinstance(train, tuple):
            return gd.score(params, state, train, test, top_k=top_k)
        return 1.5 * gd.score(params, state, train, test, top_k=top_k)

    def opponents(params, state, train, test, *, top_k=None):
        return gd.score(params, state, train, test, top_k=top_k, largest=top_k is None)

    cases = [
        (_wrapped(gd, "flipped", score=flipped, self_score=lambda *a: -gd.self_score(*a)),
         "sign convention", {}),
        (_wrapped(gd, "doubled_self", self_score=lambda *a: 2 * gd.self_score(*a)),
         r"self_score == diag", {}),
        (_wrapped(gd, "per_batch", score=per_batch), "batching invariance", {}),
        (_wrapped(gd, "opponents", score=opponents), "top_k values", {}),
    ]
    for method, prop, kw in cases:
        with pytest.raises(AssertionError, match=rf"check_method\({method.name}\): {prop}.* violated"):
            check_method(method, p, min_loo_corr=None, **kw)

    def times_hessian(params, train):
        return dense_curvature(p, "hessian").inverse()  # inverted again by the solver: H, not H^-1

    wrong_if = influence(p.loss, solver="explicit", damping=1e-3, curvature=lambda pa, tr: LinOp(
        lambda V: V @ times_hessian(pa, tr), p.num_params, F64, "cpu", name="H^-1"))
    with pytest.raises(AssertionError, match=r"agreement with exact leave-one-out on ridge: Pearson "
                                             r"correlation >= 0.85 violated: correlation"):
        check_method(_wrapped(wrong_if, "if_times_H"), p, loo=loo)
    check_method(influence(p.loss, solver="explicit", damping=1e-3), p, loo=loo)


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=5)
def test_check_method_accepts_exact_influence_on_sequences(seed):
    """Influence with the damped empirical Fisher on the token model keeps every contract."""
    p = sequence_model(n=6, seed=seed)
    check_method(influence(p.loss, solver="explicit", damping=0.1, curvature="fisher"), p)


@given(op=linops(kinds=("spd", "low_rank_diag")), damping=dampings(), seed=st.integers(0, 99))
@settings(max_examples=10)
def test_drawn_linops_are_solved_by_the_library(op, damping, seed):
    """solvers.cg(rtol=1e-12)(op, damping)(V) == linalg.solve(op.dense() + damping I, V) (1e-8)."""
    from dattri_fn import solvers

    V = torch.randn(2, op.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    A = op.dense() + damping * torch.eye(op.dim, dtype=F64)
    x = solvers.cg(rtol=1e-12, max_iter=20 * op.dim)(op, damping)(V)
    torch.testing.assert_close(x, torch.linalg.solve(A, V.T).T, rtol=1e-8, atol=1e-10)


def test_check_method_takes_checkpoints():
    """TracIn over two identical checkpoints at lr 0.5 each: the contract holds with params=[p, p]."""
    from dattri_fn.attribute import tracin

    p = ridge_regression(n=10, seed=2)
    check_method(tracin(p.loss, lrs=[0.5, 0.5]), p, params=[p.params, p.params], min_loo_corr=None)


@given(problem=problems(fitted=True))
@settings(max_examples=15)
def test_default_loo_bound_holds_for_exact_influence(problem):
    """influence(explicit, Hessian, damping 1e-3) keeps every check_method contract, LOO corr
    >= 0.85 included, on fitted convex draws: the default bound rejects no correct method there."""
    check_method(influence(problem.loss, solver="explicit", damping=1e-3), problem)


# -- issue 19 leftovers: mixed input dtypes, solver diagnostics --------------------------------
def _spd(P=5):
    from dattri_fn.testing import spd_matrix

    return spd_matrix(P, 0)


def test_check_linop_mixed_input_catches_promotion_and_raw_errors():
    """float32 rows to a float64 operator: a silent float64 output, a raw torch error and an
    error naming another argument each fail 'another input dtype/device'; an operator that
    follows the input passes 'follow', one that refuses naming V passes 'refuse'."""
    A = _spd()
    P = A.shape[0]

    def refusing(V):
        if V.dtype != F64:
            raise TypeError(f"refusing(V=...): expected {F64}, got {V.dtype}.")
        return V @ A.T

    def blaming(V):
        if V.dtype != F64:
            raise ValueError("refusing(data=...): expected floats, got something else.")
        return V @ A.T

    class Bare(LinOp):
        """A user's operator class that skips LinOp's own row checks (the library's LinOp
        refuses rows of another dtype/device naming V, so it cannot plant these bugs)."""

        __slots__ = ()

        def __call__(self, V):
            return self.matmat(V)

    follow = Bare(lambda V: V @ A.T.to(V.dtype), P, F64, "cpu", name="follow")
    refuse = Bare(refusing, P, F64, "cpu", name="refuse")
    for op, prop, mode in [
        (Bare(lambda V: V.double() @ A.T, P, F64, "cpu", name="promote"), "got torch.float64",
         "follow_or_refuse"),
        (Bare(lambda V: V @ A.T, P, F64, "cpu", name="raw"), "raw RuntimeError",
         "follow_or_refuse"),
        (Bare(blaming, P, F64, "cpu", name="blame"), "not naming V", "follow_or_refuse"),
        (follow, "computed without an error", "refuse"),
        (refuse, "TypeError: refusing", "follow"),
    ]:
        with pytest.raises(AssertionError, match=rf"check_linop\({op.name}\): another input "
                                                 rf"dtype/device.* violated: .*{prop}"):
            check_linop(op, mixed_input=mode)
    for mode in ("follow", "follow_or_refuse"):
        check_linop(follow, mixed_input=mode)
    for mode in ("refuse", "follow_or_refuse"):
        check_linop(refuse, mixed_input=mode)
    check_linop(LinOp(lambda V: V @ A.T, P, F64, "cpu", name="library"), mixed_input="refuse")
    with pytest.raises(ValueError, match=r"check_linop\(mixed_input=...\): expected None or one"):
        check_linop(follow, mixed_input="sometimes")


def _cg_report(op, damping, V):
    from dattri_fn.solve import cg_solve

    return cg_solve(op, V, damping=damping, rtol=1e-12, max_iter=200)


def _cg(op, damping=0.0):
    from dattri_fn.solve import ihvp_cg

    return ihvp_cg(op, damping=damping, rtol=1e-12, max_iter=200)


def test_check_inverse_checks_diagnostics():
    """CG with its own CGResult passes; a report that claims every row converged (on the
    indefinite operator it stops early on) fails, as does one without 'converged' or one
    describing another answer than the solver's."""
    check_inverse(_cg, rtol=1e-8, diagnostics=_cg_report)

    def lying(op, damping, V):
        r = _cg_report(op, damping, V)
        return r._replace(converged=torch.ones_like(r.converged),
                          negative_curvature=torch.zeros_like(r.negative_curvature))

    with pytest.raises(AssertionError, match=r"check_inverse\(_cg\): diagnostics never claim a "
                                             r"wrong row converged \(indefinite\) violated: row"):
        check_inverse(_cg, rtol=1e-8, diagnostics=lying)
    with pytest.raises(AssertionError, match=r"diagnostics present \(spd dense torch.float64\) "
                                             r"violated: converged should be a bool tensor"):
        check_inverse(_cg, rtol=1e-8, diagnostics=lambda op, d, V: (_cg_report(op, d, V).x,))
    loose = lambda op, d, V: _cg_report(op, d, V)._replace(x=_cg_report(op, d, V).x * (1 + 1e-3))
    with pytest.raises(AssertionError, match=r"diagnostics describe the output"):
        check_inverse(_cg, rtol=1e-8, diagnostics=loose)


def test_check_inverse_counts_flagged_diagnostics_as_saying_so():
    """A CG that never warns is silent on the indefinite operator, and fails, unless its report
    flags the rows it did not solve: then it passes."""
    import warnings

    def quiet(op, damping=0.0):
        inv = _cg(op, damping)

        def solve(V):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return inv(V)

        return LinOp(solve, inv.dim, inv.dtype, inv.device, name="quiet")

    quiet.__name__ = "quiet"
    with pytest.raises(AssertionError, match=r"check_inverse\(quiet\): never silent on an "
                                             r"indefinite operator"):
        check_inverse(quiet, rtol=1e-8)
    check_inverse(quiet, rtol=1e-8, diagnostics=_cg_report)


def test_check_method_store_property_catches_a_method_that_misreads_stores(tmp_path):
    """check_method(store=dir): Grad-Dot passes; a wrapper whose self_score returns zeros for a
    store fails 'self_score(record_store(...)) == self_score(train)'."""
    from dattri_fn.store import FeatureStore, StoreRecording

    p = ridge_regression(n=12, dim=2, seed=0)
    good = grad_dot(p.loss)
    check_method(good, p, min_loo_corr=None, store=tmp_path)

    def self_score(params, state, train):
        if isinstance(train, (FeatureStore, StoreRecording)):
            return torch.zeros(p.n, dtype=F64)
        return good.self_score(params, state, train)

    bad = Method(good.prepare, good.score, self_score, "zeros_from_stores")
    with pytest.raises(AssertionError, match=r"check_method\(zeros_from_stores\): "
                                             r"self_score\(record_store\(...\)\) == self_score"):
        check_method(bad, p, min_loo_corr=None, store=tmp_path)
