"""L-BFGS minimisation in the compact (Byrd-Nocedal-Schnabel) form, to a gradient bound.

:func:`minimize_lbfgs` minimises a smooth function of one flat vector given as ``value_grad(x) ->
(f(x), grad f(x))``. It is the solver of :func:`dattri_fn.attribute.representer_fit.fit_head`
(the L2-regularised last layer that representer points need), made public for any small,
smooth, deterministic problem: no line-search parameters to tune, a stopping rule on the
largest gradient entry (for a ``mu``-strongly convex ``f`` the iterate is then within
``|grad| / mu`` of the minimiser), and an evaluation budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import _msg, all_finite, check_int, check_positive, check_tensor


class LBFGSResult(NamedTuple):
    """What :func:`minimize_lbfgs` returns.

    Fields:
        x: the last iterate.  # [P]
        value: ``f(x)``.  # []
        grad: ``grad f(x)``, as ``value_grad`` returned it.  # [P]
        num_iters: L-BFGS steps taken.
        num_evals: calls of ``value_grad`` (the one at ``x0`` included).
        converged: ``max|grad| <= gtol``.
    """

    x: Tensor
    value: Tensor
    grad: Tensor
    num_iters: int
    num_evals: int
    converged: bool


def minimize_lbfgs(value_grad: Callable[[Tensor], tuple[Tensor, Tensor]], x0: Tensor, *,
                   gtol: float, max_iter: int = 500, history: int = 20) -> LBFGSResult:
    """Return ``x ~ argmin f`` from ``x0`` by L-BFGS, stopped at ``max_i |grad f(x)_i| <= gtol``.

    # x0 [P] -> x [P]

    ``value_grad(x) -> (f(x) [], grad f(x) [P])``, pure and deterministic (it is called at the
    trial points of a backtracking line search, so it must accept any finite ``x``). The
    inverse-Hessian model is the compact form of Byrd, Nocedal & Schnabel with the last
    ``history`` pairs and ``gamma = s^T y / y^T y``; steps are backtracked to the Armijo
    condition (``c = 1e-4``, halving from 1), and near the minimum a step that keeps ``f``
    within its round-off (``8 eps |f|``) and shrinks ``max|grad|`` is accepted too, where a
    plain Armijo search would stall. At most ``max_iter`` steps and ``1.25 max_iter``
    evaluations after the first (``torch.optim.LBFGS``'s budget); a line search that finds no
    acceptable step above ``t = 1e-12`` stops early (``converged`` False).

    Args:
        value_grad: ``x [P] -> (f [], g [P])`` in ``x0``'s dtype.
        x0: the start.  # [P], floating, finite
        gtol: ``> 0``, the bound on the largest gradient entry.
        max_iter: ``>= 1`` steps at most.
        history: ``>= 1`` correction pairs kept.

    Returns:
        :class:`LBFGSResult` ``(x, value, grad, num_iters, num_evals, converged)``.

    Raises:
        TypeError/ValueError: naming the argument: a bad setting, ``x0`` not a finite 1-d
            floating tensor, or ``value_grad(x0)`` not ``(a 0-d tensor, a [P] tensor)`` of
            finite values.

    Note:
        For a ``mu``-strongly convex ``f``, ``|x - x*| <= |grad f(x)| / mu``; in float64 a
        well-conditioned problem reaches ``gtol`` near ``1e-12 max(1, |grad f(x0)|)``.

    References:
        Byrd, Nocedal & Schnabel, "Representations of quasi-Newton matrices and their use in
        limited memory methods", Math. Programming 63 (1994); Nocedal & Wright, "Numerical
        Optimization", 2nd ed., ch. 7.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64)); b = A.new_ones(2)
        >>> r = minimize_lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b),
        ...                    torch.zeros(2, dtype=torch.float64), gtol=1e-12)
        >>> torch.allclose(r.x, torch.linalg.solve(A, b), atol=1e-11)
        True
    """
    func = "minimize_lbfgs"
    if not callable(value_grad):
        raise TypeError(_msg(func, "value_grad", "a callable x -> (f, grad f)",
                             type(value_grad).__name__))
    check_tensor(func, "x0", x0, ndim=1, floating=True)
    gtol = check_positive(func, "gtol", gtol)
    max_iter = check_int(func, "max_iter", max_iter)
    history = check_int(func, "history", history)
    x0 = x0.detach()
    out = value_grad(x0)
    if (not isinstance(out, tuple) or len(out) != 2
            or not all(isinstance(v, Tensor) for v in out)
            or out[0].ndim != 0 or out[1].shape != x0.shape
            or out[1].dtype != x0.dtype):
        got = (f"a {type(out).__name__}" if not isinstance(out, tuple) or len(out) != 2
               else ", ".join(f"{type(v).__name__}" + (f" {v.dtype} {list(v.shape)}"
                              if isinstance(v, Tensor) else "") for v in out))
        raise ValueError(_msg(func, "value_grad", f"(a 0-d tensor, a {x0.dtype} tensor of "
                              f"shape {list(x0.shape)}) at x0", got))
    f, g = out[0].detach(), out[1].detach()
    if not (all_finite(f) and all_finite(g)):
        raise ValueError(_msg(func, "value_grad", "a finite value and gradient at x0",
                              "NaN or inf"))
    x, f, g, steps, evals = _lbfgs_run(value_grad, x0, f, g, gtol, max_iter, history)
    return LBFGSResult(x, f, g, steps, evals + 1, float(g.abs().max()) <= gtol)


def _lbfgs(value_grad: Callable, x: Tensor, f: Tensor, g: Tensor, bound: float, max_iter: int,
           history: int = 20) -> tuple[Tensor, Tensor]:
    """:func:`_lbfgs_run`'s last iterate and its gradient (the bare core, no validation).

    # x [P] -> ([P], [P])
    """
    x, _, g, _, _ = _lbfgs_run(value_grad, x, f, g, bound, max_iter, history)
    return x, g


def _lbfgs_run(value_grad: Callable, x: Tensor, f: Tensor, g: Tensor, bound: float,
               max_iter: int, history: int = 20) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """Minimise from ``x`` (value ``f``, gradient ``g`` there) by L-BFGS until ``max|g| <= bound``;
    return ``(x, f, g, steps, evaluations)`` at the last iterate.  # x [P] -> ([P], [], [P], int, int)

    The inverse-Hessian product uses the compact form of Byrd, Nocedal & Schnabel (1994),
    ``H g = gamma g + S w - gamma Y u`` with ``u = R^-1 S^T g`` and ``w = R^-T ((D + gamma
    Y^T Y) u - gamma Y^T g)`` (``R`` the upper triangle of ``S^T Y``, ``D`` its diagonal): a few
    ``[m, P]`` products a step instead of the two-loop recursion's ``4m`` vector operations,
    whose per-call overhead dominated a small head's fit. Steps are backtracked to the Armijo
    condition (``c = 1e-4``, halving from 1), or taken where ``f`` stays within its round-off
    (``8 eps |f|``) and ``max|g|`` shrinks; a pair with ``s^T y <= 1e-12 |s||y|`` is not kept.
    At most ``max_iter`` steps and ``1.25 max_iter`` evaluations (``torch.optim.LBFGS``'s).
    """
    P = x.numel()
    S, Y = x.new_empty((history, P)), x.new_empty((history, P))
    SY, YY = x.new_zeros((history, history)), x.new_zeros((history, history))
    k, gamma = 0, 1.0
    evals = budget = max_iter + max_iter // 4  # torch.optim.LBFGS's default budget of evaluations
    steps = 0
    for _ in range(max_iter):
        if float(g.abs().max()) <= bound:
            break
        if k == 0:
            d = -g * min(1.0, 1.0 / float(g.abs().sum()))
        else:
            Sk, Yk = S[:k], Y[:k]
            R = SY[:k, :k].triu()
            u = torch.linalg.solve_triangular(R, (Sk @ g)[:, None], upper=True)[:, 0]
            rhs = SY[:k, :k].diagonal() * u + gamma * (YY[:k, :k] @ u - Yk @ g)
            w = torch.linalg.solve_triangular(R.mT, rhs[:, None], upper=False)[:, 0]
            d = -(gamma * g + Sk.T @ w - gamma * (Yk.T @ u))
        slope = float(g @ d)
        if not slope < 0:  # round-off broke the descent property: restart from -g
            k, d = 0, -g * min(1.0, 1.0 / float(g.abs().sum()))
            slope = float(g @ d)
        t, g_max = 1.0, float(g.abs().max())
        # Near the minimum a decrease falls below f's round-off: a step that keeps f within it
        # and shrinks the gradient is taken too (where a plain Armijo search would stall), and
        # so is one meeting Hager & Zhang's approximate Wolfe test: f within 1e-6 |f| and the
        # slope along d at most -(2 delta - 1) = 0.8 times the initial one's size (delta = 0.1;
        # on a convex quadratic this proves a decrease that f's values cannot show).
        noise = 8 * torch.finfo(x.dtype).eps * abs(float(f))
        loose = 1e-6 * abs(float(f))
        while True:
            x_new = x + t * d
            f_new, g_new = value_grad(x_new)
            evals -= 1
            if float(f_new) <= float(f) + 1e-4 * t * slope or (
                    float(f_new) <= float(f) + noise and float(g_new.abs().max()) < g_max) or (
                    float(f_new) <= float(f) + loose and float(g_new @ d) <= -0.8 * slope):
                break
            t *= 0.5
            if t < 1e-12 or evals <= 0:  # no decrease left at this precision, or no budget
                return x, f, g, steps, budget - evals
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12 * float(s.norm() * y.norm()):
            if k == history:  # drop the oldest pair
                S[:-1], Y[:-1] = S[1:].clone(), Y[1:].clone()
                SY[:-1, :-1], YY[:-1, :-1] = SY[1:, 1:].clone(), YY[1:, 1:].clone()
                k -= 1
            S[k], Y[k] = s, y
            SY[:k + 1, k] = S[:k + 1] @ y  # s_i^T y_k
            SY[k, :k + 1] = Y[:k + 1] @ s  # s_k^T y_j
            YY[:k + 1, k] = YY[k, :k + 1] = Y[:k + 1] @ y
            k += 1
            gamma = sy / float(y @ y)
        x, f, g = x_new, f_new, g_new
        steps += 1
        if evals <= 0:
            break
    return x, f, g, steps, budget - evals
