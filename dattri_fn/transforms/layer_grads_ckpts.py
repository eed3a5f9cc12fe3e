"""Several checkpoints of :mod:`dattri_fn.transforms.layer_grads`' captured path one by one:
whether they may go through the plain batched pass in turn (:func:`_by_checkpoint_ok`) and the
stacking of its results (:func:`_by_checkpoint`). Moved out of
:mod:`~dattri_fn.transforms.layer_grads_paths` (which imports and re-exports both) to keep that
module within the house size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._types import Params

if TYPE_CHECKING:
    from .layer_grads import LayerPlan


def _by_checkpoint_ok(plan: LayerPlan, plain: bool) -> bool:
    """Whether several checkpoints go one by one through the plain batched pass, not vmapped.

    C plain passes cost less than one pass vmapped over the checkpoints (no functorch wrapping,
    no probe-shape forward: ~20% of the pass on the digits MLP) and give each checkpoint the
    C = 1 pass's ``(a, g)`` bit for bit. Only without dense parameters (those need vmap over
    examples) and outside transforms; and not for Conv2d layers, whose vmapped pass (one
    grouped convolution) rounds differently, so that their scores keep their last bits.
    """
    return plain and not plan.autodiff and all(plan.tapped.specs[n].kind != "conv2d"
                                           for n in plan.layers)


def _by_checkpoint(fn, stacked: Params, C: int) -> tuple[dict, Params]:
    """``fn``'s ``({layer: (a, g)}, {key: grad})`` at each checkpoint, stacked ``[C, ...]``.

    Outside autograd and torch.func each result is written into the stack as it comes (peak:
    the stack and one checkpoint's); otherwise ``torch.stack`` keeps the graph / batching.
    """
    parts = [fn({k: v[0] for k, v in stacked.items()})]
    leaves = [t for pair in parts[0][0].values() for t in pair] + list(parts[0][1].values())
    if torch._C._functorch.maybe_current_level() is not None or any(
            t.requires_grad for t in leaves):
        parts += [fn({k: v[c] for k, v in stacked.items()}) for c in range(1, C)]
        raw = {n: (torch.stack([p[0][n][0] for p in parts]),
                   torch.stack([p[0][n][1] for p in parts])) for n in parts[0][0]}
        return raw, {k: torch.stack([p[1][k] for p in parts]) for k in parts[0][1]}
    raw = {n: tuple(t.new_empty((C, *t.shape)) for t in pair) for n, pair in parts[0][0].items()}
    rest = {k: t.new_empty((C, *t.shape)) for k, t in parts[0][1].items()}
    for c in range(C):
        io, dense = parts.pop() if c == 0 else fn({k: v[c] for k, v in stacked.items()})
        for n, pair in io.items():
            for dst, t in zip(raw[n], pair, strict=True):
                dst[c] = t
        for k, t in dense.items():
            rest[k][c] = t
        del io, dense
    return raw, rest
