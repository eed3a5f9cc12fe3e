"""L-BFGS minimisation in the compact (Byrd-Nocedal-Schnabel) form, to a gradient bound."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _lbfgs(value_grad: Callable, x: Tensor, f: Tensor, g: Tensor, bound: float, max_iter: int,
           history: int = 20) -> tuple[Tensor, Tensor]:
    """Minimise from ``x`` (value ``f``, gradient ``g`` there) by L-BFGS until ``max|g| <= bound``;
    return the last iterate and its gradient.  # x [P] -> ([P], [P])

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
    evals = max_iter + max_iter // 4  # torch.optim.LBFGS's default budget of evaluations
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
        # and shrinks the gradient is taken too (where a plain Armijo search would stall).
        noise = 8 * torch.finfo(x.dtype).eps * abs(float(f))
        while True:
            x_new = x + t * d
            f_new, g_new = value_grad(x_new)
            evals -= 1
            if float(f_new) <= float(f) + 1e-4 * t * slope or (
                    float(f_new) <= float(f) + noise and float(g_new.abs().max()) < g_max):
                break
            t *= 0.5
            if t < 1e-12 or evals <= 0:  # no decrease left at this precision, or no budget
                return x, g
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
        if evals <= 0:
            break
    return x, g
