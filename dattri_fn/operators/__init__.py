"""Curvature operators: builders that return a :class:`~dattri_fn._types.LinOp` and pick their own
fast path (Gauss-Newton: factored for Linear-only models, closed-form output Hessians), and the
K-FAC/EK-FAC Fisher as an operator that carries its closed-form inverse."""

from .gauss_newton import curvature_rows, gauss_newton, memory_budget
from .kfac import BlockLinOp, kfac_operator, layer_scores, layer_self_scores, low_rank_blocks

__all__ = ["BlockLinOp", "curvature_rows", "gauss_newton", "kfac_operator", "layer_scores",
           "layer_self_scores", "low_rank_blocks", "memory_budget"]
