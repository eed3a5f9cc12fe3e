"""Influence's training data as one batch, and the batched loss it checks against the per-example one.

:func:`_concat` joins the training batches (LiSSA's mini-batches are drawn from all of them);
:func:`_batched_train` is every example's loss from one forward, used where :func:`_independent`
says the module cannot mix examples and :func:`_same_losses` agrees on the first few.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from .._checks import _msg, _rebuilt, batch_cat, batch_size, batch_slice, iter_batches
from .._types import Loss, Params
from ..model import FunctionalModel, batched_loss


def _concat(train, func: str = "influence") -> Any:
    batches = list(iter_batches(func, "train", train))
    try:
        return batch_cat(batches)
    except (RuntimeError, TypeError, KeyError, IndexError) as err:
        # e.g. dynamic padding: the examples are fine, their batches differ in length (RU2 M3)
        shapes = list(dict.fromkeys(str(tree_map(lambda t: list(t.shape) if isinstance(
            t, torch.Tensor) else t, b)) for b in batches))
        raise ValueError(_msg(func, "train", "batches that concatenate along the first dim "
                              "(LiSSA draws its mini-batches from all training examples at "
                              "once)", f"batches of different layouts or trailing shapes: "
                              f"{'; '.join(shapes[:3])}", "Pad every batch to one length "
                              "(attention_mask 0, labels -100), or use solver 'cg', "
                              "'explicit' or 'arnoldi', which take such batches.")) from err


def _independent(model: FunctionalModel) -> bool:
    """True when ``model``'s module cannot mix the examples of a batch: no BatchNorm or dropout
    in training mode (batch statistics, or one draw for the batch where ``vmap`` refuses)."""
    mixing = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)
    return not any(m.training and isinstance(m, mixing) for m in model.module.modules())


def _batched_train(model: FunctionalModel, l2: float):
    """``(p, batch) -> [B]``: ``loss(p, x_i) + l2 |p|^2`` for every example from ONE forward
    (:func:`~dattri_fn.model.batched_loss`); exact for a module whose examples do not interact."""
    rows = batched_loss(model)
    if l2 == 0:
        return rows
    return lambda p, b: rows(p, b) + l2 * sum((v * v).sum() for v in p.values())


# Examples compared, once per prepare, between the batched loss and the per-example one.
_CHECK_ROWS = 3


def _example(batch, i: int):
    """Example ``i`` of a batch (tensor, tuple/list or dict of tensors), its batch dim removed."""
    if isinstance(batch, torch.Tensor):
        return batch[i]
    if isinstance(batch, dict):
        return {k: v[i] for k, v in batch.items()}
    return _rebuilt(batch, [v[i] for v in batch])


def _same_losses(per_example: Loss, batched, params: Params, data,
                 func: str = "influence") -> bool:
    """True when ``batched`` gives ``per_example``'s values on the first few examples of
    ``data`` (a custom ``unpack`` or a forward that mixes examples would not)."""
    k = min(_CHECK_ROWS, batch_size(func, "train", data, first=0))  # (all rows: indices)
    with torch.no_grad():  # a loop, not vmap: vmap's loss batching rules import sympy
        one = torch.stack([per_example(params, _example(data, i)) for i in range(k)])
        many = batched(params, batch_slice(data, 0, k))
    if not isinstance(many, torch.Tensor) or many.shape != one.shape:
        return False
    return bool(torch.allclose(many, one, rtol=1e-5, atol=1e-6 * float(one.abs().max())))
