"""Per-example gradients with Linear-like layers kept in factored form (hook-free).

For a layer ``z = W a + b`` applied at positions ``t`` (one position for a plain ``[B, in]``
input), example ``i``'s gradient is ``dW_i = sum_t g_it a_it^T``, ``db_i = sum_t g_it``, with
``a`` the layer input and ``g = dloss_i / dz``. With ``ã = [a, 1]`` (bias appended) two
examples' gradients meet without ever forming ``dW``:

    <grad_i, grad_j>_layer = sum_{t,s} (ã_it . ã_js) (g_it . g_js)

which costs ``in + out`` per pair instead of ``in * out`` (no ``[B, P]`` matrix, no
``[B, P] x [P, n]`` product). ``a`` and ``g`` come from ONE batched forward and backward through
the capture engine (:mod:`dattri_fn.transforms.capture`: zero probes on the layer outputs, no
trace, no hooks), for ``nn.Linear``, HF ``Conv1D`` (transposed weight), ``nn.Conv2d``
(unfolded patches) and ``nn.Embedding`` (whose rows are materialised per example from the
same pass); every other attributed parameter keeps dense ``vmap(grad)`` gradients (a loop of
one backward pass per example where vmap cannot run the model).

Assumption of the batched path: the module treats the examples of a batch independently
(``module(X)[i] == module(X[i:i+1])[0]``), as every model in eval mode does. Layers with
several positions whose factored product would cost more than the dense one
(``T^2 (in + out) >= in * out``, T of the first batch) are materialised per example.

Safety: a layer whose tensors the first batch shows used in a way the engine cannot factor (a
tied weight read by another op, a non-batch-first input, a grouped convolution...) is computed
densely after one warning naming it. A plan then compares a few examples' gradients with
per-example autodiff; if they differ (a layer applied to a ``[T, B, d]`` tensor with ``T = B``,
examples mixed inside the batch, ...) it warns and computes every later gradient densely.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from .._checks import batch_size, batch_slice, batch_to
from .._types import Batch, Params
from ..model import FunctionalModel, default_unpack
from ..tree import ravel_batched
from . import capture
from .grad import per_sample_grad_unchecked
from .layers import batched_io, output_shapes, tree_unsqueeze


class LayerGrads(NamedTuple):
    """Per-example gradients of ``C`` checkpoints: Linear layers factored, the rest dense.

    Attributes:
        factors: ``{layer: (a, g)}`` with ``a`` ``[C, B, in']`` and ``g`` ``[C, B, out]``, or
            ``[C, B, T, in']`` / ``[C, B, T, out]`` for sequence layers; ``in' = in + 1`` when
            the bias is attributed (a column of ones), ``1`` for a bias alone.
        dense: ``[C, B, P_dense]``: every other attributed parameter, plus the materialised
            sequence layers (``P_dense`` may be 0).
        layout: ``(key, source)`` per attributed parameter, in params order, for
            :meth:`to_dense`: source ``("w", layer, has_bias)`` (``"wt"``: a transposed
            ``[in, out]`` weight, HF Conv1D), ``("b", layer)`` or
            ``("d", start, stop)``.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    dense: Tensor
    layout: tuple

    @property
    def num_rows(self) -> int:
        return self.dense.shape[1]

    def _same_layout(self, other: LayerGrads) -> bool:
        return self.layout == other.layout and self.factors.keys() == other.factors.keys() and all(
            self.factors[n][0].ndim == other.factors[n][0].ndim for n in self.factors)

    def scores(self, other: LayerGrads) -> Tensor:
        """Return ``sum_c <grad_ci, other_cj>`` for every pair of rows.  # -> [B, n]"""
        if not self._same_layout(other):  # e.g. a dense batch of one against factored blocks
            return torch.bmm(self.to_dense(), other.to_dense().transpose(1, 2)).sum(0)
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
        if not self._same_layout(other):
            return (self.to_dense() * other.to_dense()).sum((0, 2))
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

    def to_dense(self, dtype: torch.dtype | None = None, *, out: Tensor | None = None) -> Tensor:
        """Return the raveled gradients in params order, in ``dtype`` (default: theirs).  # -> [C, B, P]

        When every parameter already sits in the dense block (in params order) and no other
        dtype or ``out`` is asked for, that block itself is returned (no copy).
        A narrower ``dtype`` (e.g. bfloat16) receives each product rounded once, as written:
        no full-precision ``[C, B, P]`` copy is made. ``out``: a ``[C, B, P]`` tensor to write
        into (its dtype wins), e.g. one buffer reused over the batches of a stream.
        """
        sizes = [self._size(src) for _, src in self.layout]
        C, B = self.dense.shape[:2]
        if out is None and (dtype is None or dtype == self.dense.dtype) and self._is_dense():
            return self.dense  # every parameter already sits in the dense block, in order
        if out is not None:
            want = (C, B, sum(sizes))
            if not isinstance(out, Tensor) or tuple(out.shape) != want:
                got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"LayerGrads.to_dense(out=...): expected a Tensor of shape "
                                 f"{list(want)}, got {got}.")
            dtype = out.dtype
        if not self._plain():  # autograd or a torch.func transform: no out= writes
            dense = self.columns(0, sum(sizes)).to(dtype or self.dense.dtype)
            return dense if out is None else out.copy_(dense)
        if out is None:
            out = self.dense.new_empty((C, B, sum(sizes)), dtype=dtype)
        off = 0
        for (_, source), size in zip(self.layout, sizes, strict=True):
            view = out[..., off:off + size]
            a, g = self.factors[source[1]] if source[0] != "d" else (None, None)
            if source[0] in ("w", "wt") and a.ndim == 3 and a.shape[:2] == g.shape[:2] == (C, B):
                # The outer product written in place: no per-layer block, no concatenation. Into
                # another dtype torch forms each product in a temporary of the factors' dtype
                # first, so that goes by blocks of rows of about 2**18 products (at least one).
                n_in = _weight_cols(a, source)
                step = B if view.dtype == g.dtype else max(1, _NARROW_ENTRIES // max(1, C * size))
                if source[0] == "w":
                    dst = view.unflatten(-1, (g.shape[-1], n_in))
                    for r in range(0, B, step):
                        torch.mul(g[:, r:r + step, :, None], a[:, r:r + step, None, :n_in],
                                  out=dst[:, r:r + step])
                else:  # a transposed weight [in, out] (Conv1D)
                    dst = view.unflatten(-1, (n_in, g.shape[-1]))
                    for r in range(0, B, step):
                        torch.mul(a[:, r:r + step, :n_in, None], g[:, r:r + step, None, :],
                                  out=dst[:, r:r + step])
            else:
                view.copy_(self._block(source, 0, size))
            off += size
        return out

    def _is_dense(self) -> bool:
        """True when the dense block holds every parameter, in params order, and nothing else."""
        off = 0
        for _, src in self.layout:
            if src[0] != "d" or src[1] != off:
                return False
            off = src[2]
        return off == self.dense.shape[-1]

    def _plain(self) -> bool:
        """True outside autograd, forward AD and torch.func: plain, grad-free tensors only."""
        if torch._C._functorch.maybe_current_level() is not None:
            return False
        tensors = [self.dense, *(t for pair in self.factors.values() for t in pair)]
        return not any(t.requires_grad or forward_ad.unpack_dual(t).tangent is not None
                       for t in tensors)

    def columns(self, start: int, stop: int) -> Tensor:
        """Return columns ``[start, stop)`` of :meth:`to_dense`, forming only those.  # [C, B, n]

        A projector that streams ``R`` row block by row block meets the matching gradient
        columns here, so the ``[C, B, P]`` matrix never exists at once.

        Raises:
            ValueError: unless ``0 <= start < stop <= P``.
        """
        P = sum(self._size(src) for _, src in self.layout)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= P):
            raise ValueError(f"LayerGrads.columns(start=..., stop=...): expected ints with "
                             f"0 <= start < stop <= P = {P}, got start={start!r}, stop={stop!r}.")
        parts, off = [], 0
        for _, source in self.layout:
            size = self._size(source)
            lo, hi = max(start, off), min(stop, off + size)
            if lo < hi:
                parts.append(self._block(source, lo - off, hi - off))
            off += size
            if off >= stop:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def rows(self, start: int, stop: int) -> LayerGrads:
        """Return examples ``[start, stop)`` (views).  # B = stop - start"""
        factors = {n: (a[:, start:stop], g[:, start:stop]) for n, (a, g) in self.factors.items()}
        return LayerGrads(factors, self.dense[:, start:stop], self.layout)

    def select(self, c: int) -> LayerGrads:
        """Return checkpoint ``c`` alone (views, leading dim kept).  # C = 1"""
        C = self.dense.shape[0]
        if not (isinstance(c, int) and 0 <= c < C):
            raise ValueError(f"LayerGrads.select(c=...): expected an int in [0, {C}), "
                             f"got {c!r}.")
        factors = {n: (a[c:c + 1], g[c:c + 1]) for n, (a, g) in self.factors.items()}
        return LayerGrads(factors, self.dense[c:c + 1], self.layout)

    def _size(self, source) -> int:
        if source[0] == "d":
            return source[2] - source[1]
        a, g = self.factors[source[1]]
        return g.shape[-1] if source[0] == "b" else g.shape[-1] * _weight_cols(a, source)

    def _block(self, source, lo: int, hi: int) -> Tensor:
        """Columns ``[lo, hi)`` of one parameter's raveled gradient.  # -> [C, B, hi - lo]"""
        if source[0] == "d":
            return self.dense[..., source[1] + lo:source[1] + hi]
        a, g = self.factors[source[1]]
        if a.ndim == 3:
            a, g = a[:, :, None], g[:, :, None]
        if source[0] == "b":
            return g.sum(2)[..., lo:hi]
        n_in = _weight_cols(a, source)
        if source[0] == "wt":  # [in, out]: rows of dW are inputs
            n_out = g.shape[-1]
            r0, r1 = lo // n_out, -(-hi // n_out)
            w = torch.einsum("cbti,cbto->cbio", a[..., r0:min(r1, n_in)], g).flatten(2)
            return w[..., lo - r0 * n_out:hi - r0 * n_out]
        r0, r1 = lo // n_in, -(-hi // n_in)  # output rows of dW that the range touches
        w = torch.einsum("cbto,cbti->cboi", g[..., r0:r1], a[..., :n_in]).flatten(2)
        return w[..., lo - r0 * n_in:hi - r0 * n_in]

    @staticmethod
    def cat(blocks: Sequence[LayerGrads]) -> LayerGrads:
        """Concatenate blocks of rows (examples).  # -> [C, sum B, ...]"""
        first = blocks[0]
        factors = {n: (_cat_padded([b.factors[n][0] for b in blocks]),
                       _cat_padded([b.factors[n][1] for b in blocks])) for n in first.factors}
        return LayerGrads(factors, torch.cat([b.dense for b in blocks], 1), first.layout)


def _cat_padded(parts: list[Tensor]) -> Tensor:
    """Concatenate along examples; sequence factors of different T are zero-padded (zero rows
    of ``a`` and ``g`` add nothing to ``sum_t g_t a_t^T``)."""
    if parts[0].ndim == 4:
        T = max(p.shape[2] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0, 0, T - p.shape[2])) for p in parts]
    return torch.cat(parts, 1)


