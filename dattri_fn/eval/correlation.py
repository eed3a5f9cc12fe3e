"""Rank and linear correlations along a dim, with two-sided p-values: what LDS and LOO build on."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import _msg, check_tensor


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _same_shape(func: str, x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(_msg(func, "y", f"the shape of x {list(x.shape)}",
                              f"shape {list(y.shape)}"))


def rank(x: Tensor, dim: int = -1) -> Tensor:
    """Return 1-based ranks along ``dim``, ties given their average rank.  # [..., n] -> [..., n]

    ``rank(tensor([3., 1., 3.]))`` is ``[2.5, 1., 2.5]``, as ``scipy.stats.rankdata``.
    The dtype is ``x``'s if floating, else the default float dtype.
    """
    xs = _float(x).movedim(dim, -1)
    lead, n = xs.shape[:-1], xs.shape[-1]
    flat = xs.reshape(-1, n)
    srt, order = torch.sort(flat, dim=-1, stable=True)
    new_group = torch.ones_like(srt, dtype=torch.bool)
    new_group[:, 1:] = srt[:, 1:] != srt[:, :-1]
    group = new_group.cumsum(-1) - 1
    pos = torch.arange(n, dtype=srt.dtype, device=srt.device).expand_as(srt)
    first = torch.full_like(srt, n).scatter_reduce(-1, group, pos, "amin")
    last = torch.zeros_like(srt).scatter_reduce(-1, group, pos, "amax")
    ranks_sorted = ((first + last) / 2 + 1).gather(-1, group)
    ranks = torch.empty_like(srt).scatter_(-1, order, ranks_sorted)
    return ranks.reshape(*lead, n).movedim(-1, dim)


def _pearson(x: Tensor, y: Tensor, dim: int) -> Tensor:
    xc = x - x.mean(dim, keepdim=True)
    yc = y - y.mean(dim, keepdim=True)
    return (xc * yc).sum(dim) / torch.sqrt((xc * xc).sum(dim) * (yc * yc).sum(dim))


def _betainc(a: Tensor, b: Tensor, x: Tensor, iters: int = 1000) -> Tensor:
    """Regularised incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz),
    elementwise; the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` keeps the fraction in its fast
    region ``x < (a + 1) / (a + b + 2)``."""
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = torch.where(flip, b, a), torch.where(flip, a, b), torch.where(flip, 1 - x, x)
    tiny = torch.finfo(x.dtype).tiny / torch.finfo(x.dtype).eps

    def guard(v: Tensor) -> Tensor:
        return torch.where(v.abs() < tiny, torch.full_like(v, tiny), v)

    c = torch.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    h = d.clone()
    eps = torch.finfo(x.dtype).eps
    for m in range(1, iters + 1):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / guard(1 + coef * d)
            c = guard(1 + coef / c)
            h = h * d * c
        # Converged once the last factor is 1 to rounding everywhere (NaN lanes are ignored).
        if not bool(((d * c - 1).abs() > eps).any()):
            break
    log_front = (a * torch.log(x) + b * torch.log1p(-x) + torch.lgamma(a + b) - torch.lgamma(a)
                 - torch.lgamma(b))
    value = torch.exp(log_front) * h / a
    value = torch.where(x <= 0, torch.zeros_like(value), value)
    return torch.where(flip, 1 - value, value)


def correlation_pvalue(r: Tensor, n: int) -> Tensor:
    """Return the two-sided p-value of correlations ``r`` over ``n`` pairs.  # [...] -> [...]

    Under independence ``t = r sqrt((n - 2) / (1 - r^2))`` is Student-t with ``n - 2`` degrees
    of freedom, so ``p = P(|T| >= |t|) = I_{1 - r^2}((n - 2) / 2, 1 / 2)`` (the regularised
    incomplete beta function). This is ``scipy.stats.pearsonr``'s exact p-value and
    ``scipy.stats.spearmanr``'s (t-approximation) p-value. NaN where ``r`` is NaN or
    ``n < 3``; 0 where ``|r| = 1``.
    """
    r = _float(r)
    if n < 3:
        return torch.full_like(r, float("nan"))
    x = (1 - r * r).clamp(0, 1)
    p = _betainc(torch.full_like(r, (n - 2) / 2), torch.full_like(r, 0.5), x)
    return torch.where(torch.isnan(r), r, p.clamp(0, 1))


def _check_pair(func: str, x: Tensor, y: Tensor, dim: int) -> None:
    check_tensor(func, "x", x)
    check_tensor(func, "y", y)
    _same_shape(func, x, y)
    if x.ndim == 0 or x.shape[dim] < 2:
        raise ValueError(_msg(func, "x", "at least 2 entries along dim",
                              f"shape {list(x.shape)} with dim={dim}"))


def pearson(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """Return Pearson's r between ``x`` and ``y`` along ``dim``.  # [..., n], [..., n] -> [...]

    r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2); NaN where
    either input is constant along ``dim`` (as scipy).

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shapes differ, fewer than 2 entries along ``dim``, or non-finite values.
    """
    _check_pair("pearson", x, y, dim)
    return _pearson(_float(x), _float(y).to(_float(x).dtype), dim)


def spearman(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    """Return Spearman's rho = Pearson's r of the ranks (ties averaged).  # [..., n] x2 -> [...]

    Equals ``scipy.stats.spearmanr`` per slice; NaN where either input is constant.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shapes differ, fewer than 2 entries along ``dim``, or non-finite values.
    """
    _check_pair("spearman", x, y, dim)
    rx = rank(x, dim)
    return _pearson(rx, rank(y, dim).to(rx.dtype), dim)
