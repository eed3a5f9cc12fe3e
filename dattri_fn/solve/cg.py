"""Conjugate gradient on many right-hand sides at once, with its diagnostics kept."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import all_finite, check_optional_int, check_positive, check_tensor
from .._types import LinOp, as_linop
from .explicit import as_operator, check_rhs

# The stopping test costs one device sync; doing it every few iterations keeps the loop
# asynchronous, and the extra iterations are no-ops on frozen rows.
_CHECK_EVERY = 4


class CGResult(NamedTuple):
    """What :func:`cg_solve` returns; per-row fields are ``[k]`` (0-d for a ``[P]`` input).

    Fields:
        x: the solutions ``[k, P]``.
        num_iters: CG steps each row took before it converged or stopped (int64).
        residual_norm: the recursively updated ``||b - (A + damping*I) x||`` per row; for a
            float16/bfloat16 system the true one, from one more product at the end.
        converged: ``residual_norm <= max(rtol * ||b||, atol)`` and no negative curvature.
        negative_curvature: the row met ``p^T (A + damping*I) p <= 0`` and was stopped there.
    """

    x: Tensor
    num_iters: Tensor
    residual_norm: Tensor
    converged: Tensor
    negative_curvature: Tensor


NEGATIVE_CURVATURE = ("stop", "continue")
# Half-precision CG's recursive residual drifts from the true one (float16's r^T r underflows to
# 0, review RF M2: "converged" at a true residual of 1e-3 to 2e-2): these dtypes are judged on
# the true residual, one more operator product at the end.
HALF = (torch.float16, torch.bfloat16)



def user_level() -> int:
    """``warnings.warn``'s ``stacklevel``, for the function calling this, of the first frame
    outside dattri_fn: a solver's warning points at the user's line whether the user called the
    solver or a method (``influence``) that did."""
    from ..transforms.layer_grads_plan import user_stacklevel

    return user_stacklevel() - 1

def _wider(dtype: torch.dtype) -> list[str]:
    eps = torch.finfo(dtype).eps
    return [w for w in ("float32", "float64") if torch.finfo(getattr(torch, w)).eps < eps]


def resolution_warning(func: str, rtol: float, atol: float, dtype: torch.dtype) -> None:
    """Warn when ``rtol`` (with ``atol = 0``) is below ``eps(dtype)``: no solve in ``dtype``
    can reach or check a relative residual that small."""
    eps = torch.finfo(dtype).eps
    if rtol >= eps or atol > 0:
        return
    dt, wider = str(dtype)[6:], _wider(dtype)
    how = ("rows are judged on their true residual ||b - (A + damping I) x||, formed once at "
           "the end" if dtype in HALF else "a row's recursively updated residual can meet it "
           "while its true residual ||b - (A + damping I) x|| stays above it")
    fix = f"compute in {' or '.join(wider)}, or " if wider else ""
    warnings.warn(f"{func}(rtol=...): expected rtol >= {eps:.3g}, what {dt} resolves, got "
                  f"rtol={rtol:g} with atol=0; {how}. {(fix + 'pass').capitalize()} "
                  f"rtol >= {eps:.3g}.", RuntimeWarning, stacklevel=user_level())


def true_residual(matmat, B: Tensor, X: Tensor) -> Tensor:
    """``||B_i - (A + damping I) X_i||`` in float32, from one more operator product.  # [k]"""
    return (B.float() - matmat(X).float()).norm(dim=1)


