"""Inverse solvers as values: configured once, applied to any curvature operator.

``s = solvers.cg(max_iter=100, M="ekfac")`` holds a solver's settings; ``s(op, damping)``
returns ``V -> (op + damping I)^-1 V`` (a :class:`~dattri_fn._types.LinOp`), and
``influence(fm, solver=s, damping=...)`` runs it inside the influence pipeline. Settings are
validated when the value is made (on a 1 x 1 identity), so a typo fails before any data is read.
Every solver ``influence`` knows has a value: ``cg``, ``minres``, ``explicit``, ``arnoldi``,
``lissa`` (mini-batches drawn from the data inside ``influence``; the full-batch recursion on a
plain operator, the mini-batch recursion on
:func:`~dattri_fn.operators.stochastic.sampled`), and the closed forms ``kfac``/``ekfac``
(factors built from the model inside ``influence``; on K-FAC/EK-FAC factors or an operator with
a closed-form inverse such as :func:`~dattri_fn.operators.kfac_operator`, ``op.inverse(damping)``)
and ``datainf`` (the training gradients inside ``influence``; applied directly, an
:func:`~dattri_fn.operators.datainf.empirical_fisher` operator, which carries them). Applied
directly, ``s(op, damping)`` takes the same curvature values as every ``ihvp_*`` (see
:mod:`dattri_fn.solve`).

    >>> import torch
    >>> s = cg(rtol=1e-12)
    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> x = s(A, damping=0.5)(torch.ones(2, dtype=torch.float64))
    >>> torch.allclose((A + 0.5 * torch.eye(2, dtype=A.dtype)) @ x, torch.ones(2, dtype=A.dtype))
    True
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch

from ._checks import check_int
from ._types import LinOp
from .operators.datainf import EmpiricalFisher, ihvp_datainf
from .operators.kfac import ekfac_factors
from .solve import ihvp_arnoldi, ihvp_cg, ihvp_explicit, ihvp_lissa, ihvp_minres
from .solve.explicit import as_operator

__all__ = ["Solver", "arnoldi", "cg", "datainf", "ekfac", "explicit", "kfac", "lissa", "minres"]


class Solver(NamedTuple):
    """A configured inverse solver: ``solver(op, damping) -> V -> (op + damping I)^-1 V``.

    Fields:
        name: the influence solver it configures (``"cg"``, ``"explicit"``, ``"arnoldi"``).
        options: its settings (keyword arguments of the matching ``ihvp_*``).
    """

    name: str
    options: dict[str, Any]

    def __call__(self, op, damping: float | None = None) -> LinOp:
        """``V -> (op + damping I)^-1 V``; ``damping=None`` is 0, or DataInf's own rule."""
        if damping is None and self.name != "datainf":
            damping = 0.0
        if isinstance(self.options.get("M"), str) and self.options["M"] != "nystrom":
            raise ValueError(f"{self.name}(M=...): expected a LinOp to apply the solver "
                             f"directly, got {self.options['M']!r} (only influence(...) builds "
                             "K-FAC/EK-FAC preconditioners from the model).")
        return _FACTORIES[self.name](op, damping=damping, **self.options)


def _lissa_on(op, *, damping: float, batch_size: int | None = None, seed: int | None = None,
              **options) -> LinOp:
    for arg, value in (("batch_size", batch_size), ("seed", seed)):
        if value is not None:
            raise ValueError(f"lissa({arg}=...): expected None to apply the solver to an "
                             f"operator directly, got {value}; mini-batches and their seed "
                             "belong to the curvature, operators.sampled(batch_op, data, "
                             "batch_size=..., seed=...), or influence(fm, solver=s) draws them.")
    return ihvp_lissa(op if isinstance(op, LinOp) else as_operator("lissa", op),
                      damping=damping, **options)


def _closed_form(name: str):
    def inverse(op, *, damping: float | None, **_) -> LinOp:
        if name == "datainf":
            if isinstance(op, EmpiricalFisher):
                return ihvp_datainf(op, damping=damping)
            got = op.name if isinstance(op, LinOp) else type(op).__name__
            raise ValueError(f"datainf(op=...): expected operators.empirical_fisher(grads, "
                             f"blocks=...) (DataInf inverts per-example gradients, which the "
                             f"operator must carry), got {got}; or run it as "
                             "influence(fm, solver=s).")
        A = as_operator(name, op)
        if A.inverse is None:
            got = A.name if isinstance(op, LinOp) else f"a dense {A.dim} x {A.dim} matrix"
            raise ValueError(f"{name}(op=...): expected K-FAC/EK-FAC factors or an operator "
                             f"with a closed-form inverse (operators.kfac_operator(factors)), "
                             f"got {got} (no closed-form inverse); to build the factors from "
                             "the model, run it as influence(fm, solver=s).")
        return A.inverse(damping)
    return inverse


