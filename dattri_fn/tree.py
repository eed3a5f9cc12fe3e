"""Params-dict arithmetic and raveling (the analogue of ``jax.flatten_util.ravel_pytree``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ._checks import check_int, check_params, check_tensor
from ._types import Params


def num_params(params: Params) -> int:
    """Return ``P``, the total number of entries of a params dict."""
    if not isinstance(params, Mapping):
        raise TypeError(f"num_params(params=...): expected a dict[str, Tensor], got "
                        f"{type(params).__name__}.")
    bad = [k for k, v in params.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"num_params(params=...): expected Tensor values, got "
                        f"{type(params[bad[0]]).__name__} at key {bad[0]!r}.")
    return sum(v.numel() for v in params.values())


def ravel(params: Params) -> tuple[Tensor, Callable[[Tensor], Params]]:
    """Return ``(flat, unravel)``: the params concatenated in dict order, and its inverse.  # [P]

    ``unravel`` also accepts a batched ``[..., P]`` tensor and returns ``{name: [..., *shape]}``.
    """
    check_params("ravel", "params", params)
    names = list(params)
    shapes = [tuple(params[n].shape) for n in names]
    sizes = [params[n].numel() for n in names]
    total = sum(sizes)
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def unravel(vec: Tensor) -> Params:
        check_tensor("unravel", "vec", vec, finite=False)
        if vec.ndim == 0 or vec.shape[-1] != total:
            raise ValueError(
                f"unravel(vec=...): expected last dim {total}, got shape {list(vec.shape)}."
            )
        lead = vec.shape[:-1]
        parts = torch.split(vec, sizes, dim=-1)
        return {n: p.reshape((*lead, *s)) for n, p, s in zip(names, parts, shapes, strict=True)}

    return flat, unravel


def ravel_batched(tree: Params, batch_dims: int = 1) -> Tensor:
    """Concatenate ``{name: [B, *shape]}`` into ``[B, P]`` (dict order).  # -> [B, P]"""
    if not isinstance(tree, Mapping) or not tree:
        raise TypeError(f"ravel_batched(tree=...): expected a non-empty dict[str, Tensor], got "
                        f"{type(tree).__name__}.")
    for k, v in tree.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"ravel_batched(tree=...): expected Tensor values, got "
                            f"{type(v).__name__} at key {k!r}.")
    check_int("ravel_batched", "batch_dims", batch_dims, minimum=0)
    leaves = list(tree.values())
    lead = leaves[0].shape[:batch_dims]
    bad = {k: list(v.shape) for k, v in tree.items()
           if v.ndim < batch_dims or v.shape[:batch_dims] != lead}
    if bad:
        raise ValueError(f"ravel_batched(tree=...): expected every leaf to lead with the batch "
                         f"dims {list(lead)} of {next(iter(tree))!r}, got shapes {bad}.")
    return torch.cat([v.reshape(*lead, -1) for v in leaves], dim=-1)


def block_slices(params: Params) -> dict[str, slice]:
    """Return ``{name: slice}`` locating each tensor inside the raveled vector."""
    out, start = {}, 0
    for name, v in params.items():
        out[name] = slice(start, start + v.numel())
        start += v.numel()
    return out


def tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """Apply ``fn`` leaf-wise over dicts with the same keys."""
    for other in rest:
        if list(other) != list(tree):
            raise ValueError(
                f"tree_map(rest=...): expected keys {list(tree)}, got {list(other)}."
            )
    return {k: fn(v, *(o[k] for o in rest)) for k, v in tree.items()}


def tree_add(a: Params, b: Params, alpha: float = 1.0) -> Params:
    """Return ``a + alpha * b`` leaf-wise."""
    return tree_map(lambda x, y: x + alpha * y, a, b)


def tree_dot(a: Params, b: Params) -> Tensor:
    """Return ``<a, b>`` summed over all leaves.  # -> []"""
    return sum((x * y).sum() for x, y in zip(a.values(), b.values(), strict=True))
