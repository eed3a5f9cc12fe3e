"""minimize_lbfgs (dattri_fn.solve.lbfgs) against dense float64 references: a strongly convex
quadratic's closed form and L2-regularised multinomial logistic regression solved by Newton."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dattri_fn.solve.lbfgs import LBFGSResult, minimize_lbfgs

F64 = torch.float64
seeds = st.integers(0, 2**16)


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _quadratic(seed, P, cond):
    g = _gen(seed)
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))[0]
    eig = torch.logspace(0, torch.log10(torch.tensor(float(cond))).item(), P, dtype=F64)
    A = Q @ torch.diag(eig) @ Q.T
    A = (A + A.T) / 2
    b = torch.randn(P, generator=g, dtype=F64)
    return A, b


@given(seed=seeds, P=st.integers(2, 16), cond=st.sampled_from([1.0, 10.0, 1e3]),
       history=st.integers(1, 25))
def test_quadratic_matches_the_closed_form(seed, P, cond, history):
    """f = x^T A x / 2 - b^T x, eig(A) in [1, cond]: max|grad| <= gtol = 1e-10 and
    |x - A^-1 b| <= |grad| / lambda_min = |grad|."""
    A, b = _quadratic(seed, P, cond)
    gtol = 1e-10
    r = minimize_lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), torch.zeros(P, dtype=F64),
                       gtol=gtol, max_iter=5000, history=history)
    assert isinstance(r, LBFGSResult) and r.converged
    assert float(r.grad.abs().max()) <= gtol
    torch.testing.assert_close(r.grad, A @ r.x - b, rtol=0, atol=1e-13)
    x_star = torch.linalg.solve(A, b)
    assert float((r.x - x_star).norm()) <= float(r.grad.norm()) + 1e-13  # lambda_min(A) = 1
    torch.testing.assert_close(r.value, 0.5 * r.x @ A @ r.x - b @ r.x, rtol=1e-15, atol=1e-15)
    assert 1 <= r.num_iters <= r.num_evals - 1


def _logistic(seed, n, F, K, l2):
    """Mean softmax cross-entropy of X W^T against labels y plus l2 |W|^2, W raveled [K F];
    returns (value_grad by autograd, Newton's closed-form gradient and Hessian)."""
    g = _gen(seed)
    X = torch.randn(n, F, generator=g, dtype=F64)
    y = torch.randint(0, K, (n,), generator=g)
    Y = torch.nn.functional.one_hot(y, K).to(F64)

    def value_grad(w):
        w = w.detach().requires_grad_(True)
        v = torch.nn.functional.cross_entropy(X @ w.reshape(K, F).T, y) + l2 * (w * w).sum()
        return v.detach(), torch.autograd.grad(v, w)[0]

    def grad_hess(w):
        # d/dW = (softmax - Y)^T X / n + 2 l2 W
        # H = (1/n) sum_i (diag p_i - p_i p_i^T) (x) x_i x_i^T + 2 l2 I
        p = torch.softmax(X @ w.reshape(K, F).T, 1)
        grad = ((p - Y).T @ X / n).reshape(-1) + 2 * l2 * w
        curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n, K, K]
        H = torch.einsum("icd,if,ig->cfdg", curv, X, X).reshape(K * F, K * F) / n
        return grad, H + 2 * l2 * torch.eye(K * F, dtype=F64)

    return value_grad, grad_hess


def _newton(grad_hess, w, steps=50):
    """Dense Newton with the exact Hessian to round-off: the reference minimiser."""
    for _ in range(steps):
        g, H = grad_hess(w)
        if float(g.abs().max()) <= 1e-14:
            break
        w = w - torch.linalg.solve(H, g)
    return w, grad_hess(w)[0]


@given(seed=seeds, n=st.integers(5, 40), F=st.integers(1, 5), K=st.integers(2, 4),
       l2=st.sampled_from([1e-3, 1e-2, 1e-1]))
