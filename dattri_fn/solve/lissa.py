"""LiSSA: the stochastic Neumann-series estimate of the damped inverse from mini-batch curvature."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import _msg, check_int, check_positive
from .._types import Batch, LinOp
from ..operators.stochastic import SampledLinOp, sampled_op
from .explicit import as_operator, check_rhs

# Divergence is tested every few steps (one device sync each), not every step.
_CHECK_EVERY = 16
# Slack over the (j+1)*||v|| bound, for rounding when a per-step map has norm exactly 1.
_SLACK = 1.01
# Full-batch residual |(A + dI) x - v| / |v| above which a row warns: the truncated series leaves
# exactly (I - (A + dI)/scale)^(depth+1) v, while float32 rounding over thousands of steps stays
# near 1e-5 (1e-13 in float64), so 1e-3 flags truncation (and a singular A's unreachable part),
# never rounding. Rows whose residual is this large give scores off by the same order or more.
_RTOL = 1e-3


def ihvp_lissa(op: LinOp | Tensor | Callable[[Batch], LinOp], data: Batch | None = None, *,
               damping: float = 0.0, scale: float, depth: int = 1000, repeats: int = 1,
               batch_size: int | None = None, seed: int | None = None) -> LinOp:
    """Return V -> (A + damping*I)^-1 V by the LiSSA recursion.  # [k, P] -> [k, P]

    For each row ``v``: ``h_0 = v``, ``h_j = v + h_{j-1} - (A_j h_{j-1} + damping h_{j-1}) / scale``
    and the result is ``h_depth / scale``. On a curvature ``op`` from
    :func:`~dattri_fn.operators.stochastic.sampled` ``A_j`` is the curvature of the j-th
    mini-batch it draws (seeded by the operator, so every call replays the same sequence and the
    returned operator is a fixed linear map), averaged over ``repeats`` independent runs; on any
    other curvature (a LinOp, a dense ``[P, P]`` matrix, K-FAC factors) ``A_j = A`` at every
    step: the deterministic full-batch Neumann series. The fixed point is
    ``h = scale * (A + damping*I)^-1 v``.

    The form before 0.1.0, ``ihvp_lissa(batch_op, data, batch_size=b, seed=s)``, is kept and
    equals ``ihvp_lissa(sampled(batch_op, data, batch_size=b, seed=s))`` bit for bit.

    Args:
        op: the curvature ``A``, the one kind of first argument of every ``ihvp_*``: a LinOp
            (a :class:`~dattri_fn.operators.stochastic.SampledLinOp` for mini-batches) or what
            :func:`~dattri_fn._types.as_linop` coerces. Old form: ``batch -> LinOp`` with ``data``.
        data: old form only: ONE Batch that ``op`` (then a ``batch_op``) draws rows of.
        damping: absolute damping ``>= 0``.
        scale: ``> 0``; must exceed the largest eigenvalue of every ``A_j + damping*I``.
        depth: recursion steps (operator calls per repeat), ``>= 1``.
        repeats: independent recursions averaged, ``>= 1`` (moot for a deterministic ``A_j``).
        batch_size, seed: old form only (rows per mini-batch, ``None`` = all of ``data``; the
            sampler's seed, ``None`` = 0); a curvature value carries its own.

    Returns:
        A LinOp on ``[k, P]`` rows (or a ``[P]`` vector).

    Raises:
        TypeError: ``op`` not a curvature (or, with ``data``, not callable); ``data`` not a
            Batch; wrong kind of setting.
        ValueError: ``damping < 0``, ``scale <= 0``, ints ``< 1``, ``batch_size > n``,
            ``batch_size``/``seed`` given with a curvature value; at call time, a recursion that
            diverges (says to raise ``scale``).

    Warns:
        RuntimeWarning: full batches: rows whose residual ``|(A + damping I) x - v| / |v|``
            (one more operator product per call) exceeds 1e-3, naming their count and the
            worst (raise ``depth`` or ``damping``). Mini-batches: once per operator, that the
            truncation is unchecked (a residual needs the full curvature).

    Note:
        Convergence: with full batches the error shrinks like ``max_i |1 - mu_i/scale|^depth``
        for the eigenvalues ``mu_i`` of ``A + damping*I``, so the recursion converges iff every
        ``mu_i`` lies in ``(0, 2*scale)``; the usual safe choice ``scale > lambda_max(A) +
        damping`` (and ``A + damping*I`` positive definite) makes every step a contraction, and
        ``depth >> scale / mu_min`` makes the truncation error small. Mini-batches add
        variance that does not vanish with depth (average ``repeats``; larger ``batch_size``).
        Divergence check: while every step is non-expansive, ``||h_j|| <= (j+1) ||v||``;
        a violation (or a non-finite value), tested every few steps, raises a ``ValueError``
        telling to raise ``scale`` (or ``damping`` for indefinite curvature).

    References:
        Agarwal, Bullins & Hazan (2017), Second-order stochastic optimization for machine
        learning in linear time, arXiv 1602.03943. Koh & Liang (2017), Understanding
        black-box predictions via influence functions, arXiv 1703.04730.

    Example:
        >>> from dattri_fn.operators.stochastic import sampled
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> x = ihvp_lissa(A, damping=0.5, scale=5.0, depth=300)(v)
        >>> torch.allclose(x, torch.linalg.solve(A + 0.5 * torch.eye(2, dtype=A.dtype), v))
        True
        >>> same = ihvp_lissa(sampled(lambda b: A, torch.zeros(4)), damping=0.5, scale=5.0,
        ...                   depth=300)(v)
        >>> torch.equal(x, same)
        True
    """
    func = "ihvp_lissa"
    if data is None:
        for arg, value in (("batch_size", batch_size), ("seed", seed)):
            if value is not None:
                raise ValueError(_msg(func, arg, "None with a curvature value", repr(value),
                                      "Mini-batches and their seed belong to the curvature: "
                                      "operators.sampled(batch_op, data, batch_size=..., "
                                      "seed=...)."))
        if callable(op) and not isinstance(op, (LinOp, Tensor)):
            raise TypeError(_msg(func, "op", "a curvature (a LinOp, a [P, P] Tensor, "
                                 "operators.sampled(batch_op, data, ...))", "a bare callable",
                                 "Pass the data too (ihvp_lissa(batch_op, data)) or wrap it: "
                                 "operators.sampled(batch_op, data)."))
    damping = check_positive(func, "damping", damping, allow_zero=True)
    scale = check_positive(func, "scale", scale)
    depth = check_int(func, "depth", depth)
    repeats = check_int(func, "repeats", repeats)
    if data is not None:
        A = sampled_op(func, "op", op, data, batch_size, 0 if seed is None else seed)
    else:
        A = op if isinstance(op, SampledLinOp) else as_operator(func, op)
    full = not isinstance(A, SampledLinOp) or A.full
    dim, dtype, device = A.dim, A.dtype, A.device
    keep = 1.0 - damping / scale

    def recursion(V: Tensor, vnorm: Tensor, draws) -> Tensor:
        H = V
        for j in range(1, depth + 1):
            step = A if full else next(draws)
            H = (H * keep).add_(V).sub_(step.matmat(H), alpha=1.0 / scale)
            if j % _CHECK_EVERY == 0 or j == depth:
                _check_divergence(func, H, vnorm, j, scale, damping)
        return H

    unchecked = [not full]  # the mini-batch note is said once per operator

    def solve(V: Tensor) -> Tensor:
        check_rhs(func, V, dtype, device)
        draws = None if full else A.draws()
        vnorm = V.norm(dim=1)
        runs = 1 if full else repeats
        total = recursion(V, vnorm, draws)
        for _ in range(runs - 1):
            total = total + recursion(V, vnorm, draws)
        X = total / (scale * runs)
        if full:
            _check_residual(func, A, X, V, vnorm, damping, depth)
        elif unchecked[0]:
            unchecked[0] = False
            warnings.warn(f"{func}: on mini-batch curvature (batch_size={A.batch_size} of "
                          f"{A.n} rows) the truncation at depth={depth} is unchecked: a residual "
                          f"needs the full curvature. Compare against 2*depth, or check once on "
                          f"the full curvature.", RuntimeWarning, stacklevel=3)
        return X

    return LinOp(solve, dim, dtype, device, name=func)


def _check_residual(func: str, A: LinOp, X: Tensor, V: Tensor, vnorm: Tensor, damping: float,
                    depth: int) -> None:
    """Warn for rows with ``|(A + damping I) x - v| / |v| > _RTOL`` (one more product)."""
    res = (A.matmat(X) + damping * X - V).norm(dim=1)
    rel = res / vnorm.clamp_min(torch.finfo(vnorm.dtype).tiny)
    num, worst = (float(t) for t in torch.stack([(rel > _RTOL).sum().to(rel.dtype), rel.max()]))
    if num:
        warnings.warn(f"{func}: {int(num)} of {V.shape[0]} rows have relative residual "
                      f"|(A + damping I) x - v| / |v| above {_RTOL:g} after depth={depth} steps "
                      f"(worst {worst:.3g}): the series is truncated, or A + damping I is "
                      f"singular or ill-conditioned. Raise depth (now {depth}) or damping (now "
                      f"{damping:g}).", RuntimeWarning, stacklevel=4)


def _check_divergence(func: str, H: Tensor, vnorm: Tensor, j: int, scale: float,
                      damping: float) -> None:
    hnorm = H.norm(dim=1)
    # NaN norms fail the <= test, so one reduction catches both blow-up and non-finite values.
    if not bool((hnorm <= (j + 1) * _SLACK * vnorm).all()):
        raise ValueError(
            f"{func}(scale=...): expected a convergent recursion (scale > lambda_max(A_batch) + "
            f"damping, A_batch + damping*I positive definite), got ||h_j|| > (j+1)*||v|| or a "
            f"non-finite value at step j={j}. Raise scale (now {scale:g}), or raise damping "
            f"(now {damping:g}) if the curvature is indefinite.")
