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
    out, best, offset = None, None, 0
    for rows in sizes:
        block = train_rows.rows(offset, offset + rows).scores(test_rows)  # [b, n_test]
        if top_k is not None:
            check_finite_scores(name, block)
            best = merge_topk(best, block, offset, top_k, largest)
        else:
            if out is None:
                out = block.new_empty((train_rows.num_rows, block.shape[1]))
            out[offset:offset + rows] = block
        offset += rows
    if top_k is not None:
        return best
    # the blocks' one scan, after they are written (the same error as per block)
    check_finite_scores(name, out)
    return out