def test_logistic_regression_matches_newton(seed, n, F, K, l2):
    """L2 multinomial logistic regression (2 l2-strongly convex):
    |w - w_Newton| <= (|g| + |g_Newton|) / (2 l2)."""
    value_grad, grad_hess = _logistic(seed, n, F, K, l2)
    w0 = torch.zeros(K * F, dtype=F64)
    w_ref, g_ref = _newton(grad_hess, w0)
    torch.testing.assert_close(value_grad(w_ref)[1], g_ref, rtol=0, atol=1e-13)  # same objective
    assume(float(g_ref.abs().max()) <= 1e-12)
    r = minimize_lbfgs(value_grad, w0, gtol=1e-11, max_iter=2000)
    assert r.converged and float(r.grad.abs().max()) <= 1e-11
    bound = (float(r.grad.norm()) + float(g_ref.norm())) / (2 * l2)
    assert float((r.x - w_ref).norm()) <= bound + 1e-13
    torch.testing.assert_close(r.x, w_ref, rtol=0, atol=1e-8)


def test_budget_and_stall_are_reported():
    """max_iter = 8 on a cond-1e3 quadratic: <= 8 steps and <= 1 + 10 evaluations, not
    converged, and the gradient returned is f's at the x returned."""
    A, b = _quadratic(0, 30, 1e3)
    r = minimize_lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), torch.zeros(30, dtype=F64),
                       gtol=1e-12, max_iter=8)
    assert 1 <= r.num_iters <= 8 and r.num_evals <= 11 and not r.converged
    torch.testing.assert_close(r.grad, A @ r.x - b, rtol=0, atol=1e-13)
    # already stationary: no step, one evaluation
    x_star = torch.linalg.solve(A, b)
    r0 = minimize_lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), x_star, gtol=1e-6)
    assert (r0.num_iters, r0.num_evals, r0.converged) == (0, 1, True)
    assert torch.equal(r0.x, x_star)


def test_errors_name_the_argument():
    """Bad settings, a bad x0 and a value_grad of the wrong shape are refused by name."""
    vg = lambda x: ((x * x).sum(), 2 * x)  # noqa: E731
    x0 = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"minimize_lbfgs\(gtol=...\): expected a finite number > 0"):
        minimize_lbfgs(vg, x0, gtol=0.0)
    with pytest.raises(ValueError, match=r"minimize_lbfgs\(max_iter=...\): expected an int >= 1"):
        minimize_lbfgs(vg, x0, gtol=1e-6, max_iter=0)
    with pytest.raises(ValueError, match=r"minimize_lbfgs\(history=...\)"):
        minimize_lbfgs(vg, x0, gtol=1e-6, history=0)
    with pytest.raises(TypeError, match=r"minimize_lbfgs\(value_grad=...\): expected a callable"):
        minimize_lbfgs(3, x0, gtol=1e-6)
    with pytest.raises(ValueError, match=r"minimize_lbfgs\(x0=...\)"):
        minimize_lbfgs(vg, torch.ones(2, 2, dtype=F64), gtol=1e-6)
    with pytest.raises(TypeError, match=r"minimize_lbfgs\(x0=...\)"):
        minimize_lbfgs(vg, torch.ones(3, dtype=torch.int64), gtol=1e-6)
    with pytest.raises(ValueError, match=r"minimize_lbfgs\(value_grad=...\): expected \(a 0-d tensor"):
        minimize_lbfgs(lambda x: (x, x), x0, gtol=1e-6)
    with pytest.raises(ValueError, match=r"minimize_lbfgs\(value_grad=...\): expected a finite"):
        minimize_lbfgs(lambda x: ((x * x).sum() * float("nan"), 2 * x), x0, gtol=1e-6)


def test_float32_follows_the_input():
    """x0 float32 in, float32 out; the quadratic's minimiser to float32 precision."""
    A, b = _quadratic(3, 10, 10.0)
    A, b = A.float(), b.float()
    r = minimize_lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), torch.zeros(10), gtol=1e-4)
    assert r.x.dtype == torch.float32 and r.converged
    torch.testing.assert_close(r.x, torch.linalg.solve(A, b), rtol=0, atol=1e-3)