_NARROW_ENTRIES = 2**18  # products per block when to_dense writes another dtype


def _weight_cols(a: Tensor, source) -> int:
    return a.shape[-1] - source[2]


class LayerPlan(NamedTuple):
    """What :func:`layer_plan` decided for a model: which layers are captured (factored)."""

    model: FunctionalModel
    tapped: Any
    layers: dict[str, tuple[str | None, str | None]]  # layer -> (weight key, bias key)
    rest: tuple[str, ...]
    status: dict  # "checked"/"dense" flags, per-layer layouts and the narrowed "plan"


def layer_plan(model: FunctionalModel) -> LayerPlan | None:
    """Return the capture plan of ``model``'s attributed layers, or None if there is none.

    Every ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Conv2d`` and ``nn.Embedding`` with an
    attributed parameter is captured by :mod:`dattri_fn.transforms.capture` (no trace: any
    forward works); every other attributed parameter stays dense. A layer the first batch shows
    cannot be captured (a tied weight read by another op, a grouped convolution, ...) is computed
    densely from then on, after one warning naming it and why.
    """
    if not isinstance(model, FunctionalModel):
        raise TypeError(f"layer_plan(model=...): expected a FunctionalModel from "
                        f"functional_model(...), got {type(model).__name__}.")
    if model.loss_fn is None:
        raise ValueError("layer_plan(model=...): expected a FunctionalModel built with a "
                         "loss_fn, got loss_fn=None.")
    return _plan_of(model, [n for n, s in capture.layer_specs(model.module).items()
                            if s.weight in model.params or s.bias in model.params])


