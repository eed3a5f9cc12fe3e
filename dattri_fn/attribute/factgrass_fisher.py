"""FactGraSS's curvature: each block's gram (one batched product per block width), its damped
empirical Fisher, inverted by one batched Cholesky per width; where it cannot be, the training
data (or ``damping``) is named (:func:`~dattri_fn.attribute.factgrass.factgrass`'s ``prepare``
uses it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .._checks import _msg, all_finite
from .factgrass_blocks import _factor_rows, _refuse_fisher, _Sketches
from .factgrass_score import spans_of


def _gram_groups(blocks: tuple) -> list:
    """``[(names, start, stop, d)]``: the blocks of each width ``d``, in the order
    :func:`_inverses` factors them; ``start:stop`` their columns where they lie side by side
    (one ``[b, n_blocks, d]`` view of the rows), else ``stop`` is None."""
    by_size = {}
    for blk, s, e in blocks:
        by_size.setdefault(e - s, []).append((blk, s, e))
    out = []
    for d, members in by_size.items():
        s0 = members[0][1]
        side = all(s == s0 + i * d for i, (_, s, _) in enumerate(members))
        out.append((tuple(b for b, _, _ in members), s0, s0 + d * len(members) if side else None,
                    d))
    return out


def _group_gram(phi: Tensor, s: int, e: int | None, d: int, blocks: tuple,
                names: tuple) -> Tensor:
    """``[p_b^T p_b for b in names]`` of the rows ``phi``: one batched product over blocks that
    lie side by side (the same products as one ``mm`` each, bit for bit:
    benchmarks/factgrass_bits), else one ``mm`` per block, stacked.  # [n_blocks, d, d]"""
    if e is not None:
        p = phi if e - s == phi.shape[1] else phi[:, s:e]  # every column: no slice op
        p = p.view(p.shape[0], -1, d).transpose(0, 1)  # [n_blocks, b, d], a view
        return torch.bmm(p.mT, p)
    cols = {b: (s0, e0) for b, s0, e0 in blocks}
    return torch.stack([phi[:, cols[b][0]:cols[b][1]].mT @ phi[:, cols[b][0]:cols[b][1]]
                        for b in names])


def _inverses(func: str, grams: dict, blocks: tuple, n: int, damping: float | None,
              held: Callable[[], Iterator]) -> dict:
    """``{block: (F_b + damping_b I)^-1}`` with ``F_b = gram_b / n`` and ``damping_b =
    damping``, or ``0.1 tr(F_b) / d_b`` where it is None.  # {b: [d_b, d_b]}

    ``grams``: ``{(block, ...): [n_blocks, d, d]}``, each width's grams stacked (as
    :func:`_gram_groups` groups them), or ``{block: [d_b, d_b]}``.

    ``held()``: the ``(start, phi)`` chunks of the training rows ``prepare`` holds
    (:func:`_held_rows`), read only where a Fisher is not finite, to name the example.
    """
    inverses = {}
    if all(isinstance(k, str) for k in grams):  # {block: [d, d]}: stacked per block size here
        by_size = {}
        for blk, s, e in blocks:
            by_size.setdefault(e - s, []).append(blk)
        grams = {tuple(names): (grams[names[0]][None] if len(names) == 1
                                else torch.stack([grams[b] for b in names]))
                 for names in by_size.values()}
    for names, G in grams.items():  # one damping and factorisation per block size
        # the per-matrix mean of a stack's diagonals is each matrix's own (the same reduction,
        # benchmarks/factgrass_bits)
        A = G / n
        diag = A.diagonal(dim1=-2, dim2=-1)
        diag.add_(0.1 * diag.mean(-1, keepdim=True) if damping is None else damping)
        diag = None
        if not all_finite(A):  # the data's doing, or damping's (stop 25 review RD F1)
            damped = dict(zip(names, A.unbind(), strict=True))
            bad = [b for b in names if not all_finite(damped[b])]
            if damping is not None and all(all_finite(G[names.index(b)]) for b in bad):
                # finite before damping: its sum with the diagonal leaves the dtype
                big = torch.finfo(A.dtype).max
                raise ValueError(_msg(func, "damping", "a damping whose sum with block "
                                      f"{bad[0]!r}'s Fisher diagonal is finite in "
                                      f"{str(A.dtype)[6:]} (<= {big:.3g})", f"damping={damping}"))
            _refuse_fisher(func, bad, blocks, n, held())
        dtype = A.dtype
        if A.element_size() < 4:  # LAPACK has no half-precision Cholesky: factor in float32
            A = A.float()
        L, info = torch.linalg.cholesky_ex(A)
        A = None
        bad = [b for b, i in zip(names, info.tolist(), strict=True) if i]
        if bad:
            raise ValueError(_msg(func, "damping", "a positive damping (or None) where "
                                  f"block {bad[0]!r}'s Fisher is singular",
                                  f"damping={damping}"))
        inv = torch.cholesky_inverse(L)
        if inv.dtype != dtype:  # (a dispatched .to costs an op even where it is a no-op)
            inv = inv.to(dtype)
        inverses.update(zip(names, inv.unbind(), strict=True))
    return inverses


def _held_rows(sk: _Sketches, blocks: tuple, factors: dict | None, buf: Tensor | None,
               feats: list, n: int, cfg):
    """``(start, phi)`` chunks of the training rows ``prepare`` holds (its factors formed in
    their spans, or its cached features); none where it holds none (``cache_features=False``).
    For the error path only."""
    if factors is not None:
        for r0, r1 in spans_of(cfg, sk, factors):
            yield r0, _factor_rows(sk, blocks, factors, r0, r1)
    elif buf is not None:
        yield 0, buf[:n]
    else:
        r0 = 0
        for phi in feats:
            yield r0, phi
            r0 += phi.shape[0]
