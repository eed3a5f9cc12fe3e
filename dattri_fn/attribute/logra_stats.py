"""LoGra prepare's per-pass statistics: the projected EK-FAC factors' sums and the train cache
(:func:`~dattri_fn.attribute.logra.logra` calls :func:`_accumulate` once per capture pass).

For a pass's projected factors ``{layer: (a' [B, T, k_in], g' [B, T, k_out])}`` (or 2-d
``[B, k]``: one position per example):

    A' += sum_i (1/T) sum_t a'_it a'_it^T        G' += sum_i sum_t g'_it g'_it^T

(a batch with padding, :mod:`dattri_fn.transforms.padding`: ``A'`` over each example's ``T_i``
real positions only, ``(1/T_i) sum_{t real}``; ``g'`` is zero at pad positions)

and the cache keeps ``(a', g')`` per layer while every layer has ``T = 1`` (``DW'_i = g'_i
a'_i^T``), else the features ``vec(DW'_i)``.
"""

from __future__ import annotations

from ..transforms.padding import Positions, real_gram
from .logra_rows import _features, _outer_rows


def _accumulate(io: dict, n: int, A: dict, G: dict, factors: dict, feats, n_layers: int,
                cache_features: bool, borrowed: dict, positions: Positions | None = None) -> None:
    """Add one pass's projected factors ``io`` (after ``n`` rows) to ``A``, ``G`` and the cache
    (``factors``: ``{layer: (_Gather of a', of g')}`` while the layer has ``T = 1`` in every
    pass; ``feats``: the features' ``_Gather``, once a layer has ``T > 1``), in place.
    ``borrowed[layer]``: its ``a'`` is the caller's own input (unprojected, no bias column).
    ``positions``: started at the pass's batch (its padding)."""
    # (a 2-d layer, [B, k], holds one position per example)
    drop = [ln for ln, (a, _) in io.items() if ln in factors and a.ndim == 3
            and a.shape[1] != 1]
    if drop and n and len(factors) == n_layers:
        # the rows so far were held factored: their features now (a layer has T > 1)
        feats.add(_outer_rows({ln: (fa.value(), fg.value())
                               for ln, (fa, fg) in factors.items()}))
    for ln in drop:
        del factors[ln]
    for ln, (a, g) in io.items():
        T = 1 if a.ndim == 2 else a.shape[1]
        a2, g2 = (a, g) if a.ndim == 2 else (a.reshape(-1, a.shape[-1]),
                                             g.reshape(-1, g.shape[-1]))
        # A' = sum_i (1/T) sum_t a' a'^T and G' = sum_i sum_t g' g'^T as single GEMMs (mm: 2-d
        # operands, matmul's dispatch to mm skipped)
        real = None if positions is None else positions.take(ln, a)
        dA = a2.mT.mm(a2 if T == 1 else a2 / T) if real is None else real_gram(a, real)
        dG = g2.mT.mm(g2)
        A[ln] = dA if ln not in A else A[ln] + dA
        G[ln] = dG if ln not in G else G[ln] + dG
        if ln in factors:
            # unprojected and with no bias column, a' is the layer's own input
            factors[ln][0].add(a2, borrowed=borrowed[ln])
            factors[ln][1].add(g2)
    if cache_features and len(factors) < n_layers:
        feats.add(_features(io))