def _plan_of(model: FunctionalModel, names: list[str]) -> LayerPlan | None:
    if not names:
        return None
    tapped = capture.tap(model.module, names)
    keys = set(model.params)
    layers = {n: (s.weight if s.weight in keys else None, s.bias if s.bias in keys else None)
              for n, s in tapped.specs.items()}
    owned = {k for pair in layers.values() for k in pair if k is not None}
    rest = tuple(k for k in model.params if k not in owned)
    return LayerPlan(model, tapped, layers, rest, {"checked": False, "dense": False, "layout": {}})


def _narrowed(plan: LayerPlan, batch: Batch, stacked: Params) -> LayerPlan | None:
    """Return ``plan`` without the layers one forward on ``batch`` shows cannot be captured
    (one warning names them), or None when no layer is left."""
    args, kwargs, _ = _unpack(plan.model)(batch)
    state = {**plan.model.fixed, **{k: v[0] for k, v in stacked.items()}}
    problems = plan.tapped.check(state, *args, **kwargs)
    if not problems:
        return plan
    why = "; ".join(f"{n or '<root>'}: {w}" for n, w in problems.items())
    warnings.warn(f"layer_grads: computing these layers of {type(plan.model.module).__name__} "
                  f"densely (vmap(grad)) instead of from captured factors: {why}.",
                  RuntimeWarning, stacklevel=4)
    return _plan_of(plan.model, [n for n in plan.layers if n not in problems])


