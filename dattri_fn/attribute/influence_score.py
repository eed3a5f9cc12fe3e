"""Influence's scoring side: per-example gradient rows, RelatIF's row scale, formed score rows
(used by :func:`~dattri_fn.attribute.influence.influence`)."""

from __future__ import annotations

import torch

from .._types import Loss, Params
from ..transforms.grad import per_sample_grad_unchecked
from ..transforms.layer_grads import LayerPlan, layer_grads_stacked
from ..tree import ravel_batched


def _relatif_scale(kind: str, G: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Return ``1 / n_i`` per row: ``n_i = sqrt|g_i^T Q_i|`` ("l") or ``|Q_i|`` ("theta"),
    with ``Q_i = (C + damping I)^-1 g_i``; 0 where ``n_i = 0`` (a zero gradient scores 0).  # [B]"""
    sq = (G * Q).sum(1).abs() if kind == "l" else (Q * Q).sum(1)
    pos = sq > 0
    return torch.where(pos, sq.where(pos, 1).rsqrt(), 0)


def _grad_rows(fn: Loss, plan: LayerPlan | None, l2: float, params: Params):
    """Return ``batch -> [B, P]`` raveled per-example gradients of ``fn + l2 |p|^2``.

    With a plan, Linear layers come from one batched backward (``l2`` added as ``2 l2 p``);
    without, ``fn`` already holds the ``l2`` term and ``vmap(grad)`` does it.
    """
    if plan is None:
        return lambda b: ravel_batched(per_sample_grad_unchecked(fn, params, b))
    stacked = {k: v[None] for k, v in params.items()}
    shift = 2 * l2 * torch.cat([v.reshape(-1) for v in params.values()]) if l2 else None

    def rows(b):
        G = layer_grads_stacked(plan, stacked, b).to_dense()[0]
        return G if shift is None else G.add_(shift)

    return rows


class _Formed:
    """Scores already formed for a training batch, in the pipeline's structured-rows protocol
    (``scores`` / ``row_dots`` return them whatever the other side)."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def scores(self, other) -> torch.Tensor:
        return self.values

    def row_dots(self, other) -> torch.Tensor:
        return self.values
