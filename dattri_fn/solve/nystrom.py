"""Randomized Nystrom preconditioner for CG on a positive semi-definite curvature.

A rank-``r`` sketch of ``A`` from ONE product with ``r`` random rows gives ``A ~ U diag(s) U^T``
(``U`` ``[P, r]`` orthonormal, ``s`` descending); the preconditioner is

    M = (s_r + mu) U diag(1 / (s + mu)) U^T + (I - U U^T)   ~  (A + mu I)^-1 up to a scale,

which maps the top ``r`` eigen-directions of ``A + mu I`` to ``s_r + mu`` and leaves the rest
as they are, so preconditioned CG sees a condition number of about ``(s_r + mu) / mu`` (plus
the sketch's error) instead of ``(s_1 + mu) / mu``. It suits curvatures with a fast-decaying
spectrum such as the Gauss-Newton of a trained network, where block-diagonal preconditioners
(K-FAC/EK-FAC) miss the cross-layer directions (benchmarks/RESULTS.md). With many right-hand
sides, block CG (:mod:`dattri_fn.solve.block_cg`) needs no sketch and fewer products: on the
digits MLPs' Gauss-Newton (50 and 200 rows) 15 and 6 block steps against 16 + 4 and 12 + 1
products of CG with this preconditioner (the sketch's 200 rows counted in ``k``-row products).

References:
    Frangella, Tropp & Udell, "Randomized Nystrom Preconditioning", SIAM J. Matrix Anal.
    Appl. 2023, arXiv:2110.02820 (the sketch, its stable shift and the preconditioner).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import all_finite, check_int, check_positive
from .._types import LinOp
from .explicit import as_operator

__all__ = ["nystrom_preconditioner", "sketch_bytes"]

DEFAULT_RANK = 200  # the digits MLPs' CG (P = 2.4k / 9.6k): fewest products at 50-200 rows
# [r, P] buffers alive at the sketch's peak: Omega, Y, Y + nu Omega, its triangular solve and U.
SKETCH_COPIES = 5


def sketch_bytes(dim: int, dtype: torch.dtype, rank: int = DEFAULT_RANK) -> int:
    """Bytes of the sketch's peak: ``SKETCH_COPIES * min(rank, dim) * dim`` entries of ``dtype``."""
    return SKETCH_COPIES * min(rank, dim) * dim * torch.empty((), dtype=dtype).element_size()


def nystrom_preconditioner(op, *, damping: float, rank: int = DEFAULT_RANK, seed: int = 0,
                           func: str = "nystrom_preconditioner", arg: str = "op") -> LinOp:
    """Return ``M ~ (s_r + damping) (A + damping I)^-1`` from a rank-``r`` Nystrom sketch.  # [k, P] -> [k, P]

    ``Omega`` = ``r = min(rank, P)`` orthonormalised Gaussian rows (``torch.Generator(seed)`` on
    the CPU), ``Y = A Omega`` (one operator call on ``r`` rows), ``nu = sqrt(P) eps ||Y||_F``,
    ``C = chol(Omega^T (Y + nu Omega))``, ``U S V^T = svd((Y + nu Omega) C^-T)``,
    ``s = max(S^2 - nu, 0)``; then ``M V = (s_r + damping) (V U) diag(1 / (s + damping)) U^T
    + V - (V U) U^T``. At ``rank >= P`` the sketch is exact and ``M = (s_P + damping) (A +
    damping I)^-1`` (to rounding; CG is blind to the scale of ``M``), and for ``A`` of rank
    below ``r``, ``M (A + damping I) = damping I``. ``M`` is symmetric positive definite for
    ``damping > 0``.

    Args:
        op: the symmetric positive semi-definite ``A`` (a LinOp or a ``[P, P]`` tensor).
        damping: ``> 0``, the damping of the system CG solves.
        rank: sketch size ``r`` (memory ``P r``; one product with ``r`` rows).
        seed: the sketch's seed.
        func, arg: the call and argument the operator's errors name (a caller that builds the
            sketch for its user, e.g. ``influence``'s ``if_cg(curvature=...)``).

    Raises:
        TypeError, ValueError: a bad operator, damping, rank or seed; an operator whose sketch
            is not finite, or not positive semi-definite (``Omega^T A Omega`` has no Cholesky
            factor even after raising the shift a thousandfold).
    """
    A = as_operator(func, op)
    damping = check_positive(func, "damping", damping)
    r = min(check_int(func, "rank", rank), A.dim)
    check_int(func, "seed", seed, minimum=0)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(A.dim, r, generator=g, dtype=torch.float64)
    omega = torch.linalg.qr(omega).Q.T.to(A.dtype).to(A.device).contiguous()  # [r, P]
    Y = A.matmat(omega)  # [r, P]: rows of (A Omega)^T
    if not all_finite(Y):
        raise ValueError(f"{func}({arg}=...): expected an operator returning finite values, got "
                         f"NaN or inf in its Nystrom sketch A Omega.")
    nu = A.dim ** 0.5 * torch.finfo(A.dtype).eps * float(Y.norm())
    for _ in range(4):  # rounding can leave Omega^T A Omega slightly indefinite: raise the shift
        Ynu = Y + nu * omega
        core = omega @ Ynu.T
        C, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        if int(info) == 0:
            break
        nu = max(nu * 10, torch.finfo(A.dtype).eps)
    else:
        raise ValueError(f"{func}({arg}=...): expected a positive semi-definite operator, got a "
                         f"sketch Omega^T A Omega without a Cholesky factor (shift {nu:.3g}).")
    Bt = torch.linalg.solve_triangular(C, Ynu, upper=False)  # [r, P] = (Ynu C^-T)^T
    U, S, _ = torch.linalg.svd(Bt.T, full_matrices=False)  # U [P, r]
    s = (S * S - nu).clamp_min(0)
    inner = (s[-1] + damping) / (s + damping) - 1.0  # [r]: M = I + U diag(inner) U^T

    def matmat(V: Tensor) -> Tensor:
        return V + ((V @ U) * inner) @ U.T

    return LinOp(matmat, A.dim, A.dtype, A.device, name="nystrom_preconditioner")