def _unpack(model: FunctionalModel):
    return model.unpack or default_unpack


def _raw_batched(plan: LayerPlan, params: Params, args, kwargs, target, shapes):
    """``({layer: (a, g)}, {})`` from one batched forward/backward (no dense parameters)."""
    state = {**plan.model.fixed, **params}
    io = batched_io(plan.tapped, plan.model.loss_fn, state, args, kwargs, target, shapes,
                    next(iter(params.values())))
    return io, {}


def _loop_grads(loss, params: Params, batch: Batch) -> Params:
    """``{key: [B, ...]}`` per-example gradients by one backward pass per example.

    Plain ``torch.autograd.grad`` outside torch.func transforms: ``torch.func.grad``'s first
    call imports torch._dynamo and sympy (~1 s), which the factored path otherwise never needs.
    """
    n = batch_size("layer_grads", "batch", batch)
    example = lambda i: tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, batch)
    if torch._C._functorch.maybe_current_level() is None:
        rows = []
        with torch.enable_grad():
            for i in range(n):
                live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                rows.append(dict(zip(live, torch.autograd.grad(
                    loss(live, example(i)), list(live.values()), allow_unused=True,
                    materialize_grads=True), strict=True)))
    else:
        rows = [grad(loss)(params, example(i)) for i in range(n)]
    return {k: torch.stack([r[k] for r in rows]) for k in params}


def _vmap_failed(err: Exception) -> bool:
    """True for vmap's refusal of data-dependent control flow (``.item()``, ``if tensor``)."""
    return isinstance(err, RuntimeError) and "vmap" in str(err)


def _looping(plan: LayerPlan, err: Exception) -> None:
    """Switch ``plan`` to per-example loops for its dense parameters, with one warning."""
    plan.status["loop"] = True
    warnings.warn(f"layer_grads: vmap cannot run {type(plan.model.module).__name__} ({err}"[:300]
                  + "...); its parameters outside the captured layers get per-example gradients "
                  "from a loop of one backward pass per example (the captured layers keep one "
                  "batched pass).", RuntimeWarning, stacklevel=4)