def _cg(matmat, B: Tensor, X: Tensor | None, tol: Tensor, max_iter: int, precond=None,
        stop_on_negative: bool = True):
    """Bare batched CG on rows from ``X`` (zeros if None): no validation, ``tol`` is ``[k]``.

    At each stopping check, rows that are done leave the batch once they are a quarter of it:
    the operator, the expensive part, then runs only on rows still iterating. ``precond``:
    ``R -> M R`` rows (preconditioned CG: directions from ``z = M r``, steps ``r^T z / p^T A p``);
    the stopping test stays on ``||r||``. ``stop_on_negative=False``: a row goes on through
    ``p^T A p < 0`` (flagged all the same) and stops only at ``p^T A p = 0``, where the
    recurrence breaks down.
    """
    k = B.shape[0]
    if X is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        R = B - matmat(X)
    Z = R if precond is None else precond(R)
    Pdir = Z.clone()
    rs = (R * R).sum(1)
    rz = rs if precond is None else (R * Z).sum(1)
    tol2 = tol * tol
    active = rs > tol2
    iters = torch.zeros(k, dtype=torch.int64, device=B.device)
    negative = torch.zeros_like(active)
    out = [X.clone(), iters.clone(), rs.clone(), negative.clone()]
    rows = torch.arange(k, device=B.device)

    def retire(mask: Tensor) -> None:
        for buf, live in zip(out, (X, iters, rs, negative), strict=True):
            buf[rows[mask]] = live[mask]

    for it in range(max_iter):
        if it % _CHECK_EVERY == 0:
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active <= 3 * rows.numel() // 4:
                retire(~active)
                X, R, Pdir, rs, rz, tol2, iters, negative, rows = (
                    t[active] for t in (X, R, Pdir, rs, rz, tol2, iters, negative, rows))
                active = torch.ones_like(rs, dtype=torch.bool)
        AP = matmat(Pdir)
        pAp = (Pdir * AP).sum(1)
        neg = active & (pAp <= 0)
        negative |= neg
        step = active & ~neg if stop_on_negative else active & (pAp != 0)
        # Frozen rows get alpha = beta = 0: x and r stay put; the safe denominators only avoid
        # 0/0 in the lanes torch.where discards.
        alpha = torch.where(step, rz / torch.where(step, pAp, 1.0), 0.0)
        X = X.addcmul(alpha[:, None], Pdir)
        R = R.addcmul(alpha[:, None], AP, value=-1.0)
        rs_new = (R * R).sum(1)
        if precond is None:
            Z, rz_new = R, rs_new
        else:
            Z = precond(R)
            rz_new = (R * Z).sum(1)
        beta = torch.where(step, rz_new / torch.where(step, rz, 1.0), 0.0)
        Pdir = Z.addcmul(beta[:, None], Pdir)
        rs = torch.where(step, rs_new, rs)
        rz = torch.where(step, rz_new, rz)
        iters += step
        active = step & (rs_new > tol2)
    retire(torch.ones_like(rs, dtype=torch.bool))
    X, iters, rs, negative = out
    converged = (rs <= tol * tol) & (~negative if stop_on_negative else True)
    return X, iters, rs.sqrt(), converged, negative


def _judged(matmat, B: Tensor, res: tuple, tol: Tensor, stop_on_negative: bool):
    """``res`` judged on the true residual for a half dtype (its recursive one cannot be
    trusted), with the mask of rows whose recursive residual met ``tol`` and the true one did
    not; other dtypes pass through (no product, the same bits)."""
    X, iters, norms, converged, negative = res
    if B.dtype not in HALF:
        return res, torch.zeros_like(converged)
    true = true_residual(matmat, B, X)
    reached = true <= tol.float()
    claimed = converged & ~reached
    converged = reached & ~negative if stop_on_negative else reached
    return (X, iters, true.to(norms.dtype), converged, negative), claimed


