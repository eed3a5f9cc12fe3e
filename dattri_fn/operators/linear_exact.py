"""The exact dense Hessian of a Linear-only model from per-layer factors
(:func:`linear_hessian`). The formulas, costs and limits ("the module docstring" below) are in
:mod:`dattri_fn.operators.linear_curvature`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from .._checks import _msg, batch_size, check_dense_fits
from ..transforms.layers import per_example_losses, unpack_example
from .linear_blocks import _BLOCK, _accumulate
from .linear_limits import (
    _augment,
    _autodiff,
    _check_close,
    _chunks,
    _first_pass,
    _flat_shapes,
    _probe_vector,
    _setup,
    _verified,
)

__all__ = ["linear_hessian"]



def _probe_terms(tapped, loss_fn, state, batch, like: Tensor, func: str):
    """Return per-example ``(a, g, Ht, T)`` for one batch (module docstring).

    ``a``, ``g``: ``{layer: [B, in]}``, ``{layer: [B, d]}``; ``Ht``: ``[B, D, D]``;
    ``T``: ``{layer m: [D, B, in_m]}`` (row ``o_l + j`` is ``d a_m / d e_l[j]``).
    """
    names = tapped.layers
    args, kwargs, target = unpack_example(batch)
    shapes = _flat_shapes(func, tapped, state, args, kwargs, like, batch_size(func, "data", batch))
    out_features = {n: s[1] for n, s in shapes.items()}

    def total(probes):
        out, acts = tapped(state, probes, *args, **kwargs)
        return per_example_losses(loss_fn, out, target).sum(), acts

    grad_acts = grad(total, has_aux=True)
    probes = {n: like.new_zeros(shapes[n]) for n in names}
    g, acts = grad_acts(probes)
    B, D = next(iter(shapes.values()))[0], sum(out_features.values())
    eye = torch.eye(D, dtype=like.dtype, device=like.device)
    tangents, start = {}, 0
    for n in names:
        d = out_features[n]
        tangents[n] = eye[:, None, start:start + d].expand(D, B, d)
        start += d
    dg, dacts = vmap(lambda t: jvp(grad_acts, (probes,), (t,))[1])(tangents)
    Ht = torch.cat([dg[n] for n in names], dim=-1).permute(1, 2, 0)
    return acts, g, Ht, dacts


def _hessian_terms(tapped, loss_fn, state, batch, like, layout, func):
    """:func:`_accumulate`'s ``(aug, Ht, g, dacts)`` for one batch."""
    acts, g, Ht, dacts = _probe_terms(tapped, loss_fn, state, batch, like, func)
    return _augment(acts, layout), Ht, g, dacts


def linear_hessian(module: nn.Module, loss_fn: Callable, params, data, *,
                   chunk_size: int | None = None, tapped=None,
                   batch_rows: int | None = None) -> Tensor:
    """Return the exact ``H = (1/N) sum_i hess loss_i`` of a Linear-only model.  # [P, P]

    Same matrix as ``hvp(loss, params, data).dense()`` (``loss_i = loss_fn(module(x_i),
    y_i)`` on a batch of one), built from per-layer factors instead of ``P`` Hessian-vector
    products (module docstring: the formula, the cost and the limits).

    Args:
        module: the model, within the module docstring's limits (its Linear layers captured
            by :mod:`dattri_fn.transforms.capture`).
        loss_fn: ``loss_fn(output, target) -> Tensor[]`` on a batch of one example.
        params: ``dict[str, Tensor]`` of weights (and optionally biases) of the module's Linear
            layers; their order is the ravel order of ``H``'s rows and columns.
        data: a Batch ``(*inputs, target)`` or a re-iterable of them (list, DataLoader).
        chunk_size: examples per batched pass (its memory: ``chunk_size x D x (D + sum_l
            (2 in_l + 1))`` numbers, ``D = sum_l out_l``); ``None``: as many as keep that within
            ``2**24``. Layer-pair products are split further to keep each intermediate there.
        tapped: :func:`linear_tap` of the same module and params, to trace once across
            calls; ``None`` traces anew.
        batch_rows: merge consecutive batches into passes of at least this many examples.

    Returns:
        ``[P, P]`` Tensor, symmetric up to rounding, in the params' dtype and device.

    Raises:
        TypeError, ValueError: bad module, loss_fn, params, data, chunk_size or batch_rows.
        FactoredCurvatureError (a ValueError): a model outside the module docstring's limits,
            including a first batch whose factored Hessian-vector product differs from
            autodiff's through the module.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
        >>> p = {k: v.detach() for k, v in net.named_parameters()}
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> H = linear_hessian(net, torch.nn.functional.cross_entropy, p, (x, y))
        >>> from dattri_fn import functional_model, hvp
        >>> fm = functional_model(net, torch.nn.functional.cross_entropy)
        >>> torch.allclose(H, hvp(fm.loss, p, (x, y)).dense())
        True
    """
    func = "linear_hessian"
    state, tapped, batches, chunk_size, layout, module, params = _setup(
        func, module, loss_fn, params, data, chunk_size, tapped, batch_rows)
    P = sum(v.numel() for v in params.values())
    like = state[f"{tapped.layers[0]}.weight"]
    if chunk_size is None:  # bound the per-chunk [B, D, D] and the D vmapped tangents
        D = sum((ws.stop - ws.start) // inp for ws, _, inp in layout.values())
        per_row = D * (D + sum(2 * inp + 1 for _, _, inp in layout.values()))
        chunk_size = max(1, _BLOCK // per_row)
    check_dense_fits(func, P, like.dtype, like.device)
    H = like.new_zeros(P, P)
    n_seen = 0
    for part, rows in _chunks(func, batches, batch_rows, chunk_size):
        step = lambda part=part: _accumulate(H, layout, *_hessian_terms(
            tapped, loss_fn, state, part, like, layout, func), feeds=True)
        if n_seen:
            step()
        else:
            _first_pass(func, step)
            done, sig = _verified(tapped, "hessian", part, loss_fn)
            if sig not in done:
                flat0, _, total = _autodiff(module, loss_fn, state, list(params), part)
                v = _probe_vector(P, like)
                ref = vjp(grad(total), flat0)[1](v)[0]  # H symmetric; reverse mode only
                _check_close(func, "the Hessian-vector product", H @ v, ref)
                done.add(sig)
        n_seen += rows
    if n_seen == 0:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    return H.div_(n_seen)
