"""Rows scaled to unit norm, exact for rows whose squared norm overflows or underflows."""

from __future__ import annotations

import torch
from torch import Tensor


def unit_rows(x: Tensor) -> Tensor:
    """Return the rows of ``x`` scaled to norm 1; a zero row stays 0.  # [..., F] -> [..., F]

    A row whose squared norm overflows (``|x| ~ 1e20`` in float32: ``x / inf`` was 0) or is
    subnormal (``|x| < sqrt(tiny)``) is first divided by its largest magnitude, so its
    direction, all that a cosine reads, is exact there too; every other row is ``x / |x|``
    (the same bits as the plain formula). LESS's and KNN-Shapley's cosine use it."""
    info = torch.finfo(x.dtype)
    norm = x.norm(dim=-1, keepdim=True)
    odd = ~torch.isfinite(norm) | (norm < info.tiny ** 0.5)
    if not bool(odd.any()):
        return x / norm.clamp_min(info.tiny)
    scaled = x / x.abs().amax(dim=-1, keepdim=True).clamp_min(info.tiny)
    norm = torch.where(odd, scaled.norm(dim=-1, keepdim=True), norm).clamp_min(info.tiny)
    return torch.where(odd, scaled, x) / norm
