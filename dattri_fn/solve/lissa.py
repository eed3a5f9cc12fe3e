"""LiSSA: the stochastic Neumann-series estimate of the damped inverse from mini-batch curvature."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import _msg, check_int, check_positive
from .._types import Batch, LinOp
from ..operators.stochastic import SampledLinOp, sampled_op
from .cg import user_level
from .explicit import as_operator, check_rhs

# Divergence is tested every few steps (one device sync each), not every step.
_CHECK_EVERY = 16
# Slack over the (j+1)*||v|| bound, for rounding when a per-step map has norm exactly 1.
_SLACK = 1.01
# Full-batch residual |(A + dI) x - v| / |v| above which a row warns. The truncated series leaves
# exactly (I - (A + dI)/scale)^(depth+1) v; a converged answer's floor is rounding, about
# eps * kappa(A + dI) (review RH, depth 40 kappa: float32 1.5e-6 / 1.4e-5 / 1.6e-4 at kappa
# 1e2 / 1e3 / 1e4, float64 3e-13 at 1e4). So in float32 1e-3 flags truncation (and a singular A's
# unreachable part), never rounding, up to kappa ~5e4; past that, convergence itself needs a depth
# of order kappa * ln(1/1e-3) > 3e5 steps, not met in practice. In bfloat16/float16 (eps 8e-3 /
# 1e-3) the floor is at or above 1e-3 and every call warns: there the remedy is float32. Rows
# whose residual is this large give scores off by the same order or more.
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
            worst (raise ``depth`` or ``damping``; in bfloat16/float16 rounding alone exceeds
            it: compute in float32). Mini-batches (no residual: it needs the full curvature):
            once per operator, when the settings alone leave ``(1 - damping/scale)^(depth+1)
            > 1e-3`` of ``v`` along A's flattest directions, naming the curvature below which
            directions are truncated and the depth that reaches the damping floor.

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
            _note_truncation(func, A, damping, scale, depth, keep)
        return X

    return LinOp(solve, dim, dtype, device, name=func)


def _check_residual(func: str, A: LinOp, X: Tensor, V: Tensor, vnorm: Tensor, damping: float,
                    depth: int) -> None:
    """Warn for rows with ``|(A + damping I) x - v| / |v| > _RTOL`` (one more product)."""
    if V.shape[0] == 0:  # no rows: nothing to check (and max() of nothing raises)
        return
    res = (A.matmat(X) + damping * X - V).norm(dim=1)
    rel = res / vnorm.clamp_min(torch.finfo(vnorm.dtype).tiny)
    num, worst = (float(t) for t in torch.stack([(rel > _RTOL).sum().to(rel.dtype), rel.max()]))
    if num:
        warnings.warn(f"{func}: {int(num)} of {V.shape[0]} rows have relative residual "
                      f"|(A + damping I) x - v| / |v| above {_RTOL:g} after depth={depth} steps "
                      f"(worst {worst:.3g}): the series is truncated, or A + damping I is "
                      f"singular or ill-conditioned. Raise depth (now {depth}) or damping (now "
                      f"{damping:g}).", RuntimeWarning, stacklevel=user_level())


def _note_truncation(func: str, A: SampledLinOp, damping: float, scale: float, depth: int,
                     keep: float) -> None:
    """Mini-batch LiSSA: warn when the settings alone leave ``keep^(depth+1) > _RTOL`` of ``v``
    along an eigendirection of ``A + damping I`` at the damping floor (no product is taken).
    ``|1 - mu/scale|^(depth+1) <= _RTOL`` holds for ``mu >= cut``, the number in the message."""
    if keep ** (depth + 1) <= _RTOL:
        return
    cut = scale * (1.0 - _RTOL ** (1.0 / (depth + 1)))
    need = (f"depth >= {math.ceil(math.log(_RTOL) / math.log(keep)) - 1}" if damping > 0
            else "damping > 0")
    warnings.warn(f"{func}: on mini-batch curvature (batch_size={A.batch_size} of {A.n} rows) "
                  f"the truncation at depth={depth} is unchecked by a residual (it needs the "
                  f"full curvature). From the settings alone (scale={scale:g}, "
                  f"damping={damping:g}), more than {_RTOL:g} of v is left along directions where "
                  f"A + damping I is below {cut:.3g}; every direction is reached with {need}. "
                  f"To check an answer, compare it with depth={2 * depth}.", RuntimeWarning,
                  stacklevel=user_level())


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
