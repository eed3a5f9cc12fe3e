"""MINRES on many right-hand sides at once: symmetric systems that may be indefinite."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._types import LinOp
from .cg import _damped, _validate
from .explicit import as_operator, check_rhs

_CHECK_EVERY = 4


def _minres(matmat, B: Tensor, tol: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bare batched MINRES from zero (Paige & Saunders 1975): ``(X, iters, residual_norm)``.

    Per row: a Lanczos basis of the Krylov space of ``B_i`` and the iterate minimising
    ``||b - A x||`` over it, updated by Givens rotations (SciPy's ``minres`` recurrences,
    without a preconditioner). ``phibar`` is the exact residual norm in exact arithmetic; a
    row whose ``phibar <= tol`` (or whose Lanczos vector vanishes) is frozen.
    """
    k = B.shape[0]
    zero = B.new_zeros(k)
    r1, r2, y = B, B, B
    beta1 = B.norm(dim=1)
    beta, oldb = beta1.clone(), zero.clone()
    dbar, epsln, phibar = zero.clone(), zero.clone(), beta1.clone()
    cs, sn = -torch.ones_like(zero), zero.clone()
    X = torch.zeros_like(B)
    w, w2 = torch.zeros_like(B), torch.zeros_like(B)
    active = phibar > tol
    iters = torch.zeros(k, dtype=torch.int64, device=B.device)
    tiny = torch.finfo(B.dtype).tiny
    for it in range(max_iter):
        if it % _CHECK_EVERY == 0 and not bool(active.any()):
            break
        live = active & (beta > tiny)
        s = torch.where(live, 1.0 / torch.where(live, beta, 1.0), 0.0)
        v = y * s[:, None]
        y = matmat(v)
        if it:
            y = y - (beta / torch.where(oldb > 0, oldb, 1.0))[:, None] * r1
        alfa = (v * y).sum(1)
        y = y - (alfa * s)[:, None] * r2
        r1, r2 = r2, y
        oldb, beta = beta, y.norm(dim=1)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = torch.where(live, sn * phibar, phibar)
        w1, w2 = w2, w
        w = (v - oldeps[:, None] * w1 - delta[:, None] * w2) / gamma[:, None]
        X = X + torch.where(live, phi, 0.0)[:, None] * w
        iters += live
        active = live & (phibar > tol)
    return X, iters, phibar


def ihvp_minres(op, *, damping: float = 0.0, rtol: float = 1e-6, atol: float = 0.0,
                max_iter: int | None = None) -> LinOp:
    """Return V -> (A + damping*I)^-1 V by MINRES, per row, for symmetric indefinite A.  # [k, P] -> [k, P]

    Where CG needs ``A + damping*I`` positive definite (it stops a row at the first direction
    of non-positive curvature, see :func:`~dattri_fn.solve.ihvp_cg`), MINRES minimises the
    residual over the same Krylov space and converges for any symmetric nonsingular system: the
    literal damped inverse of an indefinite Hessian, as an explicit LU solve gives it.

    Args:
        op: the symmetric curvature ``A``: a LinOp or a dense ``[P, P]`` tensor.
        damping: absolute damping ``>= 0`` added to ``A``.
        rtol, atol: a row stops when ``||b - (A + damping I) x|| <= max(rtol ||b||, atol)``.
        max_iter: iterations at most per call; default ``10 * P``.

    Returns:
        A LinOp on ``[k, P]`` rows (or a ``[P]`` vector).

    Raises:
        TypeError/ValueError: as :func:`~dattri_fn.solve.ihvp_cg`.

    Note:
        Rows that do not reach the tolerance warn ("raise max_iter or damping"). A singular
        ``A + damping I`` gives the minimum-residual iterate, not an error.

    References:
        Paige & Saunders (1975), Solution of sparse indefinite systems of linear equations,
        SIAM J. Numer. Anal. 12(4).

    Example:
        >>> A = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
        >>> x = ihvp_minres(A, rtol=1e-12)(torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([0.5, -1.0], dtype=torch.float64))
        True
    """
    func = "ihvp_minres"
    A = as_operator(func, op)
    damping, rtol, atol, max_iter = _validate(func, damping, rtol, atol, max_iter, A.dim)
    matmat = _damped(A, damping)

    def solve(V: Tensor) -> Tensor:
        check_rhs(func, V, A.dtype, A.device)
        tol = torch.clamp(rtol * V.norm(dim=1), min=atol)
        X, _, res = _minres(matmat, V, tol, max_iter)
        bad = int((res > tol).sum())
        if bad:
            warnings.warn(f"{func}: {bad} of {V.shape[0]} rows did not reach the tolerance in "
                          f"{max_iter} iterations; raise max_iter or damping.", RuntimeWarning,
                          stacklevel=3)
        return X

    return LinOp(solve, A.dim, A.dtype, A.device, name=func)
