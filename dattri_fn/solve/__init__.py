"""Inverse solvers: operator in, operator out, ``V -> (A + damping*I)^-1 V`` row by row.

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
from .cg import CGResult, cg_solve, ihvp_cg
from .explicit import CholeskyInverse, Eigen, EigenInverse, LUInverse, ihvp_explicit
from .lissa import ihvp_lissa
from .minres import ihvp_minres
from .nystrom import nystrom_preconditioner

# Factories callable as ``factory(op, damping=...)`` with every other setting defaulted.
# LiSSA is absent: it needs a mini-batch curvature and data, not one operator.
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
    "LUInverse",
    "SOLVERS",
    "arnoldi",
    "cg_solve",
    "ekfac_factors",
    "ihvp_arnoldi",
    "ihvp_cg",
    "ihvp_datainf",
    "ihvp_ekfac",
    "ihvp_explicit",
    "ihvp_kfac",
    "ihvp_lissa",
    "ihvp_minres",
    "kfac_factors",
    "kfac_tap",
    "nystrom_preconditioner",
]