def _warn_and_check(func: str, res: tuple, B: Tensor, rtol, atol, max_iter, damping,
                    stop_on_negative: bool = True, claimed=None) -> None:
    X, iters, res_norm, converged, negative = res
    if not all_finite(X):
        raise ValueError(f"{func}(op=...): expected an operator returning finite values, got "
                         f"NaN or inf in the CG iterates. Check the curvature operator.")
    num_neg, num_bad = (int(c) for c in torch.stack([negative.sum(), (~converged).sum()]))
    k = B.shape[0]
    if not stop_on_negative:  # the literal inverse was asked for: only non-convergence warns
        num_neg = 0
        negative = torch.zeros_like(negative)
    if num_neg:
        warnings.warn(
            f"{func}: negative curvature p^T (A + damping*I) p <= 0 met in {num_neg} of {k} "
            f"rows (the operator is indefinite or singular); those rows stopped at their last "
            f"iterate (negative_curvature=True). Raise damping (now {damping:g}) above "
            f"-lambda_min(A).", RuntimeWarning, stacklevel=user_level())
    num_slow = num_bad - num_neg
    if not num_slow:
        return
    slow = ~converged & ~negative
    rel = res_norm / B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
    hint = "" if stop_on_negative else " (or use ihvp_minres for an indefinite operator)"
    claimed = torch.zeros_like(slow) if claimed is None else claimed & slow
    ran = slow & ~claimed & (iters >= max_iter)
    broke = slow & ~claimed & (iters < max_iter)  # p^T A p = 0 with negative_curvature="continue"
    if not bool(claimed.any() | broke.any()):
        warnings.warn(
            f"{func}: {num_slow} of {k} rows did not reach rtol={rtol:g}, atol={atol:g} within "
            f"max_iter={max_iter} (worst relative residual {float(rel[slow].max()):.3g}). Raise "
            f"max_iter, or raise damping (now {damping:g}) to improve the conditioning{hint}.",
            RuntimeWarning, stacklevel=user_level())
        return
    dt = str(B.dtype)[6:]
    parts, fixes = [], []
    for rows, why, fix in (
            (ran, f"ran max_iter={max_iter} steps", "raise max_iter"),
            (broke, "stopped after {steps} at a breakdown, p^T (A + damping*I) p = 0",
             "use ihvp_minres"),
            (claimed, "met it on the recursively updated residual after {steps}, not on the "
             f"true residual ||b - (A + damping*I) x|| ({dt} rounding)",
             f"compute in {' or '.join(_wider(B.dtype)) or 'a wider dtype'}")):
        if bool(rows.any()):
            lo, hi = int(iters[rows].min()), int(iters[rows].max())
            steps = f"{hi} steps" if lo == hi else f"{lo} to {hi} steps"
            parts.append(f"{int(rows.sum())} {why.format(steps=steps)}, worst relative residual "
                         f"{float(rel[rows].max()):.3g}")
            fixes.append(fix)
    fix = " or ".join(fixes)
    warnings.warn(
        f"{func}: {num_slow} of {k} rows did not reach rtol={rtol:g}, atol={atol:g}: "
        f"{'; '.join(parts)}. {fix[0].upper() + fix[1:]}, or raise damping (now {damping:g}) to "
        f"improve the conditioning.", RuntimeWarning, stacklevel=user_level())


def _negative_rule(func: str, negative_curvature) -> bool:
    """``True`` for ``"stop"`` (the default rule), ``False`` for ``"continue"``."""
    if negative_curvature not in NEGATIVE_CURVATURE:
        raise ValueError(f"{func}(negative_curvature=...): expected 'stop' or 'continue', got "
                         f"{negative_curvature!r}.")
    return negative_curvature == "stop"


def _validate(func: str, damping, rtol, atol, max_iter, dim: int):
    damping = check_positive(func, "damping", damping, allow_zero=True)
    rtol = check_positive(func, "rtol", rtol, allow_zero=True)
    atol = check_positive(func, "atol", atol, allow_zero=True)
    max_iter = check_optional_int(func, "max_iter", max_iter)
    return damping, rtol, atol, 10 * dim if max_iter is None else max_iter


def _damped(A: LinOp, damping: float):
    if damping == 0.0:
        return A.matmat
    return lambda V: A.matmat(V).add(V, alpha=damping)


def _preconditioner(func: str, M, A: LinOp, damping: float):
    """``M`` as a bare row map (None stays None), checked against ``A``'s size and dtype;
    ``"nystrom"`` builds :func:`~dattri_fn.solve.nystrom.nystrom_preconditioner` of ``A``."""
    if M is None:
        return None
    if isinstance(M, str):
        if M != "nystrom":
            raise ValueError(f"{func}(M=...): expected None, 'nystrom', a LinOp or a [P, P] "
                             f"tensor, got {M!r}.")
        if damping <= 0:
            raise ValueError(f"{func}(M=...): expected damping > 0 with M='nystrom' (its "
                             f"inverse is of A + damping I, the sketch of a positive "
                             f"semi-definite A), got damping={damping:g}. Pass the damping as "
                             f"damping=, not inside the operator: {func}(A, damping=0.1, "
                             f"M='nystrom'), not {func}(A + 0.1, M='nystrom').")
        from .nystrom import nystrom_preconditioner

        return nystrom_preconditioner(A, damping=damping, func=func).matmat
    if isinstance(M, Tensor):
        check_tensor(func, "M", M, ndim=2, floating=True)
        if M.shape[0] != M.shape[1]:
            raise ValueError(f"{func}(M=...): expected a square [P, P] tensor, got "
                             f"{list(M.shape)}.")
    elif not isinstance(M, LinOp):
        raise TypeError(f"{func}(M=...): expected None, a LinOp or a [P, P] tensor, got "
                        f"{type(M).__name__}.")
    op = as_linop(M, name=f"{func}(M=...)")
    if op.dim != A.dim:
        raise ValueError(f"{func}(M=...): expected a preconditioner of size P = {A.dim}, got "
                         f"{op.dim}.")
    return op.matmat


