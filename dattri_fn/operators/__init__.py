"""Curvature operators: builders that return a :class:`~dattri_fn._types.LinOp` and pick their own
fast path (Gauss-Newton: factored for Linear-only models, closed-form output Hessians), and the
K-FAC/EK-FAC Fisher as an operator that carries its closed-form inverse, and the values that carry
a solver's special structure: LiSSA's mini-batches (:func:`sampled`) and DataInf's per-example
gradients (:func:`empirical_fisher`)."""

from .datainf import EmpiricalFisher, empirical_fisher
from .gauss_newton import curvature_rows, gauss_newton, memory_budget
from .kfac import BlockLinOp, kfac_operator, layer_scores, layer_self_scores, low_rank_blocks
from .linear_glm import glm_hessian
from .linear_mlp import MLPHessian, mlp_hessian
from .stochastic import SampledLinOp, sampled

__all__ = ["BlockLinOp", "EmpiricalFisher", "MLPHessian", "SampledLinOp", "curvature_rows",
           "empirical_fisher", "gauss_newton", "glm_hessian", "kfac_operator", "layer_scores",
           "layer_self_scores", "low_rank_blocks", "memory_budget", "mlp_hessian", "sampled"]