def _raw_split(plan: LayerPlan, params: Params, batch, args, kwargs, target, shapes):
    """``({layer: (a, g)}, {rest key: grad})``: captured layers from one batched pass, the
    dense parameters by a loop over examples (for models vmap cannot run)."""
    io, _ = _raw_batched(plan, params, args, kwargs, target, shapes)
    rest = _loop_grads(lambda r, ex: plan.model.loss({**params, **r}, ex),
                       {k: params[k] for k in plan.rest}, batch)
    return io, rest


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
    kinds = plan.status["layout"]
    for n, (wk, bk) in plan.layers.items():
        a, g = raw[n]
        spec = plan.tapped.specs[n]
        if spec.kind == "embedding":  # indices: dense rows (factored products: not yet)
            if wk is not None:
                v = _embedding_rows(spec, a, g, lead, plan.model.params[wk].shape)
                layout_of[wk] = ("d", offset, offset + v.shape[-1])
                dense.append(v)
                offset += v.shape[-1]
            continue
        seq = a.ndim > lead + 1
        shape = a.shape[:lead]
        a = a.reshape(*shape, -1, a.shape[-1])
        g = g.reshape(*shape, -1, g.shape[-1])
        cols = [a] if wk is not None else []
        if bk is not None:
            cols.append(a.new_ones((*a.shape[:-1], 1)))
        a = torch.cat(cols, -1) if len(cols) > 1 else cols[0]
        T, i, o = a.shape[-2], a.shape[-1], g.shape[-1]
        # Decided on the first batch and kept, so blocks of any sequence length line up.
        kind = kinds.setdefault(n, "flat" if not seq else
                                "seq" if T * T * (i + o) < i * o else "dense")
        w_src = "wt" if spec.kind == "conv1d" else "w"
        if kind == "flat":
            factors[n] = (a[..., 0, :], g[..., 0, :])
        elif kind == "seq":
            factors[n] = (a, g)
        else:
            if wk is not None:
                a_w = a[..., : a.shape[-1] - (bk is not None)]
                eq = "...ti,...to->...io" if w_src == "wt" else "...to,...ti->...oi"
                ops = (a_w, g) if w_src == "wt" else (g, a_w)
                width = a_w.shape[-1] * o
                # formed when written into the block: one layer's [C, B, out * in] at a time
                v = _Lazy(lambda eq=eq, ops=ops: torch.einsum(eq, *ops).flatten(lead), width, ops)
                layout_of[wk] = ("d", offset, offset + width)
                dense.append(v)
                offset += width
            if bk is not None:
                layout_of[bk] = ("d", offset, offset + o)
                dense.append(g.sum(-2))
                offset += o
            continue
        if wk is not None:
            layout_of[wk] = (w_src, n, int(bk is not None))
        if bk is not None:
            layout_of[bk] = ("b", n)
    some = next(iter(raw.values()))[1]
    dense_t = _concat(dense, some, lead)
    layout = tuple((k, layout_of[k]) for k in plan.model.params)
    return LayerGrads(factors, dense_t, layout)


class _Lazy(NamedTuple):
    """A dense block formed only when :func:`_concat` writes it (``make() -> [C, B, width]``)."""

    make: Any
    width: int
    inputs: tuple


def _concat(parts: list, like: Tensor, lead: int) -> Tensor:
    """Return the parts side by side, written into ONE buffer: peak ``[C, B, P_dense]`` plus
    the widest part, not the parts and their concatenation together.  # -> [C, B, P_dense]"""
    if not parts:
        return like.new_zeros((*like.shape[:lead], 0))
    tensors = [t for p in parts for t in (p.inputs if isinstance(p, _Lazy) else (p,))]
    plain = (torch._C._functorch.maybe_current_level() is None
             and not any(t.requires_grad for t in tensors))
    if not plain:  # autograd or a transform: cat keeps the graph / batching intact
        return torch.cat([p.make() if isinstance(p, _Lazy) else p for p in parts], -1)
    widths = [p.width if isinstance(p, _Lazy) else p.shape[-1] for p in parts]
    out = like.new_empty((*like.shape[:lead], sum(widths)))
    off = 0
    for p, w in zip(parts, widths, strict=True):
        out[..., off:off + w] = p.make() if isinstance(p, _Lazy) else p
        off += w
    return out


