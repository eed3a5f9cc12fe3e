"""Inverse solvers as values: configured once, applied to any curvature operator.

``s = solvers.cg(max_iter=100, M="ekfac")`` holds a solver's settings; ``s(op, damping)``
returns ``V -> (op + damping I)^-1 V`` (a :class:`~dattri_fn._types.LinOp`), and
``influence(fm, solver=s, damping=...)`` runs it inside the influence pipeline. Settings are
validated when the value is made (on a 1 x 1 identity), so a typo fails before any data is read.

    >>> import torch
    >>> s = cg(rtol=1e-12)
    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> x = s(A, damping=0.5)(torch.ones(2, dtype=torch.float64))
    >>> torch.allclose((A + 0.5 * torch.eye(2, dtype=A.dtype)) @ x, torch.ones(2, dtype=A.dtype))
    True
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._checks import check_int
from ._types import LinOp
from .solve import ihvp_arnoldi, ihvp_cg, ihvp_explicit, ihvp_minres

__all__ = ["Solver", "arnoldi", "cg", "explicit", "minres"]


class Solver(NamedTuple):
    """A configured inverse solver: ``solver(op, damping) -> V -> (op + damping I)^-1 V``.

    Fields:
        name: the influence solver it configures (``"cg"``, ``"explicit"``, ``"arnoldi"``).
        options: its settings (keyword arguments of the matching ``ihvp_*``).
    """

    name: str
    options: dict[str, Any]

    def __call__(self, op, damping: float = 0.0) -> LinOp:
        if isinstance(self.options.get("M"), str):
            raise ValueError(f"{self.name}(M=...): expected a LinOp to apply the solver "
                             f"directly, got {self.options['M']!r} (only influence(...) builds "
                             "K-FAC/EK-FAC preconditioners from the model).")
        return _FACTORIES[self.name](op, damping=damping, **self.options)


_FACTORIES = {"cg": ihvp_cg, "explicit": ihvp_explicit, "arnoldi": ihvp_arnoldi,
              "minres": ihvp_minres}
_PROBE = torch.eye(1, dtype=torch.float64)


def cg(*, rtol: float = 1e-6, atol: float = 0.0, max_iter: int | None = None, M=None,
       negative_curvature: str = "stop") -> Solver:
    """Conjugate gradient (:func:`~dattri_fn.solve.ihvp_cg`); ``M``: a preconditioner LinOp, or
    ``"kfac"``/``"ekfac"`` for influence to build from the model; ``negative_curvature=
    "continue"``: the literal inverse of an indefinite system (no stop at ``p^T A p <= 0``)."""
    options = {"rtol": rtol, "atol": atol, "max_iter": max_iter,
               "negative_curvature": negative_curvature}
    ihvp_cg(_PROBE, **options)
    if M is not None:
        options["M"] = M
    return Solver("cg", options)


def minres(*, rtol: float = 1e-6, atol: float = 0.0, max_iter: int | None = None) -> Solver:
    """MINRES (:func:`~dattri_fn.solve.ihvp_minres`): symmetric systems, indefinite allowed."""
    options = {"rtol": rtol, "atol": atol, "max_iter": max_iter}
    ihvp_minres(_PROBE, **options)
    return Solver("minres", options)


def explicit(*, method: str = "auto", rtol: float | None = None) -> Solver:
    """One dense factorisation (:func:`~dattri_fn.solve.ihvp_explicit`)."""
    options = {"method": method, "rtol": rtol}
    ihvp_explicit(_PROBE, damping=1.0, **options)
    return Solver("explicit", options)


def arnoldi(*, rank: int, max_iter: int | None = None, block_size: int | None = None,
            seed: int = 0, rtol: float | None = None, keep: str = "positive") -> Solver:
    """Top-``rank`` Krylov eigenpairs (:func:`~dattri_fn.solve.ihvp_arnoldi`); ``keep="all"``
    inverts the non-positive damped directions too (the literal inverse)."""
    check_int("arnoldi", "rank", rank)
    options = {"rank": rank, "max_iter": max_iter, "block_size": block_size, "seed": seed,
               "rtol": rtol, "keep": keep}
    ihvp_arnoldi(_PROBE, **{**options, "rank": 1, "max_iter": None if max_iter is None else 1})
    return Solver("arnoldi", options)
