"""Per-example losses of a batched output, and their sum for a capture pass's backward.

The loss helpers the batched passes of :mod:`dattri_fn.transforms.layers` share (moved here
from it; every name stays importable from there): :func:`per_example_losses` (one call where
the loss carries its batched form, else ``vmap``), :func:`cross_entropy_rows` and
:func:`summed_losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def tree_unsqueeze(x):
    """Add a leading batch dim of one to every Tensor leaf of ``x``."""
    return torch.utils._pytree.tree_map(
        lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)


def cross_entropy_rows(out: Tensor, target: Tensor) -> Tensor:
    """Return each row's ``F.cross_entropy`` on a batch of one, in one call.  # [B, C], [B] -> [B]

    ``reduction="none"`` gives the same values, except for an ignored target (-100), whose
    batch-of-one mean is over no term: NaN, restored here.
    """
    return F.cross_entropy(out, target, reduction="none").masked_fill(target == -100,
                                                                      float("nan"))


def per_example_losses(loss_fn, out, target) -> Tensor:
    """Return ``[loss_fn(out_i[None], target_i[None]) for i]``.  # -> [B]

    By ``vmap``, or in one call by ``loss_fn.per_example(out, target)`` when the loss carries
    that batched form (as :func:`~dattri_fn.eval.tasks.classification_loss` and
    :mod:`dattri_fn.losses` do), or for ``F.cross_entropy`` itself on ``[B, C]`` logits and
    class indices (~0.1 ms less per 500-row forward and backward on one CPU thread).
    """
    rows = getattr(loss_fn, "per_example", None)
    if rows is None and loss_fn is F.cross_entropy:
        rows = cross_entropy_rows
    if rows is not None and rows is not cross_entropy_rows and target is not None:
        return rows(out, target)
    if (rows is not None and isinstance(out, Tensor) and out.ndim == 2
            and isinstance(target, Tensor) and target.ndim == 1
            and not target.is_floating_point()):
        return rows(out, target)
    if isinstance(out, Tensor):
        if target is None:
            return torch.func.vmap(lambda o: loss_fn(tree_unsqueeze(o)))(out)
        return torch.func.vmap(lambda o, t: loss_fn(tree_unsqueeze(o), tree_unsqueeze(t)))(
            out, target)
    # A structured output (a Hugging Face ModelOutput): its non-tensor leaves (a KV cache
    # object) are passed whole, not mapped over.
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    dims = [0 if isinstance(t, Tensor) and t.ndim else None for t in leaves]

    def one(parts, *t):
        o = torch.utils._pytree.tree_unflatten(
            [x.unsqueeze(0) if isinstance(x, Tensor) and d == 0 else x
             for x, d in zip(parts, dims, strict=True)], spec)
        return loss_fn(o) if not t else loss_fn(o, tree_unsqueeze(t[0]))

    if target is None:
        return torch.func.vmap(one, in_dims=(dims,))(leaves)
    return torch.func.vmap(one, in_dims=(dims, 0))(leaves, target)


def summed_losses(loss_fn, out, target, *, rows: list | None = None) -> Tensor:
    """Return a scalar whose gradient w.r.t. ``out`` is that of ``per_example_losses(...).sum()``.

    For a loss whose per-example form is :func:`cross_entropy_rows` on ``[B, C]`` logits and
    class indices it is ``F.cross_entropy(out, target, reduction="sum")``: one op, no NaN mask.
    Its gradient is the same bit for bit (an ignored target's row gets zero either way, from
    the mask's backward or from ``nll_loss``'s); only the value differs there (0, not NaN). The
    capture passes use this value for its gradient alone.
    ``rows``: a list that receives ``per_example_losses(loss_fn, out, target)`` detached (the
    rows summed, or for that cross-entropy computed apart without grad): the scalar and its
    gradient are the same either way.
    """
    kind = getattr(loss_fn, "per_example", None)
    if ((kind is cross_entropy_rows or (kind is None and loss_fn is F.cross_entropy))
            and isinstance(out, Tensor) and out.ndim == 2 and isinstance(target, Tensor)
            and target.ndim == 1 and not target.is_floating_point()):
        if rows is not None:
            with torch.no_grad():
                rows.append(cross_entropy_rows(out, target))
        return F.cross_entropy(out, target, reduction="sum")
    per = per_example_losses(loss_fn, out, target)
    if rows is not None:
        rows.append(per.detach())
    return per.sum()
