"""The computation paths of :mod:`dattri_fn.transforms.layer_grads`: how a plan's gradients are formed.

Captured layers come from one batched forward and backward (:func:`batched_io`); dense
parameters next to them by ``vmap(grad)`` over examples, or a loop of one backward pass per
example where vmap cannot run the model; several checkpoints one by one through the plain
batched pass (by ``vmap`` over them next to dense parameters or inside a transform, or a loop).
:func:`_assemble` lays the raw ``(a, g)`` out as a :class:`LayerGrads`. Every function here
reads its plan and never writes to it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from .._checks import batch_size
from .._types import Batch, Params
from ..model import FunctionalModel, default_unpack, target_dtype_error
from ..tree import ravel_batched
from .factored_grads import LayerGrads, _concat, _embedding_rows, _Lazy
from .grad import per_sample_grad_unchecked
from .layer_grads_ckpts import _by_checkpoint, _by_checkpoint_ok  # noqa: F401  (as before)
from .layer_grads_ties import dense_rows, tie_factors
from .layers import batched_io, input_signature, output_shapes
from .layers_losses import tree_unsqueeze

if TYPE_CHECKING:
    from .layer_grads import LayerPlan


def _unpack(model: FunctionalModel):
    return model.unpack or default_unpack


def _raw_batched(plan: LayerPlan, params: Params, args, kwargs, target, shapes,
                 losses: list | None = None):
    """``({layer: (a, g)}, {})`` from one batched forward/backward (no dense parameters);
    ``shapes=None`` outside transforms: probes shaped per call, no extra forward. ``losses``:
    receives the pass's per-example losses ``[B]`` (outside transforms, :func:`batched_io`)."""
    state = {**plan.model.fixed, **params}
    io = batched_io(plan.tapped, plan.model.loss_fn, state, args, kwargs, target, shapes,
                    next(iter(params.values())), losses=losses)
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


def _autodiff_rows(loss, params: Params, batch: Batch) -> Params:
    """``{key: [B, ...]}`` per-example gradients by autodiff on each example alone.

    Each example's loss at its own copy of ``params``, then ONE backward pass over the B losses:
    a copy's gradient comes from its own example only, so the values are :func:`_loop_grads`'s
    (torch.equal), from one autograd engine call instead of B (the check's reference rows).
    """
    if torch._C._functorch.maybe_current_level() is not None:
        return _loop_grads(loss, params, batch)
    n = batch_size("layer_grads", "batch", batch)
    example = lambda i: tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, batch)
    with torch.enable_grad():
        lives = [{k: v.detach().requires_grad_(True) for k, v in params.items()}
                 for _ in range(n)]
        losses = [loss(live, example(i)) for i, live in enumerate(lives)]
        flat = torch.autograd.grad(losses, [t for live in lives for t in live.values()],
                                   allow_unused=True, materialize_grads=True)
    P = len(params)
    return {k: torch.stack(flat[j::P]) for j, k in enumerate(params)}


def _example_rows(model: FunctionalModel, params: Params, batch: Batch, ties: bool) -> Params:
    """:func:`_autodiff_rows` of ``model.loss`` (torch.equal), each example a batch of one sent
    straight to ``functional_call``: ``params``' keys are the model's (the caller checked them),
    so ``model.loss``'s per-call key and shape checks, its strict key walk and, without tied
    tensors (``ties``, decided once), its untying walk are skipped (~30% of these rows' time on
    the digits tasks)."""
    if torch._C._functorch.maybe_current_level() is not None:
        return _loop_grads(model.loss, params, batch)
    with torch.enable_grad():
        lives, losses = _row_losses(model, params, batch, ties)
        flat = torch.autograd.grad(losses, [t for live in lives for t in live.values()],
                                   allow_unused=True, materialize_grads=True)
    return _rows_of(params, flat)


def _row_losses(model: FunctionalModel, params: Params, batch: Batch, ties: bool,
                n: int | None = None, *, at: tuple[int, ...] | None = None,
                ) -> tuple[list[Params], list[Tensor]]:
    """Each example's own leaf copy of ``params`` and its loss as a batch of one (grad mode on).
    ``n``: the batch's size where the caller validated it (no second finiteness scan); ``at``:
    those examples of ``batch`` only, in that order (sliced straight from it)."""
    from .._checks import batch_slice
    from ..module_call import call_module

    unpack = _unpack(model)
    if at is None:
        at = range(batch_size("layer_grads", "batch", batch) if n is None else n)
    lives = [{k: v.detach().requires_grad_(True) for k, v in params.items()} for _ in at]
    losses = []
    for i, live in zip(at, lives, strict=True):
        args, kwargs, target = unpack(batch_slice(batch, i, i + 1))
        out = call_module(model.module, {**model.fixed, **live}, args, kwargs,
                          tie_weights=ties)
        if target is None:
            losses.append(model.loss_fn(out))
            continue
        try:  # free unless it raises: the first call on a method's data (the plan check)
            losses.append(model.loss_fn(out, target))
        except RuntimeError as err:
            clear = target_dtype_error(model.loss_fn, out, target, err)
            if clear is None:
                raise
            raise clear from err
    return lives, losses


