"""Per-example gradients with ``nn.Linear`` layers kept in factored form (hook-free).

For a Linear layer ``z = W a + b`` applied at positions ``t`` (one position for a plain
``[B, in]`` input), example ``i``'s gradient is ``dW_i = sum_t g_it a_it^T``, ``db_i = sum_t
g_it``, with ``a`` the layer input and ``g = dloss_i / dz``. With ``ã = [a, 1]`` (bias
appended) two examples' gradients meet without ever forming ``dW``:

    <grad_i, grad_j>_layer = sum_{t,s} (ã_it . ã_js) (g_it . g_js)

which costs ``in + out`` per pair instead of ``in * out`` (no ``[B, P]`` matrix, no
``[B, P] x [P, n]`` product). ``a`` and ``g`` come from ONE batched forward and backward with
zero "probes" added to the layer outputs (see :mod:`dattri_fn.layers`); parameters outside the
tapped Linear layers (convolutions, embeddings, norms) keep dense per-example gradients.

Assumption of the batched path: the module treats the examples of a batch independently
(``module(X)[i] == module(X[i:i+1])[0]``), as every model in eval mode does. Sequence layers
whose factored product would cost more than the dense one (``T^2 (in + out) >= in * out``)
are materialised per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ._checks import batch_size, batch_to
from ._types import Batch, Params
from .layers import _LeafTracer, _tap, batched_io, output_shapes, tree_unsqueeze
from .model import FunctionalModel, default_unpack


class LayerGrads(NamedTuple):
    """Per-example gradients of ``C`` checkpoints: Linear layers factored, the rest dense.

    Attributes:
        factors: ``{layer: (a, g)}`` with ``a`` ``[C, B, in']`` and ``g`` ``[C, B, out]``, or
            ``[C, B, T, in']`` / ``[C, B, T, out]`` for sequence layers; ``in' = in + 1`` when
            the bias is attributed (a column of ones), ``1`` for a bias alone.
        dense: ``[C, B, P_dense]``: every other attributed parameter, plus the materialised
            sequence layers (``P_dense`` may be 0).
        layout: ``(key, source)`` per attributed parameter, in params order, for
            :meth:`to_dense`: source ``("w", layer, has_bias)``, ``("b", layer)`` or
            ``("d", start, stop)``.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    dense: Tensor
    layout: tuple

    @property
    def num_rows(self) -> int:
        return self.dense.shape[1]

    def scores(self, other: LayerGrads) -> Tensor:
        """Return ``sum_c <grad_ci, other_cj>`` for every pair of rows.  # -> [B, n]"""
        out = 0
        if self.dense.shape[-1]:
            out = torch.bmm(self.dense, other.dense.transpose(1, 2)).sum(0)
        for name, (a, g) in self.factors.items():
            a2, g2 = other.factors[name]
            if a.ndim == 3:
                out = out + (torch.bmm(a, a2.transpose(1, 2)) * torch.bmm(g, g2.transpose(1, 2))).sum(0)
            else:
                aa = torch.einsum("cbti,cnsi->cbnts", a, a2)
                out = out + (aa * torch.einsum("cbto,cnso->cbnts", g, g2)).sum((0, 3, 4))
        if isinstance(out, int):
            return self.dense.new_zeros(self.num_rows, other.num_rows)
        return out

    def row_dots(self, other: LayerGrads) -> Tensor:
        """Return ``sum_c <grad_ci, other_ci>`` row by row (same examples).  # -> [B]"""
        out = (self.dense * other.dense).sum((0, 2))
        for name, (a, g) in self.factors.items():
            a2, g2 = other.factors[name]
            if a.ndim == 3:
                out = out + ((a * a2).sum(-1) * (g * g2).sum(-1)).sum(0)
            else:
                aa = torch.einsum("cbti,cbsi->cbts", a, a2)
                out = out + (aa * torch.einsum("cbto,cbso->cbts", g, g2)).sum((0, 2, 3))
        return out

    def sq_norms(self) -> Tensor:
        """Return ``|grad_ci|^2`` per checkpoint and example.  # -> [C, B]"""
        out = (self.dense * self.dense).sum(-1)
        for a, g in self.factors.values():
            if a.ndim == 3:
                out = out + (a * a).sum(-1) * (g * g).sum(-1)
            else:
                out = out + (torch.einsum("cbti,cbsi->cbts", a, a)
                             * torch.einsum("cbto,cbso->cbts", g, g)).sum((2, 3))
        return out

    def scale(self, w: Tensor) -> LayerGrads:
        """Return the gradients times ``w`` (``[C, B]`` or ``[C, 1]``), i.e. ``w_ci grad_ci``."""
        factors = {n: (a, g * (w[..., None] if g.ndim == 3 else w[..., None, None]))
                   for n, (a, g) in self.factors.items()}
        return LayerGrads(factors, self.dense * w[..., None], self.layout)

    def to_dense(self) -> Tensor:
        """Return the raveled gradients in params order.  # -> [C, B, P]"""
        parts = []
        for _, source in self.layout:
            if source[0] == "d":
                parts.append(self.dense[..., source[1]:source[2]])
                continue
            a, g = self.factors[source[1]]
            if a.ndim == 3:
                a, g = a[:, :, None], g[:, :, None]
            if source[0] == "b":
                parts.append(g.sum(2))
            else:
                w = torch.einsum("cbto,cbti->cboi", g, a[..., : _weight_cols(a, source)])
                parts.append(w.flatten(2))
        return torch.cat(parts, dim=-1)

    @staticmethod
    def cat(blocks: Sequence[LayerGrads]) -> LayerGrads:
        """Concatenate blocks of rows (examples).  # -> [C, sum B, ...]"""
        first = blocks[0]
        factors = {n: (torch.cat([b.factors[n][0] for b in blocks], 1),
                       torch.cat([b.factors[n][1] for b in blocks], 1)) for n in first.factors}
        return LayerGrads(factors, torch.cat([b.dense for b in blocks], 1), first.layout)


def _weight_cols(a: Tensor, source) -> int:
    return a.shape[-1] - source[2]


class LayerPlan(NamedTuple):
    """What :func:`layer_plan` decided for a model: which Linear layers are factored."""

    model: FunctionalModel
    tapped: Any
    layers: dict[str, tuple[str | None, str | None]]  # layer -> (weight key, bias key)
    rest: tuple[str, ...]
    out_features: dict[str, int]
    shapes: dict  # input signature -> layer output shapes: a cache, filled on first use


def layer_plan(model: FunctionalModel) -> LayerPlan | None:
    """Return the factored plan of ``model``'s attributed Linear layers, or None if there is none.

    A Linear layer is factored when one of its parameters is attributed, its ``forward`` is
    ``nn.Linear.forward`` and ``torch.fx`` sees it called exactly once; every other attributed
    parameter stays dense. None when the module cannot be traced or no layer qualifies.
    """
    if not isinstance(model, FunctionalModel):
        raise TypeError(f"layer_plan(model=...): expected a FunctionalModel from "
                        f"functional_model(...), got {type(model).__name__}.")
    if model.loss_fn is None:
        raise ValueError("layer_plan(model=...): expected a FunctionalModel built with a "
                         "loss_fn, got loss_fn=None.")
    # A bare Linear is traced inside a one-layer Sequential (fx cannot keep the root as a leaf).
    prefix = "0." if isinstance(model.module, nn.Linear) else ""
    module = nn.Sequential(model.module) if prefix else model.module
    keys = {prefix + k for k in model.params}
    candidates = [n for n, m in module.named_modules()
                  if n and isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
                  and (f"{n}.weight" in keys or f"{n}.bias" in keys)]
    if not candidates:
        return None
    try:
        graph = _LeafTracer(set(candidates)).trace(module)
    except Exception:  # fx raises TraceError, TypeError, NotImplementedError...
        return None
    calls = {n: 0 for n in candidates}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in calls:
            calls[node.target] += 1
    names = [n for n in candidates if calls[n] == 1]
    if not names:
        return None
    tapped = _tap("layer_plan", module, names)
    if prefix:
        inner = tapped

        def tapped(state, probes, *a, **kw):
            return inner({prefix + k: v for k, v in state.items()}, probes, *a, **kw)

        tapped.layers = inner.layers
    layers = {n: (f"{n}.weight"[len(prefix):] if f"{n}.weight" in keys else None,
                  f"{n}.bias"[len(prefix):] if f"{n}.bias" in keys else None) for n in names}
    owned = {k for pair in layers.values() for k in pair if k is not None}
    rest = tuple(k for k in model.params if k not in owned)
    modules = dict(module.named_modules())
    return LayerPlan(model, tapped, layers, rest, {n: modules[n].out_features for n in names}, {})


def _unpack(model: FunctionalModel):
    return model.unpack or default_unpack


def _probe_shapes(plan: LayerPlan, params: Params, args, kwargs) -> dict[str, tuple]:
    """Layer output shapes ``[B, ..., out]``, cached per input signature (saves a forward)."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    key = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t)
                for t in leaves)
    if key not in plan.shapes:
        state = {**plan.model.fixed, **params}
        plan.shapes[key] = output_shapes(plan.tapped, state, plan.out_features, args, kwargs,
                                         next(iter(params.values())))
    return plan.shapes[key]


def _raw_batched(plan: LayerPlan, params: Params, args, kwargs, target, shapes):
    """``({layer: (a, g)}, {})`` from one batched forward/backward (no dense parameters)."""
    state = {**plan.model.fixed, **params}
    io = batched_io(plan.tapped, plan.model.loss_fn, state, args, kwargs, target, shapes,
                    next(iter(params.values())))
    return io, {}


def _raw_per_example(plan: LayerPlan, params: Params, batch, shapes):
    """``({layer: (a, g)}, {rest key: grad})`` by ``vmap`` over examples (dense parameters)."""
    unpack = _unpack(plan.model)
    fixed = {**plan.model.fixed, **{k: v for k, v in params.items() if k not in plan.rest}}
    rest = {k: params[k] for k in plan.rest}
    w = next(iter(params.values()))

    def one(example):
        args, kwargs, target = unpack(example)
        args, kwargs = tree_unsqueeze(args), tree_unsqueeze(kwargs)
        probes = {n: w.new_zeros((1, *shapes[n][1:])) for n in plan.layers}

        def f(r, pr):
            out, acts = plan.tapped({**fixed, **r}, pr, *args, **kwargs)
            loss = plan.model.loss_fn(out) if target is None else plan.model.loss_fn(
                out, tree_unsqueeze(target))
            return loss, acts

        (g_rest, g), acts = grad(f, argnums=(0, 1), has_aux=True)(rest, probes)
        return {n: (acts[n][0], g[n][0]) for n in plan.layers}, g_rest

    return vmap(one)(batch)


def _assemble(plan: LayerPlan, raw: dict, rest_grads: Params | None, lead: int) -> LayerGrads:
    """Append bias columns, fold extra dims into T, materialise costly sequence layers."""
    factors, dense, layout_of = {}, [], {}
    offset = 0
    if rest_grads:
        for k in plan.rest:
            v = rest_grads[k].flatten(lead)
            layout_of[k] = ("d", offset, offset + v.shape[-1])
            dense.append(v)
            offset += v.shape[-1]
    for n, (wk, bk) in plan.layers.items():
        a, g = raw[n]
        shape = a.shape[:lead]
        a = a.reshape(*shape, -1, a.shape[-1])
        g = g.reshape(*shape, -1, g.shape[-1])
        cols = [a] if wk is not None else []
        if bk is not None:
            cols.append(a.new_ones((*a.shape[:-1], 1)))
        a = torch.cat(cols, -1) if len(cols) > 1 else cols[0]
        T, i, o = a.shape[-2], a.shape[-1], g.shape[-1]
        if T == 1:
            factors[n] = (a[..., 0, :], g[..., 0, :])
        elif T * T * (i + o) < i * o:
            factors[n] = (a, g)
        else:
            if wk is not None:
                v = torch.einsum("...to,...ti->...oi", g, a[..., : a.shape[-1] - (bk is not None)])
                v = v.flatten(lead)
                layout_of[wk] = ("d", offset, offset + v.shape[-1])
                dense.append(v)
                offset += v.shape[-1]
            if bk is not None:
                layout_of[bk] = ("d", offset, offset + o)
                dense.append(g.sum(-2))
                offset += o
            continue
        if wk is not None:
            layout_of[wk] = ("w", n, int(bk is not None))
        if bk is not None:
            layout_of[bk] = ("b", n)
    some = next(iter(raw.values()))[1]
    dense_t = torch.cat(dense, -1) if dense else some.new_zeros((*some.shape[:lead], 0))
    layout = tuple((k, layout_of[k]) for k in plan.model.params)
    return LayerGrads(factors, dense_t, layout)


def layer_grads_stacked(plan: LayerPlan, stacked: Params, batch: Batch) -> LayerGrads:
    """Return per-example gradients at ``C`` stacked checkpoints ``{key: [C, ...]}``, unchecked."""
    unpack = _unpack(plan.model)
    C = next(iter(stacked.values())).shape[0]
    first = {k: v[0] for k, v in stacked.items()}
    args, kwargs, target = unpack(batch)
    shapes = _probe_shapes(plan, first, args, kwargs)
    if plan.rest:
        fn = lambda p: _raw_per_example(plan, p, batch, shapes)
    else:
        fn = lambda p: _raw_batched(plan, p, args, kwargs, target, shapes)
    if C == 1:
        raw, rest = fn(first)
        raw = {n: (a[None], g[None]) for n, (a, g) in raw.items()}
        rest = {k: v[None] for k, v in rest.items()}
    else:
        raw, rest = vmap(fn, out_dims=0)(stacked)
    return _assemble(plan, raw, rest, lead=2)


def per_sample_layer_grads(model: FunctionalModel, params: Params, batch: Batch) -> LayerGrads:
    """Return every example's gradient with Linear layers factored.  # -> LayerGrads, C = 1

    ``per_sample_layer_grads(fm, p, batch).to_dense()[0]`` equals
    ``per_sample_grad(fm.loss, p, batch)``; ``.scores(other)`` gives the Grad-Dot matrix
    without forming either ``[B, P]`` matrix.

    Args:
        model: a :class:`~dattri_fn.model.FunctionalModel` with a ``loss_fn``.
        params: the attributed parameters (the keys of ``model.params``).
        batch: a Batch laid out as the model's ``unpack`` expects.

    Raises:
        TypeError, ValueError: a bad model, params or batch; a model without a Linear layer
            that can be factored (use :func:`~dattri_fn.grad.per_sample_grad`).
    """
    from ._checks import check_params

    func = "per_sample_layer_grads"
    plan = layer_plan(model)
    if plan is None:
        raise ValueError(f"{func}(model=...): expected a model with an attributed nn.Linear "
                         f"layer called once in a torch.fx-traceable forward, got none. "
                         f"Use per_sample_grad for this model.")
    params = check_params(func, "params", params)
    if list(params) != list(model.params):
        raise ValueError(f"{func}(params=...): expected the keys {list(model.params)}, got "
                         f"{list(params)}.")
    batch_size(func, "batch", batch)
    device = next(iter(params.values())).device
    stacked = {k: v.detach()[None] for k, v in params.items()}
    return layer_grads_stacked(plan, stacked, batch_to(batch, device))


__all__ = ["LayerGrads", "LayerPlan", "layer_plan", "per_sample_layer_grads"]
