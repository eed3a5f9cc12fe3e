"""dattri_fn.testing: the property-testing kit for your own solvers, operators, projectors and
methods, the one dattri_fn's own suite runs on.

    from dattri_fn.testing import ridge_regression, check_method, check_inverse
    check_inverse(my_solver, rtol=1e-8)                 # AssertionError naming what broke
    check_method(my_method, ridge_regression(seed=3))   # self_score, batching, top_k, sign, LOO

Problems with known answers (:mod:`.problems`: ``(params, loss, data)`` in float64 or any
dtype/device), their dense references (:mod:`.references`: Hessian / Gauss-Newton / Fisher,
exact influence and leave-one-out), random matrices with a known spectrum (:mod:`.matrices`),
contract checks (:mod:`.checks`), and hypothesis strategies (:mod:`.strategies`, imported on
first use; needs ``pip install 'dattri_fn[testing]'``). :mod:`.registry` lists the library's
own primitives with the checks they pass.
"""

from .checks import check_inverse, check_linop, check_method, check_projector, default_rtol, jl_d_eff
from .matrices import indefinite_matrix, low_rank_plus_diagonal, psd_matrix, spd_matrix
from .method_checks import MethodCheck
from .problems import (
    Problem,
    conv_net,
    linear_regression,
    logistic_regression,
    mlp,
    ridge_regression,
    sequence_model,
)
from .references import (
    dense_curvature,
    dense_fisher,
    dense_gauss_newton,
    dense_hessian,
    exact_influence,
    exact_loo,
    loo_params,
    per_example_grads,
)

__all__ = [
    "MethodCheck",
    "Problem",
    "check_inverse",
    "check_linop",
    "check_method",
    "check_projector",
    "conv_net",
    "default_rtol",
    "dense_curvature",
    "dense_fisher",
    "dense_gauss_newton",
    "dense_hessian",
    "exact_influence",
    "exact_loo",
    "indefinite_matrix",
    "jl_d_eff",
    "linear_regression",
    "logistic_regression",
    "loo_params",
    "low_rank_plus_diagonal",
    "mlp",
    "per_example_grads",
    "psd_matrix",
    "ridge_regression",
    "sequence_model",
    "spd_matrix",
    "strategies",
]


def __getattr__(name: str):
    # hypothesis is an optional extra: the strategies module is imported on first use only.
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