def _embedding_rows(spec, idx: Tensor, g: Tensor, lead: int, shape) -> Tensor:
    """Per-example embedding gradients, raveled.  # idx [C, B, (T)], g [C, B, (T), D] -> [C, B, V D]"""
    C, B = idx.shape[:2]
    flat = capture.weight_grad(spec, idx.reshape(C * B, *idx.shape[2:]),
                               g.reshape(C * B, *g.shape[2:]), shape)
    return flat.reshape(C, B, -1)


def _dense(plan: LayerPlan, stacked: Params, batch: Batch) -> LayerGrads:
    """The fallback: ``vmap(grad)`` gradients, all in the dense block.  # [C, B, P]"""
    C = next(iter(stacked.values())).shape[0]
    per = lambda p: per_sample_grad_unchecked(plan.model.loss, p, batch)
    try:
        if plan.status.get("loop"):
            raise RuntimeError("vmap: known to fail for this model")
        if C == 1:
            G = ravel_batched(per({k: v[0] for k, v in stacked.items()}))[None]
        else:
            G = ravel_batched(vmap(per)(stacked), batch_dims=2)
    except RuntimeError as err:
        if not _vmap_failed(err):
            raise
        if not plan.status.get("loop"):
            _looping(plan, err)
        G = torch.stack([ravel_batched(_loop_grads(plan.model.loss, {k: v[c] for k, v in
                                                                     stacked.items()}, batch))
                         for c in range(C)])
    layout, start = [], 0
    for k, v in stacked.items():
        size = v[0].numel()
        layout.append((k, ("d", start, start + size)))
        start += size
    return LayerGrads({}, G, tuple(layout))


def _verify(plan: LayerPlan, stacked: Params, batch: Batch) -> None:
    """Drop the layers the first batch shows cannot be captured, then compare a few examples'
    factored gradients with per-example autodiff; on a mismatch or an error, warn and switch
    the plan to dense gradients for good. The plan used from then on is
    ``plan.status["plan"]``."""
    first = {k: v[:1] for k, v in stacked.items()}
    n = batch_size("layer_grads", "batch", batch)
    head = batch_slice(batch, 0, min(n, 3))
    why, active = None, None
    # A loop of torch.func.grad, not vmap: vmap's nll_loss batching rule imports sympy (~0.9 s
    # on a first call) and some models (transformers' SDPA) refuse vmap. Examples that plain
    # autodiff rejects too (a wrong dtype or width) raise here and leave the plan unchecked:
    # a bad batch must not switch a good model to dense gradients for good.
    ref = ravel_batched(_loop_grads(plan.model.loss, {k: v[0] for k, v in first.items()}, head))
    try:
        active = _narrowed(plan, head, first)
        if active is not None:
            got = _factored(active, first, head).to_dense()[0]
            err = float((got - ref).abs().max())
            scale = float(ref.abs().max())
            if not err <= 10 * torch.finfo(ref.dtype).eps ** 0.5 * max(scale, 1e-30):
                why = f"max difference {err:.3g} (gradient scale {scale:.3g})"
    except Exception as e:  # whatever the model's forward raises with probes
        why = f"{type(e).__name__}: {e}"
    plan.status["checked"] = True
    plan.status["plan"] = active
    if active is not None:
        active.status["layout"].clear()
    if active is None or why is not None:
        plan.status["dense"] = True
    if why is not None:
        _warn_dense(plan, f"they do not match vmap(grad) on its first examples ({why})")


def _warn_dense(plan: LayerPlan, why: str) -> None:
    warnings.warn(f"layer_grads: computing the per-example gradients of "
                  f"{type(plan.model.module).__name__} densely from now on: {why}. Layers "
                  f"applied to non-batch-first tensors or examples mixed in a batch cause this.",
                  RuntimeWarning, stacklevel=4)


