"""LiSSA: the stochastic Neumann-series estimate of the damped inverse from mini-batch curvature."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .._checks import batch_size as _batch_len
from .._checks import batch_slice, check_int, check_optional_int, check_positive
from .._types import Batch, LinOp, as_linop
from .explicit import check_rhs

# Divergence is tested every few steps (one device sync each), not every step.
_CHECK_EVERY = 16
# Slack over the (j+1)*||v|| bound, for rounding when a per-step map has norm exactly 1.
_SLACK = 1.01


def _take(batch: Batch, idx: Tensor) -> Batch:
    if isinstance(batch, Tensor):
        return batch[idx.to(batch.device)]
    if isinstance(batch, Mapping):
        return {k: v[idx.to(v.device)] for k, v in batch.items()}
    return type(batch)(v[idx.to(v.device)] for v in batch)


def ihvp_lissa(batch_op: Callable[[Batch], LinOp], data: Batch, *, damping: float = 0.0,
               scale: float, depth: int = 1000, repeats: int = 1, batch_size: int | None = None,
               seed: int = 0) -> LinOp:
    """Return V -> (A + damping*I)^-1 V by the LiSSA recursion, A = mean curvature.  # [k, P] -> [k, P]

    For each row ``v``: ``h_0 = v``, ``h_j = v + h_{j-1} - (A_j h_{j-1} + damping h_{j-1}) / scale``
    with ``A_j = batch_op(batch_j)`` the curvature on the j-th mini-batch of ``batch_size`` rows
    of ``data`` (drawn without replacement within a batch, by a ``torch.Generator`` seeded with
    ``seed``); the result is ``h_depth / scale``, averaged over ``repeats`` independent runs.
    The fixed point is ``h = scale * (A + damping*I)^-1 v``. All rows of ``V`` share the same
    mini-batch sequence, and every call replays it, so the returned operator is a fixed
    linear map (same seed, same answer).

    Args:
        batch_op: ``batch -> LinOp`` (or dense ``[P, P]``), the curvature on one mini-batch,
            e.g. ``lambda b: hvp(loss, params, b)``.
        data: ONE Batch (tensor, tuple/list or dict of tensors sharing the leading dim ``n``).
        damping: absolute damping ``>= 0``.
        scale: ``> 0``; must exceed the largest eigenvalue of every ``A_j + damping*I``.
        depth: recursion steps (operator calls per repeat), ``>= 1``.
        repeats: independent recursions averaged, ``>= 1``.
        batch_size: rows per mini-batch, ``1 <= batch_size <= n``; default ``None`` uses all of
            ``data`` at every step (a deterministic Neumann series; ``repeats`` is then moot).
        seed: seed of the mini-batch sampler, ``>= 0``.

    Returns:
        A LinOp on ``[k, P]`` rows (or a ``[P]`` vector).

    Raises:
        TypeError: ``batch_op`` not callable; ``data`` not a Batch; wrong kind of setting.
        ValueError: ``damping < 0``, ``scale <= 0``, ints ``< 1``, ``batch_size > n``; at call
            time, a recursion that diverges (says to raise ``scale``).

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
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> v = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> x = ihvp_lissa(lambda b: A, torch.zeros(4), damping=0.5, scale=5.0, depth=300)(v)
        >>> torch.allclose(x, torch.linalg.solve(A + 0.5 * torch.eye(2, dtype=A.dtype), v))
        True
    """
    func = "ihvp_lissa"
    if not callable(batch_op):
        raise TypeError(f"{func}(batch_op=...): expected a callable batch -> LinOp, got "
                        f"{type(batch_op).__name__}.")
    n = _batch_len(func, "data", data)
    damping = check_positive(func, "damping", damping, allow_zero=True)
    scale = check_positive(func, "scale", scale)
    depth = check_int(func, "depth", depth)
    repeats = check_int(func, "repeats", repeats)
    batch_size = check_optional_int(func, "batch_size", batch_size)
    seed = check_int(func, "seed", seed, minimum=0)
    if batch_size is not None and batch_size > n:
        raise ValueError(f"{func}(batch_size=...): expected batch_size <= n = {n} (the rows "
                         f"of data), got {batch_size}. Lower batch_size or pass None.")
    full = batch_size is None or batch_size == n
    name = f"{func}(batch_op=...)"
    # The full-batch operator is built once and reused; otherwise a probe fixes P/dtype/device.
    probe = as_linop(batch_op(data if full else batch_slice(data, 0, batch_size)), name=name)
    dim, dtype, device = probe.dim, probe.dtype, probe.device
    keep = 1.0 - damping / scale

    def recursion(V: Tensor, vnorm: Tensor, gen: torch.Generator) -> Tensor:
        H = V
        for j in range(1, depth + 1):
            A = probe if full else as_linop(
                batch_op(_take(data, torch.randperm(n, generator=gen)[:batch_size])), name=name)
            H = (H * keep).add_(V).sub_(A.matmat(H), alpha=1.0 / scale)
            if j % _CHECK_EVERY == 0 or j == depth:
                _check_divergence(func, H, vnorm, j, scale, damping)
        return H

    def solve(V: Tensor) -> Tensor:
        check_rhs(func, V, dtype, device)
        gen = torch.Generator().manual_seed(seed)
        vnorm = V.norm(dim=1)
        runs = 1 if full else repeats
        total = recursion(V, vnorm, gen)
        for _ in range(runs - 1):
            total = total + recursion(V, vnorm, gen)
        return total / (scale * runs)

    return LinOp(solve, dim, dtype, device, name=func)


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