def cg_solve(op, B: Tensor, *, damping: float = 0.0, rtol: float = 1e-6, atol: float = 0.0,
             max_iter: int | None = None, x0: Tensor | None = None, M=None,
             negative_curvature: str = "stop") -> CGResult:
    """Return X with (A + damping*I) X_i = B_i by conjugate gradient, per row.  # [k, P] -> [k, P]

    All ``k`` rows run together as one batched CG (per-row step sizes, one operator call per
    iteration on all rows); a row stops when its residual satisfies
    ``||r|| <= max(rtol * ||b||, atol)`` and is frozen from then on.

    Args:
        op: the symmetric curvature ``A``: a LinOp or a dense ``[P, P]`` tensor.
        B: right-hand sides ``[k, P]`` or one ``[P]`` vector, same dtype/device as ``op``.
        damping: absolute damping ``>= 0`` added to ``A``.
        rtol: relative residual tolerance (``>= 0``).
        atol: absolute residual tolerance (``>= 0``).
        max_iter: CG steps at most; default ``10 * P``.
        x0: initial guess shaped like ``B``; default zeros.
        M: a symmetric positive-definite preconditioner ``M ~ (A + damping*I)^-1`` (a LinOp or
            a dense ``[P, P]`` tensor, e.g. ``ihvp_ekfac(...)``): preconditioned CG, fewer
            iterations when ``M`` is close; ``"nystrom"``: a randomized Nystrom sketch of
            ``A`` (:func:`~dattri_fn.solve.nystrom.nystrom_preconditioner`, rank 200, seed 0:
            one operator call on 200 rows), for ``A`` positive semi-definite and
            ``damping > 0``; ``None``: plain CG. Which helps (review RU4, a tanh MLP's
            Gauss-Newton, P = 1002, damping 1e-3: 95 plain CG iterations): ``"nystrom"`` when a
            few eigenvalues stand far above ``damping`` (32); K-FAC/EK-FAC only when the
            curvature is close to its layer-block Kronecker form (EK-FAC 90-112 here: none).
        negative_curvature: ``"stop"`` (default: the rule in the Note) or ``"continue"``: the
            literal ``(A + damping*I)^-1 B`` of an indefinite but nonsingular operator, as
            ``ihvp_explicit(method="lu")`` gives it. CG's recurrence goes on through
            ``p^T (A + damping*I) p < 0`` (the row is still flagged in ``negative_curvature``,
            without a warning) and stops only at ``p^T (A + damping*I) p = 0`` (breakdown);
            ``converged`` then means the residual test alone. In exact arithmetic CG reaches
            the solution within ``P`` steps whenever no breakdown occurs; rounding makes it
            slower and less reliable than for a positive-definite operator: MINRES
            (:func:`~dattri_fn.solve.ihvp_minres`) minimises the residual and is the robust
            solver for indefinite systems.

    Returns:
        A :class:`CGResult` with per-row diagnostics.

    Raises:
        TypeError: wrong kind of ``op``/``B``, or dtype mismatch.
        ValueError: wrong shapes, non-finite ``B``/``x0``, negative tolerances or damping,
            or an operator that produced non-finite values.

    Note:
        CG converges for symmetric positive-definite ``A + damping*I``, in at most ``P`` steps in
        exact arithmetic and fast when the condition number is small. Rows that did not
        converge within ``max_iter`` warn ("raise max_iter or damping"); ``rtol`` below the
        dtype's ``eps`` (with ``atol = 0``) warns up front. Negative-curvature rule:
        if ``p^T (A + damping*I) p <= 0`` for a row's search direction (indefinite curvature of a
        non-convex model), that row stops at its last iterate, is flagged in
        ``negative_curvature`` and a warning says to raise damping; no NaN is returned.
        ``negative_curvature="continue"`` keeps those directions (the literal inverse).

    References:
        Hestenes & Stiefel (1952), Methods of conjugate gradients for solving linear systems.
        Martens (2010), Deep learning via Hessian-free optimization (CG on curvature products).

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> B = torch.eye(2, dtype=torch.float64)
        >>> res = cg_solve(A, B, damping=0.5, rtol=1e-12)
        >>> torch.allclose(res.x, torch.linalg.inv(A + 0.5 * torch.eye(2, dtype=A.dtype)))
        True
    """
    func = "cg_solve"
    A = as_operator(func, op)
    damping, rtol, atol, max_iter = _validate(func, damping, rtol, atol, max_iter, A.dim)
    stop = _negative_rule(func, negative_curvature)
    if not isinstance(B, Tensor):
        raise TypeError(f"{func}(B=...): expected a torch.Tensor, got {type(B).__name__}.")
    vector = B.ndim == 1
    B2 = B.unsqueeze(0) if vector else B
    check_tensor(func, "B", B2, ndim=2, dim_size={1: A.dim})
    check_rhs(func, B2, A.dtype, A.device)
    X0 = None
    if x0 is not None:
        check_tensor(func, "x0", x0, ndim=B.ndim)
        if x0.shape != B.shape:
            raise ValueError(f"{func}(x0=...): expected shape {list(B.shape)} (like B), "
                             f"got {list(x0.shape)}.")
        X0 = check_rhs(func, x0.unsqueeze(0) if vector else x0, A.dtype, A.device)
    resolution_warning(func, rtol, atol, A.dtype)
    tol = torch.clamp(rtol * B2.norm(dim=1), min=atol)
    precond = _preconditioner(func, M, A, damping)
    matmat = _damped(A, damping)
    res, claimed = _judged(matmat, B2, _cg(matmat, B2, X0, tol, max_iter, precond, stop), tol,
                           stop)
    _warn_and_check(func, res, B2, rtol, atol, max_iter, damping,
                    stop_on_negative=stop, claimed=claimed)
    return CGResult(*(t.squeeze(0) for t in res)) if vector else CGResult(*res)