_FACTORIES = {"cg": ihvp_cg, "explicit": ihvp_explicit, "arnoldi": ihvp_arnoldi,
              "minres": ihvp_minres, "lissa": _lissa_on, "kfac": _closed_form("kfac"),
              "ekfac": _closed_form("ekfac"), "datainf": _closed_form("datainf")}
_PROBE = torch.eye(1, dtype=torch.float64)
# Settings of the factor builders that influence(solver="kfac"/"ekfac") forwards.
_FACTOR_OPTIONS = frozenset(inspect.signature(ekfac_factors).parameters) - {
    "module", "loss_fn", "params", "data", "chunk_size", "tapped", "batch_rows"} | {"query_rank"}


def cg(*, rtol: float = 1e-6, atol: float = 0.0, max_iter: int | None = None, M="auto",
       negative_curvature: str = "stop") -> Solver:
    """Conjugate gradient (:func:`~dattri_fn.solve.ihvp_cg`); ``M``: ``"auto"`` (influence's
    rule: block CG on the Gauss-Newton, :func:`~dattri_fn.solve.ihvp_block_cg`; plain CG
    applied directly), ``None`` (plain CG), a preconditioner LinOp, ``"nystrom"`` (a randomized sketch
    of the operator itself, :func:`~dattri_fn.solve.nystrom.nystrom_preconditioner`), or
    ``"kfac"``/``"ekfac"`` for influence to build from the model (which helps: see
    :func:`~dattri_fn.solve.cg_solve`'s ``M``);
    ``negative_curvature="continue"``: the literal inverse of an indefinite system (no stop at
    ``p^T A p <= 0``)."""
    options = {"rtol": rtol, "atol": atol, "max_iter": max_iter,
               "negative_curvature": negative_curvature}
    ihvp_cg(_PROBE, **options)
    if not (M is None or isinstance(M, (str, LinOp, torch.Tensor))):
        got = f"Solver {M.name!r}" if isinstance(M, Solver) else type(M).__name__
        raise TypeError(f"cg(M=...): expected 'auto', None, 'nystrom', 'kfac'/'ekfac' (built by "
                        f"influence from the model), a LinOp or a [P, P] tensor, got {got}. A "
                        f"K-FAC/EK-FAC preconditioner as a value: "
                        f"kfac_operator(ekfac_factors(...)).inverse(damping).")
    if not (isinstance(M, str) and M == "auto"):  # None is kept: influence then sketches nothing
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


def lissa(*, scale: float, depth: int = 1000, repeats: int = 1, batch_size: int | None = None,
          seed: int | None = None) -> Solver:
    """LiSSA (:func:`~dattri_fn.solve.ihvp_lissa`); inside ``influence`` each step uses the
    curvature of ``batch_size`` training rows drawn with ``seed`` (``None``: 0); applied to an
    operator (``batch_size``/``seed`` None), the full recursion ``h <- v + h - (A + damping I)
    h / scale``, or on :func:`~dattri_fn.operators.stochastic.sampled` the mini-batches it
    draws."""
    options = {"scale": scale, "depth": depth, "repeats": repeats, "batch_size": batch_size,
               "seed": seed}
    ihvp_lissa(lambda _: _PROBE, torch.zeros(max(1, batch_size or 1)), **options)
    return Solver("lissa", options)


def _factored(name: str, options: dict) -> Solver:
    unknown = sorted(set(options) - _FACTOR_OPTIONS)
    if unknown:
        raise TypeError(f"{name}({unknown[0]}=...): expected some of {sorted(_FACTOR_OPTIONS)} "
                        f"(the settings of {name}_factors), got unexpected settings {unknown}.")
    return Solver(name, options)


def kfac(**factor_options) -> Solver:
    """K-FAC's closed-form inverse (:func:`~dattri_fn.operators.kfac.ihvp_kfac`); settings are
    those of :func:`~dattri_fn.operators.kfac.kfac_factors` (``layers``, ``fisher``, ``seed``,
    ``sampler``, ``dtype``), used when ``influence`` builds the factors from the model, and
    ``query_rank`` (low-rank test blocks in ``influence``'s scoring, kronfluence's)."""
    return _factored("kfac", factor_options)


def ekfac(**factor_options) -> Solver:
    """EK-FAC's closed-form inverse (:func:`~dattri_fn.operators.kfac.ihvp_ekfac`); settings as
    :func:`kfac` (those of :func:`~dattri_fn.operators.kfac.ekfac_factors`)."""
    return _factored("ekfac", factor_options)


def datainf() -> Solver:
    """DataInf's layer-wise closed form (:func:`~dattri_fn.operators.datainf.ihvp_datainf`) over
    the training gradients ``influence`` collects, or applied to an
    :func:`~dattri_fn.operators.datainf.empirical_fisher` operator; its damping default is
    DataInf's own rule."""
    return Solver("datainf", {})
