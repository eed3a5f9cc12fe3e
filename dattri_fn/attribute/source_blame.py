"""SOURCE's refusal of training data that makes a segment's prepared state non-finite (issue 20):
checked by one summed reduction per segment (:func:`finite`); only where it fails are the
training examples scanned for the one to name (:func:`blame_train`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NoReturn

import torch
from torch import Tensor

from .._checks import _msg, batch_size, batch_slice, iter_batches
from .._types import Loss
from ..transforms.grad import Refuse
from .method import stacked_per_sample_grad


def finite(*tensors: Tensor) -> bool:
    """Whether every tensor is finite: one summed reduction (and one read-back) on normal data,
    each tensor's own test only where that sum is not finite (finite entries may sum to inf)."""
    total = sum(t.sum() for t in tensors)
    return math.isfinite(float(total)) or all(bool(torch.isfinite(t).all()) for t in tensors)


def blame_train(func: str, loss: Loss, group, keys: list[str], train, li: int, what: str,
                alone: Callable[[object], bool]) -> NoReturn:
    """Raise, for segment ``li`` whose ``what`` is not finite (failure path only), naming
    ``func(train=...)`` and one training example by its index over the whole of ``train``
    (batches counted in order): the first whose per-example gradient ``grad loss(theta_c, z)``
    at one of the segment's checkpoints is NaN/inf or has a squared norm beyond the dtype's
    largest float; else the first example of the first batch whose segment computed on that
    batch alone is not finite (``alone(batch) -> bool``: finite) that makes it so on its own
    (one segment per batch, then one per example of that batch: the curvature's own failure,
    e.g. a layer input whose ``a a^T`` overflows behind a zero gradient); else the segment."""
    stacked = {k: torch.stack([c.params[k] for c in group]) for k in keys}
    dtype = next(iter(stacked.values())).dtype
    big = torch.finfo(dtype).max
    where = f"segment {li}: {what} not finite"
    seen = 0
    for batch in iter_batches(func, "train", train):
        b = batch_size(func, "train", batch, first=seen)
        G = stacked_per_sample_grad(loss, stacked, batch,  # [C, b, P]
                                    refuse=Refuse(func.split(".")[0], "loss", capture=False))
        over = ~(G.square().sum(-1) <= big)  # [C, b], NaN too
        if bool(over.any()):
            i = int(over.any(0).nonzero()[0, 0])
            c = int(over[:, i].nonzero()[0, 0])
            n2 = float(G[c, i].double().square().sum())  # (an overflow's size, in float64)
            raise ValueError(_msg(
                func, "train", f"examples whose per-example gradients are finite, with a squared "
                f"norm finite in {str(dtype)[6:]} (<= {big:.3g})", f"a gradient of example "
                f"{seen + i} whose squared norm is {n2:.3g} at the checkpoint of step "
                f"{group[c].step} ({where})", "Remove or rescale that example, or compute in "
                "float64."))
        seen += b
    seen = 0
    for batch in iter_batches(func, "train", train):
        b = batch_size(func, "train", batch, first=seen)
        if not alone(batch):
            for i in range(b):
                if not alone(batch_slice(batch, i, i + 1)):
                    raise ValueError(_msg(
                        func, "train", "examples each of which gives SOURCE's segments a finite "
                        "curvature", f"example {seen + i}, whose own curvature alone is not "
                        f"finite ({where})", "Its layer inputs or outputs overflow the dtype, or (a "
                        "Hessian) its eigenvalues far below 0 overflow exp(-c lambda): remove or "
                        "rescale that example, pass curvature='gn' or a larger damping, or "
                        "compute in float64."))
            break  # the batch fails as a whole: no one example
        seen += b
    raise ValueError(_msg(
        func, "train", f"training data that gives segment {li} (checkpoints at steps "
        f"{[c.step for c in group]}) a finite state", f"NaN or inf in {what}, every example "
        "finite on its own", "A Hessian with eigenvalues far below 0 overflows exp(-c lambda): "
        "pass curvature='gn' or a larger damping, or compute in float64."))