def _rows_of(params: Params, flat) -> Params:
    """``{key: [B, ...]}`` from the copies' gradients, copy by copy in params order."""
    P = len(params)
    return {k: torch.stack(flat[j::P]) for j, k in enumerate(params)}


def _one_call_ok(plan: LayerPlan, stacked: Params) -> bool:
    """Whether :func:`_factored_and_rows` applies: one checkpoint, no dense parameters, outside
    torch.func (then :func:`_factored` is one plain :func:`batched_io` pass, no probe shapes)."""
    return (not plan.autodiff and next(iter(stacked.values())).shape[0] == 1
            and torch._C._functorch.maybe_current_level() is None)


def _factored_and_rows(plan: LayerPlan, stacked: Params, batch: Batch, ties: bool,
                       n: int | None = None, *, ref_at: tuple[int, ...] | None = None):
    """``(_factored(plan, stacked, batch), _example_rows(plan.model, params, batch, ties))``
    with ONE autograd engine call for both (where :func:`_one_call_ok`; ``n``: the batch's
    size where the caller validated it).

    The batched pass's loss and the examples' own losses share no leaf (probes on one side,
    per-example parameter copies on the other), so one backward over all of them gives each
    side exactly its own gradients, torch.equal to the two separate calls; the check's second
    engine call is saved (~0.1 ms of its ~1.3 ms on the digits tasks).

    ``ref_at=(i, j, ...)``: reference rows for those examples only, and the parameters of the
    batched pass are leaves too: returns ``(passed, ref {key: [r, ...]}, sums)`` with ``sums =
    {key: d(sum_i l_i)/d param}`` of the batched pass's per-example losses ``l`` (the plan
    check's sum identity, :func:`~dattri_fn.transforms.layer_grads._gap_sums`). The probe
    gradients, and so the factors, are torch.equal to those without it: parameter leaves add
    branches to the backward graph, not terms to the probes' gradients.
    """
    from .layers_losses import summed_losses

    tapped, model = plan.tapped, plan.model
    first = {k: v[0] for k, v in stacked.items()}
    args, kwargs, target = _unpack(model)(batch)
    with torch.enable_grad():
        live = ({} if ref_at is None else
                {k: v.detach().requires_grad_(True) for k, v in first.items()})
        run = tapped.probed({**model.fixed, **first, **live}, *args, **kwargs)
        # the gradient of sum_i l_i, bit for bit (one op for softmax cross-entropy rows)
        value = summed_losses(model.loss_fn, run.output, target)
        probes = [p for n in tapped.layers for p in run.probes[n]]
        lives, losses = _row_losses(model, first, batch, ties, n, at=ref_at)
        flat = torch.autograd.grad([value, *losses],
                                   probes + list(live.values())
                                   + [t for live_i in lives for t in live_i.values()],
                                   allow_unused=True, materialize_grads=True)
    grads = iter(flat[:len(probes)])
    g = run.fold({n: [next(grads) for _ in run.probes[n]] for n in tapped.layers})
    raw = {n: (run.acts[n].detach()[None], g[n][None]) for n in tapped.layers}
    lg, layout = _assemble(plan, raw, {}, lead=2)
    rows = _rows_of(first, flat[len(probes) + len(live):])
    if ref_at is None:
        return (lg, False, layout, None), rows
    sums = dict(zip(live, flat[len(probes):len(probes) + len(live)], strict=True))
    return (lg, False, layout, None), rows, sums


def _vmap_failed(err: Exception) -> bool:
    """True for vmap's refusal of data-dependent control flow (``.item()``, ``if tensor``)."""
    return isinstance(err, RuntimeError) and "vmap" in str(err)


def _raw_split(plan: LayerPlan, params: Params, batch, args, kwargs, target, shapes,
               losses: list | None = None):
    """``({layer: (a, g)}, {rest key: grad})``: captured layers from one batched pass, the
    dense parameters by a loop over examples (for models vmap cannot run)."""
    io, _ = _raw_batched(plan, params, args, kwargs, target, shapes, losses)
    rest = _loop_grads(lambda r, ex: plan.model.loss({**params, **r}, ex),
                       {k: params[k] for k in plan.autodiff}, batch)
    return io, rest