def ihvp_cg(op, *, damping: float = 0.0, rtol: float = 1e-6, atol: float = 0.0,
            max_iter: int | None = None, M=None, negative_curvature: str = "stop") -> LinOp:
    """Return V -> (A + damping*I)^-1 V by conjugate gradient, per row.  # [k, P] -> [k, P]

    The operator form of :func:`cg_solve` (settings validated here, once); every call runs a
    fresh batched CG from zero on all rows of ``V`` and warns like :func:`cg_solve`.

    Args:
        op: the symmetric curvature ``A``: a LinOp or a dense ``[P, P]`` tensor.
        damping: absolute damping ``>= 0`` added to ``A``.
        rtol: relative residual tolerance per row.
        atol: absolute residual tolerance per row.
        max_iter: CG steps at most per call; default ``10 * P``.
        M: a preconditioner, as in :func:`cg_solve`.
        negative_curvature: ``"stop"`` (default) or ``"continue"`` (the literal inverse of
            an indefinite operator), as in :func:`cg_solve`.

    Returns:
        A LinOp on ``[k, P]`` rows (or a ``[P]`` vector).

    Raises:
        TypeError/ValueError: as :func:`cg_solve`, at construction for the settings and at
            call time for ``V``.

    Note:
        See :func:`cg_solve` for convergence and the negative-curvature rule. Solutions are
        accurate to ``rtol``, so ``op(V)`` is linear in ``V`` only up to that tolerance.

    References:
        Koh & Liang (2017), Understanding black-box predictions via influence functions,
        arXiv 1703.04730 (CG for inverse-Hessian-vector products).
    """
    func = "ihvp_cg"
    A = as_operator(func, op)
    damping, rtol, atol, max_iter = _validate(func, damping, rtol, atol, max_iter, A.dim)
    matmat = _damped(A, damping)
    precond = _preconditioner(func, M, A, damping)
    stop = _negative_rule(func, negative_curvature)

    def solve(V: Tensor) -> Tensor:
        check_rhs(func, V, A.dtype, A.device)
        tol = torch.clamp(rtol * V.norm(dim=1), min=atol)
        res, claimed = _judged(matmat, V, _cg(matmat, V, None, tol, max_iter, precond, stop),
                               tol, stop)
        _warn_and_check(func, res, V, rtol, atol, max_iter, damping,
                        stop_on_negative=stop, claimed=claimed)
        return res[0]

    return LinOp(solve, A.dim, A.dtype, A.device, name=func)
