"""Influence's CG inverses on a curvature operator: CG with an automatic Nystrom
preconditioner (:func:`_sketched_cg`) and block CG with a plain-CG fallback (:func:`_block_cg`).

Moved from :mod:`.influence_inverse` (stop 25, no behaviour change); it re-exports both, and
:func:`.influence_inverse.build_inverse` calls them through its own names (what
``benchmarks.defaults_gn`` patches).
"""

from __future__ import annotations

import math

import torch

from .._types import LinOp

# The Nystrom sketch costs one curvature product on r rows; on the digits MLPs (r = 200,
# P = 2.4k and 9.6k) it saved more CG time than it cost from 11-12 right-hand sides on.
AUTO_SKETCH_RHS_PER_RANK = 1 / 16


SKETCH_SEED = 0  # the automatic sketch's seed: scores are deterministic


def _sketched_cg(name: str, C: LinOp, damping: float, opts: dict, *, always: bool) -> LinOp:
    """CG on ``C + damping I`` whose first call of ``k >= r / 16`` rows (any call if
    ``always``) builds the rank-``r`` Nystrom preconditioner of ``C`` (``r = min(200, P)``,
    seed 0, only if its sketch fits ``memory_budget()`` unless ``always``), used from then on;
    until then, plain CG. Errors of the sketch name ``name(curvature=...)``."""  # [k, P] -> [k, P]
    from ..operators.gauss_newton import memory_budget
    from ..solve import ihvp_cg
    from ..solve.nystrom import DEFAULT_RANK, nystrom_preconditioner, sketch_bytes

    plain = ihvp_cg(C, damping=damping, **opts)  # settings checked here, at prepare
    r = min(DEFAULT_RANK, C.dim)
    fits = always or sketch_bytes(C.dim, C.dtype, r) <= memory_budget()
    sketched: list[LinOp] = []

    def solve(V: torch.Tensor) -> torch.Tensor:
        if not sketched and (always or (fits and V.shape[0] >= r * AUTO_SKETCH_RHS_PER_RANK)):
            M = nystrom_preconditioner(C, damping=damping, rank=r, seed=SKETCH_SEED, func=name,
                                       arg="curvature")
            sketched.append(ihvp_cg(C, damping=damping, M=M, **opts))
        return (sketched[0] if sketched else plain)(V)

    return LinOp(solve, C.dim, C.dtype, C.device, name=plain.name)


def _block_cg(name: str, C: LinOp, damping: float, opts: dict) -> LinOp:
    """Block CG on ``C + damping I`` (every row of a call in one Krylov space); rows on which
    it meets a direction that is not positive definite (a Gauss-Newton of a loss that is not
    convex in the outputs) are solved by plain CG instead, with its negative-curvature stop,
    and a warning says so."""  # [k, P] -> [k, P]
    import warnings

    from ..solve import ihvp_cg
    from ..solve.block_cg import NotPositiveDefiniteError, ihvp_block_cg

    plain = ihvp_cg(C, damping=damping, **opts)
    block = ihvp_block_cg(C, damping=damping, func=name, arg="curvature",
                          **{k: v for k, v in opts.items() if k != "negative_curvature"})

    def solve(V: torch.Tensor) -> torch.Tensor:
        try:
            return block(V)
        except NotPositiveDefiniteError:
            warnings.warn(f"{name}(curvature=...): the Gauss-Newton + damping is not positive "
                          "definite on these rows (a loss not convex in the outputs?), so block "
                          "CG cannot apply; they are solved by plain CG, which stops at negative "
                          "curvature. Raise damping to keep the fast path.", stacklevel=2)
            return plain(V)

    return LinOp(solve, C.dim, C.dtype, C.device, name=plain.name)


def row_scaled(inv: LinOp) -> LinOp:
    """Return ``inv`` applied to each row whose squared norm could overflow, ``max|v|^2 * P >
    finfo.max / 16``, after dividing it by a power of two that brings its largest magnitude into
    ``[0.5, 1)``, the answer multiplied back.  # [k, P] -> [k, P]

    A Krylov solve (CG, MINRES, LiSSA) is linear in its right-hand side and scaling by a power
    of two is exact, so such a row's answer is the solve's up to rounding; unscaled, a gradient
    ~1e20 in float32 squares to inf in ``|r|^2`` and the solve returned finite garbage (engineer
    F's overflow survey, stop 25). A solver's absolute ``atol`` then applies to the scaled row
    (rows that large had no right answer before). A call without such a row is passed through
    untouched: the same bits as before; rows that could not overflow keep their exact path and
    the user's ``atol`` (review RF F1: a threshold of ``2**32`` loosened ``atol`` for rows ~1e12)."""
    limit = torch.finfo(inv.dtype).max / 16

    def solve(V: torch.Tensor) -> torch.Tensor:
        amax = V.abs().amax(dim=1)
        over = amax > math.sqrt(limit / max(V.shape[1], 1))
        if not bool(over.any()):
            return inv(V)
        e = torch.where(over, torch.frexp(amax)[1], 0)[:, None]
        return torch.ldexp(inv(torch.ldexp(V, -e)), e).to(V.dtype)

    return LinOp(solve, inv.dim, inv.dtype, inv.device, name=inv.name)
