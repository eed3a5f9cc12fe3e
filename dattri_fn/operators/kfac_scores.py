"""Scoring layer by layer against a K-FAC/EK-FAC inverse, from captured layer inputs and output
gradients: no ``[B, P]`` gradient rows (see :mod:`dattri_fn.operators.kfac` for the method)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .._checks import check_int
from .._types import LinOp
from .kfac_inverse import _compute_dtype
from .kfac_stats import _tokens

__all__ = ["low_rank_blocks", "layer_scores", "layer_self_scores"]


# Entries of one chunk of per-example gradient blocks [b, out, in]. The chunks are formed in the
# backward pass beside the model's activations: kept well below one activation of a sequence
# model (~0.5-1 MiB) they add little to the peak, and glibc reuses their freed memory (with
# 2**20 here and 2**18 in the Lambda pass, benchmarks.kronfluence_ekfac's peak was 1.09x this
# one's; the smaller chunks cost 2-6% more CPU time on text-lm's 500 x 50 EK-FAC scores).
_BLOCK_ENTRIES = 2**16


def _as(t: Tensor, dtype) -> Tensor:
    return t if dtype is None else t.to(dtype)


def _pair_scores(a: Tensor, g: Tensor, M: Tensor, dtype) -> Tensor:
    """``s[b, j] = sum_t g_bt^T M_j a_bt``.  # a [B, T, i], g [B, T, o], M [n, o, i] -> [B, n]"""
    B, T, i = a.shape
    n, o = M.shape[:2]
    a, g, M = _as(a, dtype), _as(g, dtype), _as(M, dtype)
    if T == 1 and n <= i:
        # (M_j a_b) . g_b: [B, n, o] products, never the [B, o, i] gradient blocks
        X = (a[:, 0] @ M.reshape(n * o, i).T).reshape(B, n, o)
        # einsum("bno,bo->bn") lowers to this bmm (the same bits) after 2-3 permute/reshape
        # copies: 0.48 against 0.71 ms on digits-lr's [500, 50, 10]
        return torch.bmm(X, g[:, 0, :, None])[..., 0]
    # <DW_b, M_j> with DW_b = sum_t g_bt a_bt^T: B o i (T + n) flops, the fewest for T > 1;
    # the blocks are formed a chunk of rows at a time, one layer at a time.
    Mf = M.reshape(n, o * i).T
    step = max(1, _BLOCK_ENTRIES // (o * i))
    parts = [(g[r:r + step].mT @ a[r:r + step]).reshape(-1, o * i) @ Mf for r in range(0, B, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _low_rank_pair_scores(a: Tensor, g: Tensor, L: Tensor, R: Tensor, dtype) -> Tensor:
    """``s[b, j] = sum_t (g_bt^T L_j) . (R_j a_bt)``.  # a [B, T, i], g [B, T, o], L [n, o, r],
    R [n, r, i] -> [B, n]: ``B T n r (o + i)`` flops instead of ``B o i n``."""
    B, T, i = a.shape
    n, o, r = L.shape
    a, g, L, R = _as(a, dtype), _as(g, dtype), _as(L, dtype), _as(R, dtype)
    gl = (g.reshape(B * T, o) @ L.permute(1, 0, 2).reshape(o, n * r)).reshape(B, T, n * r)
    ra = (a.reshape(B * T, i) @ R.permute(2, 0, 1).reshape(i, n * r)).reshape(B, T, n * r)
    return (gl * ra).sum(1).reshape(B, n, r).sum(-1)


def low_rank_blocks(blocks: dict[str, Tensor], rank: int) -> dict[str, Tensor | tuple]:
    """Return each ``[n, out, in(+1)]`` block as its rank-``rank`` SVD truncation ``(U_r S_r,
    V_r^T)`` (``[n, out, r]``, ``[n, r, in(+1)]``), or whole where ``min(out, in(+1)) <= rank``.

    kronfluence's low-rank query gradients (``query_gradient_low_rank``; here the exact SVD,
    not a randomised one): :func:`layer_scores` then costs ``r (out + in)`` per token and test
    row instead of ``out * in``, and the test side holds ``r (out + in)`` numbers per layer.
    """
    rank = check_int("low_rank_blocks", "rank", rank)
    out = {}
    for layer, M in blocks.items():
        if M.ndim == 2 or min(M.shape[-2:]) <= rank:  # [n, p]: a diagonal group, kept whole
            out[layer] = M
            continue
        U, S, Vh = torch.linalg.svd(M.to(_compute_dtype(M)), full_matrices=False)
        out[layer] = ((U[..., :rank] * S[..., None, :rank]).to(M.dtype),
                      Vh[..., :rank, :].to(M.dtype))
    return out


def layer_scores(io: dict[str, tuple[Tensor, Tensor]], blocks: dict[str, Tensor | tuple], *,
                 dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Return ``s_l[i, j] = <DW_il, M_jl> = sum_t g_it^T M_jl a_it`` per layer.  # {layer: [B, n]}

    The per-layer scores of training gradients ``DW_i = sum_t g_it a_it^T`` (captured ``a``,
    ``g`` from :func:`dattri_fn.transforms.layers.batched_io`) against test-side blocks ``M_j``
    (e.g. ``op.blocks(ihvp(G_test))`` of an inverse from :func:`ihvp_ekfac`), summed over layers
    the influence ``g_i^T (F + damping I)^-1 g_j``. No ``[B, P]`` matrix is formed: at most one
    layer's ``[b, out, in]`` gradient blocks, ``b`` rows at a time (about 2^16 entries).

    A diagonal group of the inverse (:mod:`.kfac_diag`, ``blocks[group]`` ``[n, p]``) is scored
    from the training examples' gradients of its keys, ``io[group]`` ``[B, p]``: ``s = rows
    M^T``.

    Args:
        io: ``{layer: (a, g)}``, ``a`` ``[B, (T,) in]``, ``g`` ``[B, (T,) out]``; ``{group:
            [B, p]}`` per-example gradients for a diagonal group.
        blocks: ``{layer: [n, out, in(+1)]}``; one column more than ``a`` means the layer's
            bias is scored too (``a`` is augmented with ones). A pair ``(L [n, out, r],
            R [n, r, in(+1)])`` (from :func:`low_rank_blocks`) stands for ``M_j = L_j R_j``,
            scored as ``sum_t (g_t^T L_j) . (R_j a_t)`` where that takes fewer flops than
            forming ``M_j`` (``T n r (out + in)`` against ``out in (T + n)`` per example).
        dtype: the dtype of the products (e.g. ``torch.bfloat16``); None: the blocks'. The
            scores are returned in the blocks' dtype.
    """
    out = {}
    for layer, M in blocks.items():
        if isinstance(M, Tensor) and M.ndim == 2:  # a diagonal group: rows of gradients
            out[layer] = (_as(io[layer], dtype) @ _as(M, dtype).T).to(M.dtype)
            continue
        a, g = io[layer]
        if isinstance(M, tuple):
            L, R = M
            a, g = _tokens(a, g, R.shape[-1] == a.shape[-1] + 1)
            (n, o, r), (T, i) = L.shape, a.shape[1:]
            # the fewer flops per training example: the factored pair, or M = L R formed once
            # (the dense path shares the per-example blocks over every test row when T > 1)
            if T * n * r * (o + i) <= o * i * (T + n if T > 1 else n):
                out[layer] = _low_rank_pair_scores(a, g, L, R, dtype).to(L.dtype)
            else:
                out[layer] = _pair_scores(a, g, L @ R, dtype).to(L.dtype)
            continue
        a, g = _tokens(a, g, M.shape[-1] == a.shape[-1] + 1)
        out[layer] = _pair_scores(a, g, M, dtype).to(M.dtype)
    return out


def layer_self_scores(op: LinOp, io: dict[str, tuple[Tensor, Tensor]], *,
                      layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Return ``<DW_il, (F_l + damping I)^-1 DW_il>`` per layer and example.  # {layer: [B]}

    In the eigenbasis: ``sum((Q_G^T DW_il Q_A)^2 / (Lambda_l + damping))``, with ``op`` an
    inverse from :func:`ihvp_kfac` / :func:`ihvp_ekfac` (its ``eigen``); ``layers``: those of
    ``io`` to score (None: every part of ``op``). A diagonal group (``op.diagonal``,
    :mod:`.kfac_diag`) takes ``io[group]`` = the ``[B, p]`` gradients of its keys and scores
    ``sum(g_i^2 / (D + damping))``.
    """
    QA, QG, scale = op.eigen
    diagonal = getattr(op, "diagonal", {})
    out = {}
    for layer in (op.parts if layers is None else layers):
        if layer in diagonal:
            rows = io[layer]
            out[layer] = (rows * rows * diagonal[layer][1].to(rows.dtype)).sum(1)
            continue
        a, g = io[layer]
        qa, qg, sc = QA[layer].to(a.dtype), QG[layer].to(a.dtype), scale[layer].to(a.dtype)
        a, g = _tokens(a, g, qa.shape[0] == a.shape[-1] + 1)
        o, i = g.shape[-1], a.shape[-1]
        step = max(1, _BLOCK_ENTRIES // (o * i))
        parts = []
        for r in range(0, a.shape[0], step):
            R = qg.T @ (g[r:r + step].mT @ a[r:r + step]) @ qa
            parts.append((R * R * sc).sum((1, 2)))
        out[layer] = torch.cat(parts)
    return out