def layer_grads_stacked(plan: LayerPlan, stacked: Params, batch: Batch) -> LayerGrads:
    """Return per-example gradients at ``C`` stacked checkpoints ``{key: [C, ...]}``, unchecked.

    The plan's first call with two or more examples verifies the factored path on a few of them
    (see the module Note); a batch of one before it is computed densely. Blocks of different
    layouts still meet in :meth:`LayerGrads.scores` and :meth:`LayerGrads.row_dots`.
    """
    status = plan.status
    if not status["checked"]:
        if batch_size("layer_grads", "batch", batch) < 2:
            # One example cannot reveal examples mixed within a batch: exact path, check later.
            return _dense(plan, stacked, batch)
        _verify(plan, stacked, batch)
    if status["dense"]:
        return _dense(plan, stacked, batch)
    try:
        return _factored(status["plan"], stacked, batch)
    except capture.CaptureError as err:  # a later batch takes a path the first did not
        status["dense"] = True
        _warn_dense(plan, str(err))
        return _dense(plan, stacked, batch)


def _factored(plan: LayerPlan, stacked: Params, batch: Batch) -> LayerGrads:
    unpack = _unpack(plan.model)
    C = next(iter(stacked.values())).shape[0]
    first = {k: v[0] for k, v in stacked.items()}
    args, kwargs, target = unpack(batch)
    shapes = output_shapes(plan.tapped, {**plan.model.fixed, **first}, args, kwargs,
                           next(iter(first.values())))
    if plan.rest:
        fn = lambda p: _raw_per_example(plan, p, batch, shapes)
    else:
        fn = lambda p: _raw_batched(plan, p, args, kwargs, target, shapes)
    if not plan.status.get("loop"):
        try:
            if C == 1:
                raw, rest = fn(first)
                raw = {n: (a[None], g[None]) for n, (a, g) in raw.items()}
                rest = {k: v[None] for k, v in rest.items()}
            else:
                raw, rest = vmap(fn, out_dims=0)(stacked)
            return _assemble(plan, raw, rest, lead=2)
        except RuntimeError as err:
            if not _vmap_failed(err):
                raise
            _looping(plan, err)
    if plan.rest:
        fn = lambda p: _raw_split(plan, p, batch, args, kwargs, target, shapes)
    parts = [fn({k: v[c] for k, v in stacked.items()}) for c in range(C)]
    raw = {n: (torch.stack([p[0][n][0] for p in parts]), torch.stack([p[0][n][1] for p in parts]))
           for n in plan.layers}
    rest = {k: torch.stack([p[1][k] for p in parts]) for k in plan.rest}
    return _assemble(plan, raw, rest, lead=2)


def per_sample_layer_grads(model: FunctionalModel, params: Params, batch: Batch) -> LayerGrads:
    """Return every example's gradient with Linear layers factored.  # -> LayerGrads, C = 1

    ``per_sample_layer_grads(fm, p, batch).to_dense()[0]`` equals
    ``per_sample_grad(fm.loss, p, batch)``; ``.scores(other)`` gives the Grad-Dot matrix
    without forming either ``[B, P]`` matrix. The batch is checked against ``vmap(grad)`` on
    its first examples (see the module docstring); a batch of one example is returned dense.

    Args:
        model: a :class:`~dattri_fn.model.FunctionalModel` with a ``loss_fn``.
        params: the attributed parameters (the keys of ``model.params``).
        batch: a Batch laid out as the model's ``unpack`` expects.

    Raises:
        TypeError, ValueError: a bad model, params or batch; a model without a Linear layer
            that can be factored (use :func:`~dattri_fn.transforms.grad.per_sample_grad`).
    """
    from .._checks import check_params

    func = "per_sample_layer_grads"
    plan = layer_plan(model)
    if plan is None:
        raise ValueError(f"{func}(model=...): expected a model with an attributed nn.Linear, "
                         f"Conv1D, Conv2d or Embedding layer, got none. Use per_sample_grad "
                         f"for this model.")
    params = check_params(func, "params", params)
    if list(params) != list(model.params):
        raise ValueError(f"{func}(params=...): expected the keys {list(model.params)}, got "
                         f"{list(params)}.")
    batch_size(func, "batch", batch)
    device = next(iter(params.values())).device
    stacked = {k: v.detach()[None] for k, v in params.items()}
    return layer_grads_stacked(plan, stacked, batch_to(batch, device))


__all__ = ["LayerGrads", "LayerPlan", "layer_plan", "per_sample_layer_grads"]