def _raw_per_example(plan: LayerPlan, params: Params, batch, shapes):
    """``({layer: (a, g)}, {rest key: grad})`` by ``vmap`` over examples (dense parameters)."""
    unpack = _unpack(plan.model)
    keys = plan.autodiff
    fixed = {**plan.model.fixed, **{k: v for k, v in params.items() if k not in keys}}
    rest = {k: params[k] for k in keys}
    w = next(iter(params.values()))
    names = plan.captured

    def one(example):
        args, kwargs, target = unpack(example)
        args, kwargs = tree_unsqueeze(args), tree_unsqueeze(kwargs)
        probes = {n: w.new_zeros((1, *shapes[n][1:])) for n in names}

        def f(r, pr):
            out, acts = plan.tapped({**fixed, **r}, pr, *args, **kwargs)
            loss = plan.model.loss_fn(out) if target is None else plan.model.loss_fn(
                out, tree_unsqueeze(target))
            return loss, acts

        (g_rest, g), acts = grad(f, argnums=(0, 1), has_aux=True)(rest, probes)
        return {n: (acts[n][0], g[n][0]) for n in names}, g_rest

    return vmap(one)(batch)


def _assemble(plan: LayerPlan, raw: dict, rest_grads: Params | None,
              lead: int) -> tuple[LayerGrads, tuple[tuple[str, str], ...]]:
    """Append bias columns, fold extra dims into T, materialise costly sequence layers; return
    the gradients and the per-layer layout used (``plan.layout``'s, or decided here)."""
    factors, dense, layout_of = {}, [], {}
    offset = 0
    # the rest in params order, norm and tied keys included: the dense block's layout is the
    # one vmap(grad) gave them before they were captured
    ties = tie_factors(plan, raw, lead) if plan.tie_factors else {}
    rows = ({} if not (plan.norms or plan.ties or plan.bare) else dense_rows(plan, raw, lead, skip=ties)
            if ties else dense_rows(plan, raw, lead))
    for k in plan.rest:
        if k in ties:  # kept as its members' factors: no [C, B, V D] rows
            layout_of[k] = ("t", k, ties[k])
            continue
        v = (rows[k] if k in rows else None if not rest_grads  # a 0-d param's rows are [C, B]
             else rest_grads[k].reshape(*rest_grads[k].shape[:lead], -1))
        if v is None:
            continue
        layout_of[k] = ("d", offset, offset + v.shape[-1])
        dense.append(v)
        offset += v.shape[-1]
    kinds, used = dict(plan.layout), []
    for n, (wk, bk) in plan.layers.items():
        a, g = raw[n]
        spec = plan.tapped.specs[n]
        if spec.kind == "embedding":  # indices: dense rows (factored products: not yet)
            if wk is not None:
                v = _embedding_rows(spec, a, g, lead, plan.model.params[wk].shape)
                layout_of[wk] = ("d", offset, offset + v.shape[-1])
                dense.append(v)
                offset += v.shape[-1]
            used.append((n, "dense"))
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
        # Decided on the example batch and kept, so blocks of any sequence length line up.
        kind = kinds.get(n) or ("flat" if not seq else "seq" if T * T * (i + o) < i * o
                                else "dense")
        used.append((n, kind))
        w_src = "wt" if spec.kind == "conv1d" else "w"
        if kind == "flat":
            if T != 1:  # one position kept per example: the others would be dropped silently
                raise ValueError(
                    f"per-layer gradients(batch=...): expected the layout checked on the example batch "
                    f"(layer {n!r} at one position per example), got a batch with {T} positions at that "
                    f"layer; use batches of one shape, or check the plan on a batch with positions.")
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
    return LayerGrads(factors, dense_t, layout), tuple(used)


def _warn_loop(plan: LayerPlan, err: Exception, keys: list) -> None:
    """One warning naming the ``keys`` whose rows now come from the per-example loop (RU2 L2:
    the EK-FAC version names them; the user sees which of their parameters are slow)."""
    what = (f"its parameters outside the captured layers, {keys}, get per-example gradients "
            "from a loop of one backward pass per example (the captured layers keep one "
            "batched pass)" if keys else "the checkpoints are taken one by one (every "
            "attributed parameter is in a captured layer: no per-example loop)")
    warnings.warn(f"layer_grads: vmap cannot run {type(plan.model.module).__name__} ({err}"[:300]
                  + f"...); {what}.", RuntimeWarning, stacklevel=5)


