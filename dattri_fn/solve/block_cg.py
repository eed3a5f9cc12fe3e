"""Block conjugate gradient: the right-hand sides share one Krylov space.

Plain CG (:func:`~dattri_fn.solve.cg_solve`) runs ``k`` independent recurrences side by side;
after ``j`` steps each row's iterate minimises its error over its own ``j``-dimensional Krylov
space. Block CG (O'Leary 1980) lets every row minimise over the SUM of the rows' spaces, ``k j``
dimensions after ``j`` steps, for the same one operator call on ``k`` rows per step. Where the
right-hand sides are many and related (influence's test gradients: 200 rows of one network's
gradients) the shared space reaches the top of the spectrum in a few steps: on the digits MLP
(``P = 9,610``, 1,000 examples, 200 rows, ``rtol = 1e-6``) plain CG took 55 steps, block CG 6
(benchmarks/RESULTS.md).

One step, with ``Pd`` an orthonormal ``[m, P]`` basis of the new search directions
(rows), ``Q = (A + damping I) Pd`` and ``S = Pd Q^T`` (``[m, m]``, positive definite):

    alpha = S^-1 Pd R^T,   X += alpha^T Pd,   R -= alpha^T Q,
    beta = -S^-1 Q Z^T,    Pd = orth(Z + beta^T Pd)     (Z = M R, or R without M),

which keeps the new directions ``(A + damping I)``-conjugate to the last block. Orthonormalising
each block (Householder QR) is what makes the method breakdown-free: rows that become linearly
dependent (equal right-hand sides, a zero row, rows that converge together) leave ``S`` positive
definite instead of singular (Ji & Li 2017). A row whose residual meets its tolerance leaves the
block (deflation), so the block shrinks as rows converge and no step is spent on them.

Cost per step, past the operator call: eight GEMMs of about ``2 P m k`` flops each (``m <= k``
directions: ``S``, ``Pd R^T``, the ``X`` and ``R`` updates, ``Q Z^T``, the new block, its Gram
and its Cholesky-QR product), with the blocks held as ``[P, m]`` columns; it pays when the
operator's product on ``k`` rows costs more than that, as curvature products do (the
Gauss-Newton of an MLP over ``N`` examples costs ``~4 N k P``). Rows beyond ``block_size`` are
solved in groups of that size.

References:
    O'Leary, "The block conjugate gradient algorithm and related methods", Linear Algebra
    Appl. 29 (1980). Ji & Li, "A breakdown-free block conjugate gradient method", BIT 57 (2017).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._checks import all_finite, check_int, check_optional_int, check_positive, check_tensor
from .._types import LinOp
from .cg import (
    HALF,
    CGResult,
    _damped,
    _preconditioner,
    _wider,
    resolution_warning,
    true_residual,
    user_level,
)
from .explicit import as_operator, check_rhs

__all__ = ["NotPositiveDefiniteError", "block_cg_solve", "ihvp_block_cg"]

# Rows per shared Krylov space: the per-step block algebra grows as P k^2, the steps fall with k.
# 600 rows on the P = 9,610 MLP's Gauss-Newton (1,000 examples), groups of 100/200/300/600:
# 9/6/5/4 steps, 10.5/8.2/7.7/7.9 s of CPU (one thread).
DEFAULT_BLOCK = 256
DROP = 1.0  # a block column is dependent when |R_jj| <= DROP * sqrt(eps) (see _orth)
# Below float64, a block whose Cholesky pivots from its own-dtype Gram all exceed
# max(FAST, sqrt(FAST_MARGIN sqrt(P) eps)) is factored from that Gram; smaller pivots are decided
# from a float64 Gram. Why: an entry of the unit-column Gram is rounded by ~sqrt(P) eps / 2, and
# the basis W T then misses orthonormality by ~(that rounding) / pivot^2; so the squared pivot
# must exceed the rounding by a margin that does not shrink as P grows. FAST_MARGIN = 8 keeps
# the margin FAST = 1e-2 had at P = 9,610 in float32 (pivot^2 1e-4 against 5.8e-6; the bar
# there stays FAST, 8 sqrt(P) eps = 9.3e-5); at P = 3e6 the bar is a pivot of 0.041 (measured:
# a pivot of 0.02 there left |Pd^T Pd - I| at 0.19 from the float32 Gram, 8e-6 from the
# float64 one).
FAST = 1e-2
FAST_MARGIN = 8.0


class NotPositiveDefiniteError(ValueError):
    """Block CG met a block of directions on which ``op + damping I`` is not positive definite
    (a caller may fall back to :func:`~dattri_fn.solve.cg_solve` and its negative-curvature rule)."""


def fast_pivot(P: int, dtype: torch.dtype) -> float:
    """The smallest Cholesky pivot of a unit-column Gram formed in ``dtype`` over ``P`` rows
    that :func:`_orth` trusts: ``max(FAST, sqrt(FAST_MARGIN sqrt(P) eps))``."""
    return max(FAST, (FAST_MARGIN * P ** 0.5 * torch.finfo(dtype).eps) ** 0.5)


def _orth(W: Tensor) -> Tensor:
    """A well-conditioned basis of ``W``'s columns, numerically dependent ones dropped.  # [P, m] -> [P, m']

    The columns are taken at unit norm; a column within ``sqrt(eps)`` (relative) of the span of
    the columns before it is dependent (Ji & Li's breakdown-free rule): it is dropped, so the
    block stays a basis of the Krylov space, conjugate to the earlier blocks (a junk direction
    kept in its place breaks that conjugacy and slows CG down). Below float64, Cholesky-QR: the
    Gram matrix ``W^T W`` (its Cholesky pivots, after the unit-norm scaling ``D``, are the
    ``|R_jj|`` of a QR; formed in float64 unless the block is clearly independent) and one
    product ``W (D^-1 L^-T)``, the scaling folded into the ``[m, m]`` factor: 30-43 against
    69 ms of CPU for Householder QR at ``[9610, 200]`` float32. The basis is orthonormal to
    about ``eps * cond(W)^2``, which block CG does not need exactly (it forms
    ``Pd^T A Pd`` from the basis it has). In float64, or when a column is dependent,
    Householder QR (dependent columns dropped, the rest factored again: the first
    factorisation's later columns carry a component of the dropped one's arbitrary direction).
    """
    floor = DROP * torch.finfo(W.dtype).eps ** 0.5
    tiny = torch.finfo(W.dtype).tiny

    def unit_cholesky(gram: Tensor):
        d = gram.diagonal().clamp_min(tiny).rsqrt()
        L, info = torch.linalg.cholesky_ex(gram * d[:, None] * d[None, :])
        return d, L, int(info) == 0 and float(L.diagonal().min()) > floor

    if W.dtype != torch.float64:
        # the Gram in W's dtype first: its rounding (~sqrt(P) eps on unit columns) is far below
        # the squared pivots of a block whose pivots exceed fast_pivot; others are decided in
        # float64
        d, L, ok = unit_cholesky((W.T @ W).double())
        if not ok or float(L.diagonal().min()) <= fast_pivot(W.shape[0], W.dtype):
            W64 = W.double()
            d, L, ok = unit_cholesky(W64.T @ W64)
        if ok:
            # (L^-1)^T as a matrix ([m, m], float64), then one GEMM: a triangular solve with
            # P right-hand sides ran at a tenth of the GEMM's rate
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            T = d[:, None] * torch.linalg.solve_triangular(L, eye, upper=False).T
            return W @ T.to(W.dtype)
    W = W / W.norm(dim=0).clamp_min(tiny)
    # torch has no half-precision QR (geqrf): float16/bfloat16 blocks factor in float32, their
    # Q rounded back once (RU3 M4)
    low = W.dtype in (torch.float16, torch.bfloat16)
    Q, R = torch.linalg.qr(W.float() if low else W)
    kept = R.diagonal().abs() > floor
    if not bool(kept.all()):
        Q = torch.linalg.qr((W.float() if low else W)[:, kept]).Q
    return Q if low and torch.is_autocast_enabled(W.device.type) else Q.to(W.dtype)


def _block(matmat, precond, B: Tensor, tol: Tensor, max_iter: int, where: str):
    """Bare breakdown-free block PCG on the rows of ``B`` (one shared space); no validation.

    Returns ``(X, iters, residual_norm, spent)``: ``iters[i]`` is the number of steps row ``i``
    took before its residual met ``tol[i]`` (or ``max_iter``); ``spent[i]``: row ``i`` stopped
    short of both, when no new direction was independent at the dtype's precision. Inside, the
    blocks are held as columns (``[P, m]``): the updates ``X += Pd alpha`` then write a
    column-major ``[P, k]``, twice the GEMM rate of ``alpha^T Pd`` into a row-major ``[k, P]``
    (13 against 24 ms at ``P = 9,610``, ``k = 200``, float32); the operator and ``M`` still get
    contiguous rows.
    """
    k = B.shape[0]
    X = torch.zeros_like(B)
    iters = torch.zeros(k, dtype=torch.int64, device=B.device)
    spent = torch.zeros(k, dtype=torch.bool, device=B.device)
    norms = B.norm(dim=1)
    rows = torch.nonzero(norms > tol).flatten()  # rows still iterating
    if rows.numel() == 0 or max_iter == 0:
        return X, iters, norms, spent
    op = lambda C: matmat(C.T.contiguous()).T  # noqa: E731  [P, m] -> [P, m]
    M = None if precond is None else (lambda C: precond(C.T.contiguous()).T)  # noqa: E731
    R = B[rows].T.contiguous()  # [P, k_active]
    Xa = torch.zeros_like(R)
    Z = R if M is None else M(R)
    Pd = _orth(Z)
    for _ in range(max_iter):
        if Pd.shape[1] == 0:  # every new direction dependent at this precision (float16): the
            spent[rows] = True  # Krylov space is spent; the residuals stand as they are
            break
        Q = op(Pd)
        S = (Pd.T @ Q).double()
        S = (S + S.T) / 2
        if not all_finite(S):
            raise ValueError(f"{where}: expected an operator returning finite values, got NaN "
                             f"or inf in the block CG products. Check the curvature operator.")
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            raise NotPositiveDefiniteError(f"{where}: expected a positive-definite op + damping I, got "
                             f"a block of directions p with p^T (A + damping I) p not positive "
                             f"definite. Raise damping, or use cg_solve (its negative-curvature "
                             f"rule) for an indefinite operator.")
        alpha = torch.cholesky_solve((Pd.T @ R).double(), L).to(B.dtype)  # [m, k_active]
        Xa.addmm_(Pd, alpha)
        R.addmm_(Q, alpha, alpha=-1.0)
        iters[rows] += 1
        rnorm = R.norm(dim=0)
        done = rnorm <= tol[rows]
        if bool(done.any()):  # deflate: converged rows leave the block
            X[rows[done]] = Xa[:, done].T
            norms[rows[done]] = rnorm[done]
            keep = ~done
            rows, R, Xa = rows[keep], R[:, keep], Xa[:, keep]
            if rows.numel() == 0:
                return X, iters, norms, spent
        Z = R if M is None else M(R)
        beta = torch.cholesky_solve((Q.T @ Z).double(), L).to(B.dtype)  # [m, k_active]
        Pd = _orth(torch.addmm(Z, Pd, beta, alpha=-1.0))
    X[rows] = Xa.T
    norms[rows] = R.norm(dim=0)
    return X, iters, norms, spent


def _steps(iters: Tensor) -> str:
    lo, hi = int(iters.min()), int(iters.max())
    return f"{hi} steps" if lo == hi else f"{lo} to {hi} steps"


def _not_reached(func: str, V: Tensor, norms: Tensor, converged: Tensor, iters: Tensor,
                 spent: Tensor, claimed: Tensor, rtol, atol, max_iter: int, damping) -> str:
    """The warning for rows that missed the tolerance: how many, after how many steps, why they
    stopped (``max_iter`` run out, the Krylov space spent at the dtype's precision, or, in half
    precision, a recursive residual that met the tolerance where the true one did not) and the
    worst relative residual each group reached, with the remedy that fits."""
    rel = norms / V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
    dt, wider = str(V.dtype)[6:], _wider(V.dtype)
    precision = ((f"compute in {' or '.join(wider)}" if wider else "raise rtol or atol")
                 + f" (rtol={rtol:g}, atol={atol:g} is out of reach in {dt})")
    parts, fixes = [], []
    for rows, why, fix in (
            (~converged & ~spent & ~claimed, f"ran max_iter={max_iter} steps", "raise max_iter"),
            (~converged & spent, "stopped after {steps}, when no new search direction was "
             f"independent at {dt}'s precision (the Krylov space spent)", precision),
            (~converged & claimed, "met it on the recursively updated residual after {steps}, "
             f"not on the true residual ||b - (A + damping I) x|| ({dt} rounding)", precision)):
        if bool(rows.any()):
            parts.append(f"{int(rows.sum())} {why.format(steps=_steps(iters[rows]))}, worst "
                         f"relative residual {float(rel[rows].max()):.3g}")
            fixes.append(fix)
    fix = " or ".join(dict.fromkeys(fixes))
    return (f"{func}: {int((~converged).sum())} of {V.shape[0]} rows did not reach rtol={rtol:g}, "
            f"atol={atol:g}: {'; '.join(parts)}. {fix[0].upper() + fix[1:]}, or raise damping "
            f"(now {damping:g}) to improve the conditioning.")


def _settings(func: str, op, damping, rtol, atol, max_iter, M, block_size):
    A = as_operator(func, op)
    damping = check_positive(func, "damping", damping, allow_zero=True)
    rtol = check_positive(func, "rtol", rtol, allow_zero=True)
    atol = check_positive(func, "atol", atol, allow_zero=True)
    max_iter = check_optional_int(func, "max_iter", max_iter)
    max_iter = 10 * A.dim if max_iter is None else max_iter
    block_size = check_int(func, "block_size", block_size)
    matmat, precond = _damped(A, damping), _preconditioner(func, M, A, damping)
    return A, matmat, precond, damping, rtol, atol, max_iter, block_size


def _solve(func, where, matmat, precond, V: Tensor, rtol, atol, max_iter, block_size,
           damping) -> CGResult:
    tol = torch.clamp(rtol * V.norm(dim=1), min=atol)
    parts = [_block(matmat, precond, V[s:s + block_size], tol[s:s + block_size], max_iter, where)
             for s in range(0, V.shape[0], block_size)]
    X, iters, norms, spent = (torch.cat(t) for t in zip(*parts, strict=True))
    if not all_finite(X):
        raise ValueError(f"{where}: expected an operator returning finite values, got "
                         f"NaN or inf in the block CG iterates. Check the curvature operator.")
    converged = norms <= tol
    claimed = torch.zeros_like(converged)
    if V.dtype in HALF:  # the recursive residual cannot be trusted there (cg.HALF): the true one
        true = torch.cat([true_residual(matmat, V[s:s + block_size], X[s:s + block_size])
                          for s in range(0, V.shape[0], block_size)])
        claimed = converged & (true > tol.float())
        converged = true <= tol.float()
        norms = true.to(norms.dtype)
    if not bool(converged.all()):
        warnings.warn(_not_reached(func, V, norms, converged, iters, spent, claimed, rtol, atol,
                                   max_iter, damping), RuntimeWarning, stacklevel=user_level())
    return CGResult(X, iters, norms, converged, torch.zeros_like(converged))


def block_cg_solve(op, B: Tensor, *, damping: float = 0.0, rtol: float = 1e-6,
                   atol: float = 0.0, max_iter: int | None = None, M=None,
                   block_size: int = DEFAULT_BLOCK) -> CGResult:
    """Return X with (A + damping*I) X_i = B_i by block CG, all rows in one Krylov space.  # [k, P] -> [k, P]

    Same system and stopping rule as :func:`~dattri_fn.solve.cg_solve` (a row is done when
    ``||r|| <= max(rtol * ||b||, atol)`` and leaves the block), but every row's iterate is the
    best over the space that all the rows of its group have built (module docstring): fewer
    operator calls when the rows are many.

    Args:
        op: the symmetric positive semi-definite curvature ``A``: a LinOp or a ``[P, P]`` tensor.
        B: right-hand sides ``[k, P]`` or one ``[P]`` vector, same dtype/device as ``op``.
        damping: absolute damping ``>= 0``; ``A + damping*I`` must be positive definite.
        rtol, atol: relative and absolute residual tolerances (``>= 0``).
        max_iter: block steps at most per group; default ``10 * P``.
        M: a symmetric positive-definite preconditioner ``M ~ (A + damping*I)^-1`` (a LinOp or
            a ``[P, P]`` tensor), ``"nystrom"`` (a rank-200 sketch of ``A``, as in
            :func:`~dattri_fn.solve.cg_solve`) or ``None``.
        block_size: rows per shared space; more rows are solved in groups of this size.

    Returns:
        A :class:`~dattri_fn.solve.CGResult`: ``num_iters`` counts the steps of a row's group
        until the row converged; ``negative_curvature`` is all False (see Raises). A
        float16/bfloat16 system is judged on its true residual (one more product per group).

    Raises:
        TypeError, ValueError: as :func:`~dattri_fn.solve.cg_solve`; ``block_size < 1``; an
            operator whose damped block ``P^T (A + damping I) P`` is not positive definite
            (block CG has no negative-curvature rule: use ``cg_solve`` for indefinite ones).

    Note:
        In exact arithmetic a group of ``k`` independent rows converges within ``ceil(P / k)``
        steps. Rows that do not converge within ``max_iter`` warn, as in ``cg_solve``; ``rtol``
        below the dtype's ``eps`` (with ``atol = 0``) warns up front. Which
        rows share a group changes the iterates within the tolerance, not the solution.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> res = block_cg_solve(A, torch.eye(2, dtype=torch.float64), damping=0.5, rtol=1e-12)
        >>> torch.allclose(res.x, torch.linalg.inv(A + 0.5 * torch.eye(2, dtype=A.dtype)))
        True
    """
    func = "block_cg_solve"
    A, matmat, precond, damping, rtol, atol, max_iter, block_size = _settings(
        func, op, damping, rtol, atol, max_iter, M, block_size)
    if not isinstance(B, Tensor):
        raise TypeError(f"{func}(B=...): expected a torch.Tensor, got {type(B).__name__}.")
    vector = B.ndim == 1
    B2 = B.unsqueeze(0) if vector else B
    check_tensor(func, "B", B2, ndim=2, dim_size={1: A.dim})
    check_rhs(func, B2, A.dtype, A.device)
    resolution_warning(func, rtol, atol, A.dtype)
    res = _solve(func, f"{func}(op=...)", matmat, precond, B2, rtol, atol, max_iter, block_size,
                 damping)
    return CGResult(*(t.squeeze(0) for t in res)) if vector else res


def ihvp_block_cg(op, *, damping: float = 0.0, rtol: float = 1e-6, atol: float = 0.0,
                  max_iter: int | None = None, M=None,
                  block_size: int = DEFAULT_BLOCK, func: str = "ihvp_block_cg",
                  arg: str = "op") -> LinOp:
    """Return V -> (A + damping*I)^-1 V by block CG over V's rows.  # [k, P] -> [k, P]

    The operator form of :func:`block_cg_solve` (settings validated here, once; a sketch
    ``M="nystrom"`` built here, once); every call solves its rows from zero.

    Args:
        op, damping, rtol, atol, max_iter, M, block_size: as :func:`block_cg_solve`.
        func, arg: the call and argument the errors name (a caller that solves for its user,
            e.g. ``influence``'s ``if_cg(curvature=...)``).

    Raises:
        TypeError/ValueError: as :func:`block_cg_solve`, at construction for the settings and
            at call time for ``V``.

    Note:
        Solutions are accurate to ``rtol``: ``op(V)`` is linear in ``V``, and a row's value
        independent of the rows solved with it, only up to that tolerance.
    """
    A, matmat, precond, damping, rtol, atol, max_iter, block_size = _settings(
        func, op, damping, rtol, atol, max_iter, M, block_size)
    resolution_warning(func, rtol, atol, A.dtype)

    def solve(V: Tensor) -> Tensor:  # [k, P]: LinOp's call adds the row dim of a vector
        check_rhs(func, V, A.dtype, A.device)
        return _solve(func, f"{func}({arg}=...)", matmat, precond, V, rtol, atol, max_iter,
                      block_size, damping).x

    return LinOp(solve, A.dim, A.dtype, A.device, name=func)
