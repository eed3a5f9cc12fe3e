"""dattri_fn: training-data attribution as compositions of pure torch.func transforms.

Score convention (every method): scores are ``[n_train, n_test]``; a positive score means that
up-weighting the training example LOWERS the test loss (a proponent).
"""

from . import solvers
from ._types import LinOp, as_linop
from .model import FunctionalModel, functional_model, load_checkpoints, load_params, select_params
from .operators import gauss_newton
from .operators.curvature import cross_entropy_out_hessian, cross_entropy_out_hvp, fvp, gnvp, hvp
from .operators.linear_curvature import linear_gnvp, linear_hessian
from .solve import (
    CGResult,
    EKFACFactors,
    KFACFactors,
    arnoldi,
    cg_solve,
    ekfac_factors,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_datainf,
    ihvp_ekfac,
    ihvp_explicit,
    ihvp_kfac,
    ihvp_lissa,
    ihvp_minres,
    kfac_factors,
)
from .transforms.grad import grad, per_sample_grad
from .transforms.layer_grads import LayerGrads, per_sample_layer_grads
from .transforms.project import make_projector, project, project_tree
from .tree import num_params, ravel, ravel_batched

__all__ = [
    "CGResult",
    "EKFACFactors",
    "FunctionalModel",
    "KFACFactors",
    "LayerGrads",
    "LinOp",
    "arnoldi",
    "as_linop",
    "cg_solve",
    "cross_entropy_out_hessian",
    "cross_entropy_out_hvp",
    "ekfac_factors",
    "functional_model",
    "fvp",
    "gauss_newton",
    "gnvp",
    "grad",
    "hvp",
    "ihvp_arnoldi",
    "ihvp_cg",
    "ihvp_datainf",
    "ihvp_ekfac",
    "ihvp_explicit",
    "ihvp_kfac",
    "ihvp_lissa",
    "ihvp_minres",
    "kfac_factors",
    "linear_gnvp",
    "linear_hessian",
    "load_checkpoints",
    "load_params",
    "make_projector",
    "num_params",
    "per_sample_grad",
    "per_sample_layer_grads",
    "project",
    "project_tree",
    "ravel",
    "ravel_batched",
    "select_params",
    "solvers",
]

__version__ = "0.1.0"
