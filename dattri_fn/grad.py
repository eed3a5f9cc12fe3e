"""Gradients of per-example losses: the mean gradient and per-sample gradients by ``vmap``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

from ._checks import (
    batch_size,
    batch_to,
    blame_data,
    check_optional_int,
    check_params,
    iter_batches,
)
from ._types import Batch, Loss, Params
from .tree import ravel_batched


def _first_device(params: Params) -> torch.device:
    return next(iter(params.values())).device


def summed_loss(func: str, loss: Loss, params: Params, batch: Batch) -> Tensor:
    """Return ``sum_i loss(params, x_i)``; raise naming ``func(loss=...)`` unless each is 0-d.

    Without the check a ``[K]``-valued loss would be differentiated as the sum of its outputs.
    """
    out = vmap(loss, in_dims=(None, 0))(params, batch)
    if not isinstance(out, Tensor) or out.ndim != 1:
        got = (f"output shape {list(out.shape[1:])} per example" if isinstance(out, Tensor)
               else type(out).__name__)
        raise ValueError(f"{func}(loss=...): expected a per-example function returning a 0-d "
                         f"Tensor for ONE example, got {got}. Reduce it to a scalar, e.g. "
                         f".sum() or a margin.")
    return out.sum()


def _summed_loss(loss: Loss):
    def total(params: Params, batch: Batch) -> Tensor:
        return summed_loss("grad", loss, params, batch)

    return total


def grad(loss: Loss, params: Params, data, *, flat: bool = True) -> Tensor | Params:
    """Return the gradient of the mean loss ``(1/N) sum_i grad loss(params, x_i)``.  # -> [P]

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]``.
        params: the point of differentiation, ``dict[str, Tensor]``.
        data: one Batch or a re-iterable of Batches (list, DataLoader); N counts all examples.
        flat: return the raveled ``[P]`` vector (dict order) instead of a params-shaped dict.

    Raises:
        TypeError/ValueError: naming the argument, for a bad params dict or batch.
    """
    check_params("grad", "params", params)
    device = _first_device(params)
    total_grad = torch.func.grad(_summed_loss(loss))
    acc, n = None, 0
    for batch in iter_batches("grad", "data", data):
        n += batch_size("grad", "data", batch)
        with blame_data("grad", "data", batch):
            g = total_grad(params, batch_to(batch, device))
        acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
    if acc is None:
        raise ValueError("grad(data=...): expected at least one batch, got an empty iterable.")
    mean = {k: v / n for k, v in acc.items()}
    return torch.cat([v.reshape(-1) for v in mean.values()]) if flat else mean


def per_sample_grad(loss: Loss, params: Params, batch: Batch, *, chunk_size: int | None = None,
                    flat: bool = True) -> Tensor | Params:
    """Return every example's gradient ``G[i] = grad loss(params, x_i)``.  # -> [B, P]

    Computed by ``vmap(grad(loss))`` over the leading dim of every leaf of ``batch``.

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]``.
        params: ``dict[str, Tensor]``; rows of the result follow its ravel order.
        batch: a Tensor, tuple/list or dict of Tensors with leading dim ``B``; integer labels ok.
        chunk_size: examples per vmap call (bounds memory to ``chunk_size x P``); None = all.
        flat: return ``[B, P]``; otherwise ``{name: [B, *shape]}``.

    Raises:
        TypeError/ValueError: naming the argument, for a bad params dict, batch or chunk_size.

    Example:
        >>> G = per_sample_grad(loss, params, (x, y))      # [B, P]
        >>> G @ per_sample_grad(loss, params, (xt, yt)).T  # Grad-Dot scores [B, B_test]
    """
    check_params("per_sample_grad", "params", params)
    batch_size("per_sample_grad", "batch", batch)
    check_optional_int("per_sample_grad", "chunk_size", chunk_size)
    with blame_data("per_sample_grad", "batch", batch):
        grads = per_sample_grad_unchecked(loss, params, batch_to(batch, _first_device(params)),
                                          chunk_size=chunk_size)
    return ravel_batched(grads) if flat else grads


def per_sample_grad_unchecked(loss: Loss, params: Params, batch: Batch, *,
                              chunk_size: int | None = None,
                              func: str = "per_sample_grad") -> Params:
    """:func:`per_sample_grad` as a dict, without validation: for inner loops.  # {name: [B, ...]}

    ``func``: the public caller named by the error for a non-scalar loss.
    """
    try:
        return vmap(torch.func.grad(loss), in_dims=(None, 0), chunk_size=chunk_size)(params, batch)
    except RuntimeError as e:
        if "scalar" not in str(e):
            raise
        raise ValueError(f"{func}(loss=...): expected a per-example function (loss or "
                         "target) returning a 0-d Tensor for ONE example, got a non-scalar "
                         f"output ({e}). Reduce it to a scalar, e.g. .sum() or a margin.") from e
