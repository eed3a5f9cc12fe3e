"""The Gauss-Newton operator of a Linear-only model from cached per-layer factors
(:func:`linear_gnvp`). The formulas, costs and limits ("the module docstring" below) are in
:mod:`dattri_fn.operators.linear_curvature`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, vjp, vmap

from .._checks import _msg, batch_size, batch_slice, check_dense_fits, peek
from .._types import LinOp
from ..transforms.layers import per_example_losses, unpack_example
from .linear_blocks import _accumulate
from .linear_limits import (
    _CHECK_ROWS,
    _augment,
    _autodiff,
    _check_close,
    _chunks,
    _first_pass,
    _flat_shapes,
    _probe_vector,
    _refuse,
    _setup,
    _verified,
)

__all__ = ["FactoredOperator", "linear_gnvp"]



_ROW_BLOCK = 2**22  # numbers in one [B, k d] intermediate of a cached linear_gnvp product


class FactoredOperator(LinOp):
    """A :class:`~dattri_fn._types.LinOp` whose ``dense()`` assembles ``[P, P]`` from its
    factors (per layer pair, ``2 N P_l P_m`` flops) instead of applying it to ``P`` unit rows;
    ``dense``'s ``chunk_size`` is accepted and unused.

    ``factors``: the kept per-batch ``(a, J, A)`` of :func:`linear_gnvp` (``J[layer]`` None
    where it is exactly the identity), or None when they are rebuilt per call;
    ``on_rows(idx)``: the same operator over the examples ``idx`` of the concatenated data
    (needs kept factors)."""

    __slots__ = ("_dense", "factors", "_rows")

    def __init__(self, matmat, dense, dim, dtype, device, name="LinOp", factors=None,
                 rows=None):
        super().__init__(matmat, dim, dtype, device, name)
        self._dense = dense
        self.factors = factors
        self._rows = rows

    def dense(self, chunk_size: int | None = 256) -> Tensor:
        return self._dense()

    def on_rows(self, idx: Tensor) -> LinOp:
        """``V -> (1/|idx|) sum_{i in idx} J_i^T A_i J_i V``: the Gauss-Newton of the examples
        ``idx`` (indices into the data in order), from the kept factors.  # [k, P] -> [k, P]"""
        if self._rows is None:
            raise ValueError(_msg("FactoredOperator.on_rows", "idx", "an operator that keeps "
                                  "its factors (cache=True or within its budget)",
                                  "one that rebuilds them per call"))
        return self._rows(idx)


def _gn_terms(tapped, loss_fn, state, batch, like: Tensor, layout: dict, func: str,
              out_hessian=None):
    """Return ``(a, J, A)`` for one batch: ``{layer: [B, in(+1)]}`` (augmented with a column
    of ones when the bias is a param), ``{layer: [B, C, d]}`` and ``[B, C, C]``."""
    names = tapped.layers
    args, kwargs, target = unpack_example(batch)
    shapes = _flat_shapes(func, tapped, state, args, kwargs, like, batch_size(func, "data", batch))
    probes = {n: like.new_zeros(shapes[n]) for n in names}
    out, pull, acts = vjp(lambda pr: tapped(state, pr, *args, **kwargs), probes, has_aux=True)
    if not isinstance(out, Tensor) or out.ndim != 2:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise _refuse(func, "module", "an output [B, C]", f"{got}")
    B, C = out.shape
    eye = torch.eye(C, dtype=out.dtype, device=out.device)[:, None, :].expand(C, B, C)
    cols = vmap(pull)(eye)[0]
    J = {n: cols[n].transpose(0, 1).contiguous() for n in names}
    if out_hessian is not None:
        A = out_hessian(out, target)
    elif target is None:
        A = vmap(hessian(lambda o: loss_fn(o[None])))(out)
    else:
        A = vmap(hessian(lambda o, t: loss_fn(o[None], t[None])))(out, target)
    return _augment(acts, layout), J, A


def _lean(terms):
    """``terms`` with each layer Jacobian that is exactly the identity (the output layer's
    ``d out / d z``) replaced by None: products skip it (exact: ``x * 1 + 0`` is ``x``)."""
    a, J, A = terms
    eye = _eye_like(A)
    return a, {n: None if j.shape == eye.shape and torch.equal(j, eye) else j
               for n, j in J.items()}, A


def _eye_like(A: Tensor) -> Tensor:
    """The ``[B, C, C]`` identity shaped like the output Hessians (an expanded view)."""
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)


def _keep(factors, cache: bool | int) -> list | None:
    """Return the list of ``factors`` under the cache rule, or None to rebuild them per call."""
    if cache is False:
        return None
    kept, size = [], 0
    for item in factors:
        kept.append(item)
        size += sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(item)
                    if t is not None)
        if cache is not True and size > cache:
            return None
    return kept


