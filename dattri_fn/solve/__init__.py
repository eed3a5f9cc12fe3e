"""Inverse solvers: operator in, operator out, ``V -> (A + damping*I)^-1 V`` row by row.

One rule: every ``ihvp_*(op, *, damping, ...)`` takes ONE kind of first argument, a curvature
value ``op`` for ``A`` -- a :class:`~dattri_fn._types.LinOp`, or what
:func:`~dattri_fn._types.as_linop` coerces (a dense ``[P, P]`` matrix, K-FAC/EK-FAC factors,
which become :func:`~dattri_fn.operators.kfac.kfac_operator`) -- and the structure a solver
exploits travels inside that value:

==================  ===================================================================
``ihvp_explicit``   any curvature; a closed-form ``op.inverse`` (K-FAC/EK-FAC) is used as is
``ihvp_cg``         any curvature (``M=``: a preconditioner, itself an operator)
``ihvp_minres``     any symmetric curvature, indefinite allowed
``ihvp_arnoldi``    any symmetric curvature (top-``rank`` eigenpairs)
``ihvp_lissa``      any curvature (full-batch recursion); mini-batches:
                    ``operators.stochastic.sampled(batch_op, data, batch_size=, seed=)``
``ihvp_datainf``    ``operators.datainf.empirical_fisher(grads, blocks=)`` (it carries the
                    per-sample gradients DataInf inverts)
``ihvp_kfac``       K-FAC factors (``kfac_factors``); ``ekfac``: EK-FAC factors
==================  ===================================================================

The forms before 0.1.0 still work: ``ihvp_lissa(batch_op, data, batch_size=, seed=)`` and
``ihvp_datainf(grads, blocks=)`` equal the value forms above bit for bit.

Damping is absolute and added to the operator. Every solver refuses to return NaN for an
indefinite or singular ``A``: explicit and Arnoldi drop non-positive damped eigen-directions
(with a warning), CG stops rows at negative curvature (flagged and warned), LiSSA raises when
its recursion diverges.
"""

from __future__ import annotations

from collections.abc import Callable

from .._types import LinOp
from ..operators.datainf import ihvp_datainf
from ..operators.kfac import (
    EKFACFactors,
    KFACFactors,
    ekfac_factors,
    ihvp_ekfac,
    ihvp_kfac,
    kfac_factors,
    kfac_tap,
)
from .arnoldi import arnoldi, ihvp_arnoldi, ihvp_arnoldi_full_rank
from .block_cg import block_cg_solve, ihvp_block_cg
from .cg import CGResult, cg_solve, ihvp_cg
from .explicit import CholeskyInverse, Eigen, EigenInverse, LUInverse, ihvp_explicit
from .lbfgs import LBFGSResult, minimize_lbfgs
from .lissa import ihvp_lissa
from .minres import ihvp_minres
from .nystrom import nystrom_preconditioner

# Factories callable as ``factory(op, damping=...)`` with every other setting defaulted.
# LiSSA is absent: its ``scale`` has no default (it must exceed the curvature's top eigenvalue).
SOLVERS: dict[str, Callable[..., LinOp]] = {
    "explicit": ihvp_explicit,
    "cg": ihvp_cg,
    "arnoldi": ihvp_arnoldi_full_rank,
    "minres": ihvp_minres,
}

__all__ = [
    "CGResult",
    "CholeskyInverse",
    "EKFACFactors",
    "Eigen",
    "EigenInverse",
    "KFACFactors",
    "LBFGSResult",
    "LUInverse",
    "SOLVERS",
    "arnoldi",
    "block_cg_solve",
    "cg_solve",
    "ekfac_factors",
    "ihvp_arnoldi",
    "ihvp_block_cg",
    "ihvp_cg",
    "ihvp_datainf",
    "ihvp_ekfac",
    "ihvp_explicit",
    "ihvp_kfac",
    "ihvp_lissa",
    "ihvp_minres",
    "kfac_factors",
    "kfac_tap",
    "minimize_lbfgs",
    "nystrom_preconditioner",
]
