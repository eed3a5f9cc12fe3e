"""Curvature operators: builders that return a :class:`~dattri_fn._types.LinOp` and pick their own
fast path (Gauss-Newton: factored for Linear-only models, closed-form output Hessians)."""

from .gauss_newton import curvature_rows, gauss_newton, memory_budget

__all__ = ["curvature_rows", "gauss_newton", "memory_budget"]