def _apply(V: Tensor, items, n_total: int | None, layout: dict, names: list) -> Tensor:
    """``(1/n) sum_i J_i^T A_i J_i V`` over the factors ``items`` (``n``: ``n_total``, or the
    examples in ``items``), the layers summed in the order ``names``.  # [k, P] -> [k, P]"""
    bias = {n: layout[n][1] is not None for n in names}
    # Per example, each layer's [d, k] block (units by rows): the products with J and A
    # then have k (tens of rows) as their long side, and the layer GEMMs write/read
    # [B, d k] in one piece; ~10% less CPU than [k, d] blocks at P = 9,610, B = 1,000.
    V = V.contiguous()  # the per-layer views below need row-major rows
    k = V.shape[0]
    blocks = {}  # layer -> V's rows as [d * k, in(+1)], units outer
    for name in names:
        ws, bs, inp = layout[name]
        w = V[:, ws].view(k, -1, inp).transpose(0, 1)
        w = torch.cat([w, V[:, bs].T[:, :, None]], 2) if bias[name] else w.contiguous()
        blocks[name] = w.view(-1, inp + bias[name])
    grads = {name: None for name in names}
    n = 0
    for a, J, A in items:
        B = A.shape[0]
        JU = None  # [B, C, k]
        for name in names:
            U = (a[name] @ blocks[name].T).view(B, -1, k)  # [B, d, k]
            part = U if J[name] is None else J[name] @ U
            JU = part if JU is None else JU.add_(part)
        HJU = A.mT @ JU
        for name in names:
            Z = HJU if J[name] is None else J[name].mT @ HJU  # [B, d, k]
            step = Z.view(B, -1).T @ a[name]
            grads[name] = step if grads[name] is None else grads[name].add_(step)
        n += B
    out = torch.empty_like(V)
    for name in names:
        ws, bs, inp = layout[name]
        g = grads[name].view(-1, k, inp + bias[name])
        out[:, ws].view(k, -1, inp).copy_(g[:, :, :inp].transpose(0, 1))
        if bias[name]:
            out[:, bs].copy_(g[:, :, inp].T)
    return out.div_(n if n_total is None else n_total)


