"""Dense references of the kit's problems: curvatures, per-example gradients, exact influence and LOO.

Dense references, ``P`` the raveled size, gradients and curvatures by Python loops over the
examples (independent of the ``vmap`` paths they check): :func:`dense_hessian`,
:func:`dense_gauss_newton`, :func:`dense_fisher` and :func:`dense_curvature` (``[P, P]``),
:func:`per_example_grads` (``[n, P]``), :func:`exact_influence` (``g_i^T (C + damping I)^-1 g_j``,
``[n_train, n_test]``); :func:`loo_params` (normal equations without row ``i``, or Newton refits
with the closed-form logistic gradient and Hessian) and :func:`exact_loo`
(``loss_j(theta_{-i}) - loss_j(theta)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from .._types import Loss, Params
from ..tree import ravel
from .problems import Problem, _logistic_arrays, _logistic_newton

CURVATURES = ("hessian", "gauss_newton", "fisher")


def _examples(data):
    x, y = data
    return [(x[i], y[i]) for i in range(x.shape[0])]


def _as_problem(func: str, problem) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(f"{func}(problem=...): expected a dattri_fn.testing Problem, got "
                        f"{type(problem).__name__}.")
    return problem


def mean_loss_flat(loss: Loss, params: Params, data) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Return ``(flat0, f)`` with ``f(flat) = mean_i loss(unravel(flat), z_i)`` by a Python loop."""
    flat0, unravel = ravel(params)
    examples = _examples(data)

    def f(flat):
        p = unravel(flat)
        return torch.stack([loss(p, ex) for ex in examples]).mean()

    return flat0, f


def dense_hessian(loss: Loss, params: Params, data) -> Tensor:
    """Return the Hessian of the mean loss, ``torch.func.hessian`` on raveled params.  # [P, P]"""
    flat0, f = mean_loss_flat(loss, params, data)
    return hessian(f)(flat0)


def per_example_grads(loss: Loss, params: Params, data) -> Tensor:
    """Return ``g_i = grad loss(params, z_i)`` by a loop of ``torch.autograd.grad``.  # [n, P]"""
    flat0, unravel = ravel(params)
    rows = []
    for ex in _examples(data):
        flat = flat0.detach().clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(loss(unravel(flat), ex), flat)
        rows.append(gi)
    return torch.stack(rows)


def dense_fisher(loss: Loss, params: Params, data) -> Tensor:
    """Return the empirical Fisher ``F = (1/n) sum_i g_i g_i^T``.  # [P, P]"""
    G = per_example_grads(loss, params, data)
    return G.T @ G / G.shape[0]


def dense_gauss_newton(forward: Callable, out_loss: Callable, params: Params, data, *,
                       l2: float = 0.0) -> Tensor:
    """Return ``G = (1/n) sum_i J_i^T H_i J_i + 2 l2 I`` (``J_i``: Jacobian of the output in the
    raveled params, ``H_i``: Hessian of ``out_loss`` in the output), one example at a time.  # [P, P]"""
    flat0, unravel = ravel(params)
    G = torch.zeros(flat0.numel(), flat0.numel(), dtype=flat0.dtype, device=flat0.device)
    examples = _examples(data)
    for ex in examples:
        out_of = lambda flat, ex=ex: forward(unravel(flat), ex)
        out = out_of(flat0)
        J = jacrev(out_of)(flat0).reshape(out.numel(), -1)
        H = hessian(lambda o, ex=ex, shape=out.shape: out_loss(o.reshape(shape), ex))(out.reshape(-1))
        G += J.T @ H @ J
    G /= len(examples)
    return G + 2 * l2 * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def dense_curvature(problem: Problem, kind: str = "hessian") -> Tensor:
    """Return the problem's dense curvature on its training data: ``kind`` in
    ``"hessian"``, ``"gauss_newton"``, ``"fisher"``.  # [P, P]"""
    problem = _as_problem("dense_curvature", problem)
    if kind == "hessian":
        return dense_hessian(problem.loss, problem.params, problem.data)
    if kind == "gauss_newton":
        return dense_gauss_newton(problem.forward, problem.out_loss, problem.params, problem.data,
                                  l2=problem.l2)
    if kind == "fisher":
        return dense_fisher(problem.loss, problem.params, problem.data)
    raise ValueError(f"dense_curvature(kind=...): expected one of {list(CURVATURES)}, got {kind!r}.")


