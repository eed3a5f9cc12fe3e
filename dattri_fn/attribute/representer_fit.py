"""Fitting the L2-regularised last layer that the representer decomposition needs
(:func:`dattri_fn.attribute.representer.representer`'s ``refit``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    blame_data,
    blame_keys,
    check_int,
    check_params,
    check_positive,
    check_tensor,
)
from .._types import Params
from ..solve.lbfgs import _lbfgs

_NEWTON_ENTRIES = 4096  # heads up to this size finish with dense Newton steps,


_NEWTON_WORK = 2**27  # when head entries x n x K (the Hessian's intermediates) stay below this


def fit_head(head_fn: Callable[[Params, Tensor], Tensor],
             loss_on_logits: Callable[[Tensor, Tensor], Tensor], params: Params, features: Tensor,
             targets: Tensor, *, l2: float, max_iter: int = 500, tol: float = 1e-7) -> Params:
    """Return ``params`` with the head replaced by the minimiser of the L2-regularised head loss.

    ``W* = argmin_W (1/n) sum_i L(head_fn(W, h_i), t_i) + l2 |W|^2`` over the entries of
    ``params`` that ``head_fn``'s output depends on (the others, e.g. a body, are returned
    as given). For a linear head this is strictly convex and ``W*`` is the stationary point the
    representer theorem needs (Yeh et al. fine-tune the last layer this way). Solved in float64
    by L-BFGS (compact form, Armijo backtracking) from ``params``, then (heads of up to 4,096
    entries, and entries x n x K up to 2**27: ~1 GiB of float64 intermediates for the dense
    Hessian) dense Newton steps, until the largest gradient entry is at most
    ``tol * max(1, its value at the start)``; warns when it is still above. ``W*`` is then
    within ``|grad| / (2 l2)`` of the exact minimiser (strong convexity).

    Args:
        features: ``h_i``.  # [n, F]
        targets: what ``loss_on_logits`` takes per example: class labels ``[n]`` or, e.g.,
            the model's own predicted probabilities ``[n, K]``.
        l2: ``> 0``, the coefficient of ``|W|^2`` (no 1/2).

    Raises:
        ValueError: ``head_fn`` depends on none of ``params``, or a bad setting.
    """
    func = "fit_head"
    for arg, fn in (("head_fn", head_fn), ("loss_on_logits", loss_on_logits)):
        if not callable(fn):
            raise TypeError(_msg(func, arg, "a callable", type(fn).__name__))
    l2 = check_positive(func, "l2", l2)
    max_iter = check_int(func, "max_iter", max_iter)
    tol = check_positive(func, "tol", tol)
    params = check_params(func, "params", params)
    check_tensor(func, "features", features, ndim=2, floating=True)
    check_tensor(func, "targets", targets)
    if targets.shape[:1] != features.shape[:1]:
        raise ValueError(_msg(func, "targets", "one target per row of features "
                              f"{list(features.shape)}", f"shape {list(targets.shape)}"))
    dtypes = {v.dtype for v in params.values()}
    if features.dtype not in dtypes:
        raise TypeError(_msg(func, "features", f"the params' dtype {sorted(map(str, dtypes))}",
                             str(features.dtype)))
    probe = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with blame_keys(func, "params", params), blame_data(func, "targets", (features, targets)):
        logits0 = head_fn(probe, features[0])
        loss_on_logits(logits0.detach(), targets[0])
        # every target through the loss once: a class index out of range is named here
        vmap(loss_on_logits)(vmap(head_fn, in_dims=(None, 0))(params, features).detach(),
                             targets)
    used = (torch.autograd.grad(logits0.sum(), list(probe.values()), allow_unused=True)
            if isinstance(logits0, Tensor) and logits0.requires_grad else [None] * len(probe))
    keys = [k for k, g in zip(probe, used, strict=True) if g is not None]
    if not keys:
        raise ValueError(_msg(func, "params", "the parameters head_fn reads",
                              "none that its output depends on"))
    h = features.detach().to(torch.float64)
    t = targets.detach().to(torch.float64) if targets.is_floating_point() else targets.detach()
    fixed = {k: v.detach().to(torch.float64) for k, v in params.items() if k not in keys}
    per_example = vmap(lambda p, hi, ti: loss_on_logits(head_fn(p, hi), ti), in_dims=(None, 0, 0))
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]

    def objective(flat: Tensor) -> Tensor:  # the head's entries raveled, float64
        ws = [v.reshape(shape) for v, shape in zip(flat.split(sizes), shapes, strict=True)]
        return per_example({**fixed, **dict(zip(keys, ws, strict=True))}, h, t).mean() \
            + l2 * (flat * flat).sum()

    grad_fn = torch.func.grad(objective)

    def value_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        # plain autograd through the vmapped objective: the cheapest (value, gradient) here
        x = x.detach().requires_grad_(True)
        value = objective(x)
        return value.detach(), torch.autograd.grad(value, x)[0]

    flat = torch.cat([params[k].detach().to(torch.float64).reshape(-1) for k in keys])
    value, g = value_grad(flat)
    bound = tol * max(1.0, float(g.abs().max()))
    flat, g = _lbfgs(value_grad, flat, value, g, bound, max_iter)
    work = flat.numel() * h.shape[0] * logits0.numel()
    if flat.numel() <= _NEWTON_ENTRIES and work <= _NEWTON_WORK:
        # A line search stalls near round-off; Newton converges quadratically from here.
        for _ in range(8):
            if float(g.abs().max()) <= bound:
                break
            flat = flat - torch.linalg.solve(torch.func.hessian(objective)(flat), g)
            g = grad_fn(flat)
    left = float(g.abs().max())
    if left > bound:
        warnings.warn(f"fit_head: the head loss's largest gradient entry is {left:.2e} > "
                      f"{bound:.2e} after max_iter={max_iter} L-BFGS steps (and Newton for "
                      f"<= {_NEWTON_ENTRIES} entries); the representer "
                      "decomposition is then approximate (raise max_iter or l2).", stacklevel=2)
    fitted = dict(zip(keys, flat.split(sizes), strict=True))
    return {k: (fitted[k].reshape(v.shape).to(v.dtype) if k in fitted else v)
            for k, v in params.items()}


def _soft_targets(logits: Tensor) -> Tensor:
    """The model's own predicted probabilities: ``softmax`` of ``[..., K]`` logits, or for one
    logit the 0-d probability ``sigmoid(s)`` of class 1 per example (a label's shape)."""
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[..., 0])
    return torch.softmax(logits, -1)