def linear_gnvp(module: nn.Module, loss_fn: Callable, params, data, *,
                chunk_size: int | None = None, batch_rows: int | None = None, tapped=None,
                cache: bool | int = True, out_hessian: Callable | None = None) -> LinOp:
    """Return ``V -> G V``, ``G = (1/N) sum_i J_i^T A_i J_i``, of a Linear-only model.  # [k, P] -> [k, P]

    The operator of :func:`~dattri_fn.operators.curvature.gnvp` with ``forward`` the module and
    ``out_loss`` the ``loss_fn`` of one example (``A_i`` its Hessian w.r.t. the output ``[C]``),
    applied through each layer's inputs and the ``[C, D]`` output Jacobian w.r.t. the layer
    outputs (module docstring), not by a forward and backward pass per row.

    Args:
        module, loss_fn, params, data, chunk_size, batch_rows, tapped: as
            :func:`linear_hessian`; the module's output must be ``[B, C]``.
        cache: ``True``: keep every batch's factors (``N x (C D + C^2 + sum_l in_l)``
            numbers, built here, once); ``False``: rebuild them from ``data`` on every call
            (memory of one batch's factors; on the digits MLP as fast as ``gnvp``, 0.083 against
            0.059 s per 16-row call at 16k examples, and at P = 1M 2.8 against 4.5 s for
            ``gnvp``); an int: a byte budget, keep them if they fit in it, else rebuild.
        out_hessian: optional closed form ``out_hessian(output, target) -> [B, C, C]``, each
            example's Hessian of ``loss_fn`` w.r.t. its output row (e.g. ``diag(p) - p p^T``
            for softmax cross-entropy); it must equal the autodiff one it replaces (~1.4 of
            1.8 ms per 64-row batch of the digits MLP).

    Returns:
        A :class:`~dattri_fn._types.LinOp` in the params' dtype and device.

    Raises:
        TypeError, ValueError: as :func:`linear_hessian`.
        FactoredCurvatureError (a ValueError): a model outside the module docstring's limits,
            found here, at construction, from the first batch.
    """
    func = "linear_gnvp"
    state, tapped, batches, chunk_size, layout, module, params = _setup(
        func, module, loss_fn, params, data, chunk_size, tapped, batch_rows)
    if not isinstance(cache, int):
        raise TypeError(_msg(func, "cache", "a bool or a byte budget (int)",
                             type(cache).__name__))
    if not isinstance(cache, bool) and cache < 0:
        raise ValueError(_msg(func, "cache", "a byte budget >= 0", repr(cache)))
    if out_hessian is not None and not callable(out_hessian):
        raise TypeError(_msg(func, "out_hessian", "None or a callable (output, target) -> "
                             "[B, C, C]", type(out_hessian).__name__))
    names = tapped.layers
    like = state[f"{names[0]}.weight"]
    P = sum(v.numel() for v in params.values())

    def factors():
        for part, _ in _chunks(func, batches, batch_rows, chunk_size):
            yield _lean(_gn_terms(tapped, loss_fn, state, part, like, layout, func, out_hessian))

    first = peek(batches)  # read without losing it, even from data readable only once
    if first is None:
        raise ValueError(_msg(func, "data", "at least one batch", "no batches"))
    first = (first, batch_size(func, "data", first))
    done, sig = _verified(tapped, "gnvp", first[0], loss_fn, out_hessian)
    if sig not in done:
        few = batch_slice(first[0], 0, min(first[1], _CHECK_ROWS))
        terms = _first_pass(func, lambda: _lean(_gn_terms(tapped, loss_fn, state, few, like,
                                                          layout, func, out_hessian)))
        v = _probe_vector(P, like)
        flat0, out_fn, _ = _autodiff(module, loss_fn, state, list(params), few)
        out, pull = vjp(out_fn, flat0)
        Jv = vjp(lambda u: pull(u)[0], torch.zeros_like(out))[1](v)[0]  # reverse mode only
        target = unpack_example(few)[2]
        out_grad = grad(lambda o: per_example_losses(loss_fn, o, target).sum())
        ref = pull(vjp(out_grad, out)[1](Jv)[0])[0]
        _check_close(func, "the Gauss-Newton-vector product (out_hessian included)",
                     _apply(v[None], [terms], 1, layout, names)[0], ref)
        done.add(sig)
    kept = _keep(factors(), cache)
    n_total = None if kept is None else sum(A.shape[0] for _, _, A in kept)

    def matmat(V: Tensor) -> Tensor:
        if kept is None:
            return _apply(V, factors(), n_total, layout, names)
        # Rows in blocks whose [B, k d] intermediates stay near 2**22 numbers: at P = 9,610 and
        # B = 1,000 one 200-row product took 0.38 s, ten 20-row ones 0.26 s (one CPU thread).
        width = max(A.shape[0] for _, _, A in kept) * max(
            (layout[n][0].stop - layout[n][0].start) // layout[n][2] for n in names)
        step = max(1, _ROW_BLOCK // max(1, width))
        if step >= V.shape[0]:
            return _apply(V, kept, n_total, layout, names)
        step = -(-V.shape[0] // -(-V.shape[0] // step))  # equal blocks: 200 rows = 7 x 29, not 6 x 32 + 8
        return torch.cat([_apply(V[r:r + step], kept, n_total, layout, names)
                          for r in range(0, V.shape[0], step)])

    def dense() -> Tensor:
        check_dense_fits(f"{func}.dense", P, like.dtype, like.device)
        H = like.new_zeros(P, P)
        n = 0
        for a, J, A in (factors() if kept is None else kept):
            Jc = torch.cat([_eye_like(A) if J[name] is None else J[name] for name in names],
                           dim=-1)
            _accumulate(H, layout, a, Jc.mT @ A @ Jc)
            n += A.shape[0]
        return H.div_(n if n_total is None else n_total)

    joined: list = []  # the kept factors concatenated over batches, built at the first on_rows

    def rows(idx: Tensor) -> LinOp:
        if not joined:
            def jac(n):  # None only where every batch's Jacobian is the identity
                if all(J[n] is None for _, J, _ in kept):
                    return None
                return torch.cat([_eye_like(A) if J[n] is None else J[n] for _, J, A in kept])

            # one kept batch is used as it is (no second copy of the factors)
            joined.append(kept[0] if len(kept) == 1 else (
                {n: torch.cat([a[n] for a, _, _ in kept]) for n in names},
                {n: jac(n) for n in names}, torch.cat([A for _, _, A in kept])))
        a, J, A = joined[0]
        idx = idx.to(A.device)
        if idx.numel() == A.shape[0] and torch.equal(idx, torch.arange(A.shape[0], device=A.device)):
            part = (a, J, A)  # every row in order (a full-batch draw): no gathered copy
        else:
            part = ({n: a[n][idx] for n in names},
                    {n: None if J[n] is None else J[n][idx] for n in names}, A[idx])
        return LinOp(lambda V: _apply(V, [part], None, layout, names), P, like.dtype,
                     like.device, name=f"{func}.on_rows")

    return FactoredOperator(matmat, dense, P, like.dtype, like.device, name=func, factors=kept,
                            rows=None if kept is None else rows)