def exact_influence(problem: Problem, train=None, test=None, *, curvature: str = "hessian",
                    damping: float = 0.0) -> Tensor:
    """Return ``g_i^T (C + damping I)^-1 g_j`` with ``C`` the problem's dense curvature on its
    training data, by ``torch.linalg.solve``.  # -> [n_train, n_test]

    ``train``/``test`` default to ``problem.data``; positive = up-weighting train ``i`` lowers
    test ``j``'s loss (dattri_fn's score convention).
    """
    problem = _as_problem("exact_influence", problem)
    train = problem.data if train is None else train
    test = problem.data if test is None else test
    C = dense_curvature(problem, curvature)
    C = C + damping * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    G_train = per_example_grads(problem.loss, problem.params, train)
    G_test = per_example_grads(problem.loss, problem.params, test)
    return G_train @ torch.linalg.solve(C, G_test.T)


def loo_params(problem: Problem) -> Tensor:
    """Return the raveled minimisers ``theta_{-i}`` of the mean loss without example ``i``.  # [n, P]

    Linear/ridge regression: the normal equations with row ``i`` removed, in closed form;
    logistic regression: Newton's method from ``theta`` to a gradient norm below ``1e-12``.
    """
    problem = _as_problem("loo_params", problem)
    if not (problem.convex and problem.fitted):
        raise ValueError(f"loo_params(problem=...): expected a convex problem fitted at its "
                         f"minimiser (ridge_regression, linear_regression(fit=True), "
                         f"logistic_regression(fit=True)), got {problem!r} with "
                         f"convex={problem.convex}, fitted={problem.fitted}.")
    flat, unravel = ravel(problem.params)
    x, y = problem.data
    n = x.shape[0]
    if problem.name in ("linear", "ridge"):
        Z = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        P = Z.shape[1]
        eye = torch.eye(P, dtype=Z.dtype, device=Z.device)
        ZZ, Zy = Z.T @ Z, Z.T @ y
        A = (ZZ - Z[:, :, None] * Z[:, None, :]) / (n - 1) + 2 * problem.l2 * eye  # [n, P, P]
        b = (Zy - Z * y[:, None]) / (n - 1)  # [n, P]
        return torch.linalg.solve(A, b)
    W, b = problem.params["W"], problem.params["b"]
    Z, Y = _logistic_arrays(x, y, W.shape[0])
    T0 = torch.cat([W, b[:, None]], 1)
    rows = []
    for i in range(n):
        w = torch.ones(n, dtype=T0.dtype, device=T0.device)
        w[i] = 0
        T = _logistic_newton(Z, Y, w, problem.l2, T0)
        rows.append(torch.cat([T[:, :-1].reshape(-1), T[:, -1]]))
    return torch.stack(rows)


def exact_loo(problem: Problem, test=None) -> Tensor:
    """Return ``loss(theta_{-i}, z_j) - loss(theta, z_j)``: how much removing train ``i`` raises
    test ``j``'s loss (positive = ``i`` was a proponent), exactly.  # -> [n_train, n_test]"""
    problem = _as_problem("exact_loo", problem)
    thetas = loo_params(problem)
    flat, unravel = ravel(problem.params)
    test = problem.data if test is None else test
    losses_at = lambda theta: vmap(lambda ex: problem.loss(unravel(theta), ex))(test)
    base = losses_at(flat)
    return torch.stack([losses_at(t) for t in thetas]) - base
