"""LoGra's projections and eigenbases: the Gaussian ``P_in``, ``P_out`` drawn from the seed, per
layer, and the eigenvectors of the projected EK-FAC factors (:func:`~dattri_fn.attribute.logra.logra`
uses them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import FunctionalModel


def _projection(rows: int, k: int | None, seed: int) -> Tensor | None:
    """Gaussian ``[rows, k]`` float64 with entries N(0, 1/k): ``E[P P^T] = I``; None keeps all
    rows."""
    if k is None or k >= rows:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g, dtype=torch.float64) / k ** 0.5


def _projections(widths: dict, k_in: int | None, k_out: int | None, seed: int) -> dict:
    """``{layer: (P_in, P_out)}`` for layers of ``{layer: (in', out)}`` widths, in order: layer
    ``i``'s sides are drawn from seeds ``7919 seed + 2i`` and ``7919 seed + 2i + 1``."""
    return {ln: (_projection(wa, k_in, seed * 7919 + 2 * i),
                 _projection(wg, k_out, seed * 7919 + 2 * i + 1))
            for i, (ln, (wa, wg)) in enumerate(widths.items())}


def _cast(projections: dict, like: Tensor) -> dict:
    """The float64 projections in ``like``'s dtype and device."""
    return {ln: tuple(None if P is None else P.to(like) for P in pair)
            for ln, pair in projections.items()}


def _eigvecs(factors: dict) -> dict:
    """``{layer: (Q_A, Q_G)}``: eigenvectors of every ``(A', G')``, one batched ``eigh`` per
    matrix size (the same per-matrix LAPACK call as one by one)."""
    mats = [m for pair in factors.values() for m in pair]
    by_size: dict = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[0], []).append(i)
    vecs = [None] * len(mats)
    for idx in by_size.values():
        Q = torch.linalg.eigh(torch.stack([mats[i] for i in idx]))[1]
        for j, i in enumerate(idx):
            vecs[i] = Q[j]
    return {ln: (vecs[2 * k], vecs[2 * k + 1]) for k, ln in enumerate(factors)}


def _widths(io: dict, specs: dict, model: FunctionalModel) -> dict:
    """``{layer: (in (+1 with an attributed bias), out)}``: the factors' full widths."""
    return {n: (a.shape[-1] + (specs[n].bias in model.params), g.shape[-1])
            for n, (a, g) in io.items()}
