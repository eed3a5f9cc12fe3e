"""Gradient similarity's one capture pass over ``[test, *train]``: its byte estimate and scores.

Grad-Dot/Grad-Cos/TracIn take both sides' factors from one capture pass while
``rows * row_bytes(batch)`` stays within :func:`~dattri_fn.operators.gauss_newton.memory_budget`
(:func:`~dattri_fn.attribute.capture_rows.in_one_pass`). Per example and checkpoint a pass holds

    flat layers:      in + out                  (one row of a and g)
    sequence layers:  T (in + out),  T <= numel of one example's leaves
    dense layers:     out * in                  (materialised per example, or layout unknown)
    dense params:     their numel

numbers of ``itemsize`` bytes, where a layer's kind is the checked plan's layout (``"dense"``
where the plan has not decided it yet). :func:`one_pass_scores` forms the scores from that
pass's rows per given train batch, as :func:`~dattri_fn.attribute.pipeline.stream_scores` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import batch_leaves
from .._types import Batch, Params
from .pipeline import TopK, check_finite_scores, merge_topk


def pass_row_bytes(plan, stacked: Params) -> Callable[[Batch], int]:
    """Return ``batch -> bytes`` per example of one capture pass of ``plan`` at the ``C``
    stacked checkpoints ``{key: [C, ...]}`` (module docstring).  # -> int"""
    v0 = next(iter(stacked.values()))
    C, itemsize = v0.shape[0], v0.element_size()
    kinds = dict(plan.layout)
    flat = widths = dense = 0
    for n, (wk, _) in plan.layers.items():
        if wk is None:
            continue
        w = stacked[wk][0]
        width = w.shape[0] + w.numel() // max(w.shape[0], 1)
        layer_kind = kinds.get(n, "dense")
        if layer_kind == "flat":  # one (in + out) row per example
            flat += width
        else:
            widths += width
        if layer_kind == "dense":  # materialised per example (or not known)
            dense += w.numel()
    dense += sum(stacked[k][0].numel() for k in plan.rest)

    def row_bytes(batch) -> int:
        # a layer at T positions holds T (in + out) per example, T <= an example's numel
        per_row = sum(t[0].numel() for t in batch_leaves(batch) if t.ndim)
        return C * itemsize * (flat + max(1, per_row) * widths + dense)

    return row_bytes


def one_pass_scores(name: str, train_rows, test_rows, sizes, top_k: int | None,
                    largest: bool) -> Tensor | TopK:
    """Return ``train_rows``' scores against ``test_rows`` (both ``LayerGrads``), formed per
    given train batch of ``sizes`` rows as stream_scores forms them (top-k merged per block;
    the full matrix scanned for non-finite values once).  # -> [n_train, n_test]"""
    flat = _flat_sides(train_rows, test_rows)
    out, best, offset = None, None, 0
    if flat is not None and top_k is None:
        out = train_rows.dense.new_empty((train_rows.num_rows, test_rows.num_rows))
    for rows in sizes:
        if flat is not None:
            block = _flat_block(train_rows, flat, offset, offset + rows,
                                None if out is None else out[offset:offset + rows])
        else:
            block = train_rows.rows(offset, offset + rows).scores(test_rows)  # [b, n_test]
        if top_k is not None:
            check_finite_scores(name, block)
            best = merge_topk(best, block, offset, top_k, largest)
        elif flat is None:
            if out is None:
                out = block.new_empty((train_rows.num_rows, block.shape[1]))
            out[offset:offset + rows] = block
        offset += rows
    if top_k is not None:
        return best
    # the blocks' one scan, after they are written (the same error as per block)
    check_finite_scores(name, out)
    return out


def _flat_sides(train_rows, test_rows):
    """``(test dense^T or None, [(layer, a^T, g^T)])`` of the test side when both sides are one
    checkpoint of flat factors (``[1, B, in]``) in one layout without tied keys, else None.

    The test side's transposes are then taken once, not per block, and each block is
    :meth:`LayerGrads.scores`' own ops in its order (one bmm per term, the terms summed in
    layout order), so the scores are torch.equal to its."""
    if train_rows.dense.shape[0] != 1 or not train_rows.factors or any(
            a.ndim != 3 for a, _ in train_rows.factors.values()) or any(
            src[0] == "t" for _, src in train_rows.layout) or not train_rows._same_layout(
            test_rows):
        return None
    dense_t = test_rows.dense.transpose(1, 2) if train_rows.dense.shape[-1] else None
    return dense_t, [(n, a2.transpose(1, 2), g2.transpose(1, 2))
                     for n, (a2, g2) in test_rows.factors.items()]


def _flat_block(train_rows, flat, start: int, stop: int, dst: Tensor | None) -> Tensor:
    """Rows ``[start, stop)``' scores from :func:`_flat_sides`' test side, written into ``dst``
    where given (a lone term's product straight into it).  # -> [stop - start, n_test]"""
    dense_t, terms = flat
    out = None if dense_t is None else torch.bmm(train_rows.dense[:, start:stop], dense_t)[0]
    for i, (n, a2t, g2t) in enumerate(terms):
        a, g = train_rows.factors[n]
        aa, gg = torch.bmm(a[:, start:stop], a2t), torch.bmm(g[:, start:stop], g2t)
        if out is None and dst is not None and i == len(terms) - 1:
            return torch.mul(aa[0], gg[0], out=dst)
        term = aa[0] * gg[0]
        out = term if out is None else out + term
    return out if dst is None else dst.copy_(out)