def _dense(plan: LayerPlan, stacked: Params, batch: Batch) -> tuple[LayerGrads, bool]:
    """The fallback: ``vmap(grad)`` gradients, all in the dense block (and whether vmap
    failed: a loop of autograd passes then).  # [C, B, P]"""
    C = next(iter(stacked.values())).shape[0]
    per = lambda p: per_sample_grad_unchecked(plan.model.loss, p, batch)
    G, loop = None, plan.loop
    if not loop:
        try:
            if C == 1:
                G = ravel_batched(per({k: v[0] for k, v in stacked.items()}))[None]
            else:
                G = ravel_batched(vmap(per)(stacked), batch_dims=2)
        except RuntimeError as err:
            if not _vmap_failed(err):
                raise
            _warn_loop(plan, err, list(stacked))
            loop = True
    if G is None:
        G = torch.stack([ravel_batched(_loop_grads(plan.model.loss, {k: v[c] for k, v in
                                                                     stacked.items()}, batch))
                         for c in range(C)])
    layout, start = [], 0
    for k, v in stacked.items():
        size = v[0].numel()
        layout.append((k, ("d", start, start + size)))
        start += size
    return LayerGrads({}, G, tuple(layout)), loop


def _shapes(plan: LayerPlan, state, args, kwargs, like: Tensor) -> dict[str, tuple]:
    """The probe shapes of these inputs: the plan's, or one no-grad forward."""
    key = input_signature(args, kwargs)
    for sig, shapes in plan.shapes:
        if sig == key:
            return shapes
    return output_shapes(plan.tapped, state, args, kwargs, like)


def _factored(plan: LayerPlan, stacked: Params, batch: Batch, *, losses: list | None = None,
              ) -> tuple[LayerGrads, bool, tuple, dict | None]:
    """The captured path: ``(gradients, whether vmap failed, per-layer layout used, the probe
    shapes used or None)``.

    ``losses``: a list whose contents are replaced, on success, by the batched passes'
    per-example losses ``l_c`` ``[B]``, checkpoint by checkpoint, where every checkpoint had
    its own plain batched pass (one checkpoint, or several one by one); left as it was where
    the passes ran under ``vmap`` (over checkpoints, or inside a transform) or per example,
    and on any error. The gradients are the same bit for bit with or without it.
    """
    got = [] if losses is not None else None
    out = _factored_core(plan, stacked, batch, got)
    C = next(iter(stacked.values())).shape[0]
    if got is not None and len(got) == C:
        losses[:] = got
    return out


def _factored_core(plan: LayerPlan, stacked: Params, batch: Batch, losses: list | None,
                   ) -> tuple[LayerGrads, bool, tuple, dict | None]:
    """:func:`_factored`, appending to ``losses`` (None: not recorded) as its passes run."""
    unpack = _unpack(plan.model)
    C = next(iter(stacked.values())).shape[0]
    first = {k: v[0] for k, v in stacked.items()}
    args, kwargs, target = unpack(batch)
    plain = torch._C._functorch.maybe_current_level() is None
    by_ckpt = C > 1 and _by_checkpoint_ok(plan, plain)
    shapes = None  # probes shaped per call: plain autograd needs no shapes
    if plan.autodiff or not plain or (C > 1 and not plan.loop and not by_ckpt):
        shapes = _shapes(plan, {**plan.model.fixed, **first}, args, kwargs,
                         next(iter(first.values())))
    if plan.autodiff:
        fn = lambda p: _raw_per_example(plan, p, batch, shapes)
    else:
        fn = lambda p: _raw_batched(plan, p, args, kwargs, target, shapes, losses)
    loop = plan.loop
    if not loop and not by_ckpt:
        try:
            if C == 1:
                raw, rest = fn(first)
                raw = {n: (a[None], g[None]) for n, (a, g) in raw.items()}
                rest = {k: v[None] for k, v in rest.items()}
            else:
                raw, rest = vmap(fn, out_dims=0)(stacked)
            lg, layout = _assemble(plan, raw, rest, lead=2)
            return lg, False, layout, shapes
        except RuntimeError as err:
            if not _vmap_failed(err):
                raise
            # ``losses`` is not cleared (review R4 F4): C > 1 failed under vmap, where
            # batched_io records nothing; a plain C = 1 pass runs no vmap, and a row it had
            # recorded would leave C + 1 rows, which _factored does not hand back
            _warn_loop(plan, err, list(plan.autodiff))
            loop = True
    if plan.autodiff:
        fn = lambda p: _raw_split(plan, p, batch, args, kwargs, target, shapes, losses)
    raw, rest = _by_checkpoint(fn, stacked, C)
    lg, layout = _assemble(plan, raw, rest, lead=2)
    return lg, loop, layout, shapes
