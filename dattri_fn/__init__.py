"""dattri_fn: training-data attribution as compositions of pure torch.func transforms.

Score convention (every method): scores are ``[n_train, n_test]``; a positive score means that
up-weighting the training example LOWERS the test loss (a proponent).
"""

from torch.func import vmap

from ._types import LinOp, as_linop
from .curvature import fvp, gnvp, hvp
from .grad import grad, per_sample_grad
from .model import FunctionalModel, functional_model, load_params, select_params
from .tree import num_params, ravel, ravel_batched

__all__ = [
    "FunctionalModel",
    "LinOp",
    "as_linop",
    "functional_model",
    "fvp",
    "gnvp",
    "grad",
    "hvp",
    "load_params",
    "num_params",
    "per_sample_grad",
    "ravel",
    "ravel_batched",
    "select_params",
    "vmap",
]

__version__ = "0.1.0"
