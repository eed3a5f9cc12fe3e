"""FactGraSS's flat path: a plan whose layers are all flat Linear/Conv1D factor pairs is checked
and sketched from one capture pass (:func:`~dattri_fn.attribute.factgrass.factgrass` uses it).

The plan check of :func:`~dattri_fn.transforms.layer_grads.check_plan` compares the first rows'
per-example gradients against autodiff on each example alone; here they come from the same
capture pass that gives the batch's factors, so checking costs no extra forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import batch_leaves, batch_slice
from ..model import default_unpack
from ..transforms.layer_grads import LayerPlan, PlanDecisions, decided_plan
from ..transforms.layer_grads_paths import _autodiff_rows, _row_losses, _rows_of
from ..transforms.layers import _edges, batched_io, per_example_losses
from ..transforms.mlp_io import mlp_io
from ..tree import ravel_batched


def _flat_factored(plan: LayerPlan) -> bool:
    """A checked plan whose every gradient is a captured flat Linear/Conv1D factor pair (no
    dense block, one checkpoint path): its batches need no :class:`LayerGrads` assembly."""
    kinds = dict(plan.layout)
    return (plan.checked and not plan.dense and not plan.loop and not plan.rest
            and set(kinds) == set(plan.layers) and all(k == "flat" for k in kinds.values())
            and all(plan.tapped.specs[n].kind in ("linear", "conv1d") for n in plan.layers)
            and torch._C._functorch.maybe_current_level() is None)


def _flat_capturable(plan: LayerPlan) -> bool:
    """What :func:`_flat_factored` asks of a plan before any data: no dense parameters,
    Linear/Conv1D layers only, outside torch.func transforms."""
    return (not plan.rest and all(plan.tapped.specs[n].kind in ("linear", "conv1d")
                                  for n in plan.layers)
            and torch._C._functorch.maybe_current_level() is None)


def _flat_io(plan: LayerPlan, params: dict, batch) -> dict:
    """``{layer: (a, g)}`` of ``batch`` from one capture pass, as the plan's path takes it."""
    model = plan.model
    args, kwargs, target = (model.unpack or default_unpack)(batch)
    return batched_io(plan.tapped, model.loss_fn, {**model.fixed, **params}, args, kwargs, target,
                      None, next(iter(params.values())))


def _plain_io(plan: LayerPlan, params: dict, batch) -> dict | None:
    """``_flat_io(plan, params, batch)`` of a plain softmax cross-entropy MLP by
    :func:`~dattri_fn.transforms.mlp_io.mlp_io` (bit for bit the capture engine's ``(a, g)``,
    without its ``functional_call``, probes and autograd graph); None for any other model or
    batch (nothing has run: the caller takes the engine)."""
    model = plan.model
    args, kwargs, target = (model.unpack or default_unpack)(batch)
    return mlp_io(model.module, model.loss_fn, {**model.fixed, **params}, args, kwargs, target,
                  tuple(plan.layers))


def _all_flat(plan: LayerPlan) -> LayerPlan:
    """The plan :func:`_flat_checked` returns where it passes: every layer flat.

    Taken without the check's autodiff rows where :func:`_plain_io` gave the factors: ``mlp_io``
    takes only an ``nn.Sequential`` of ``nn.Linear`` and elementwise activations (exact types,
    no hooks, each Linear and parameter used once) under a per-example softmax cross-entropy,
    and :func:`_flat_capturable` only plans without parameters outside the Linear layers. Each
    layer of such a model runs once on ``[B, in]``, so example ``i``'s gradient of its weight
    is ``g_i a_i^T`` exactly (its bias's ``g_i``): the comparison with autodiff on each example
    alone cannot fail, and cost more than the pass itself (digits-lr: 1.2 of 4.3 ms).
    """
    return decided_plan(plan, PlanDecisions(tuple(plan.layers), False, False,
                                            tuple((n, "flat") for n in plan.layers)))


def _flat_checked(plan: LayerPlan, params: dict, batch, io: dict,
                  ref: Tensor | None = None) -> LayerPlan | None:
    """The check of :func:`~dattri_fn.transforms.layer_grads.check_plan` from a capture pass
    that every layer took flat (``a [b, in]``): the first ``min(b, 3)`` examples' gradients
    ``g a^T`` (``a g^T`` for a Conv1D) and ``g`` against autodiff on each example alone, at
    the check's tolerance. Returns the plan it would return (every layer flat), or None where
    the full check must decide (a layer with positions, gradients that differ). ``ref``: those
    examples' autodiff rows where the caller has them (:func:`_flat_io_checked`).  # [k, P]"""
    if not all(a.ndim == 2 for a, _ in io.values()):
        return None
    k = min(batch_leaves(batch)[0].shape[0], 3)
    if ref is None:
        ref = ravel_batched(_autodiff_rows(plan.model.loss, params, batch_slice(batch, 0, k)))
    grads = {}
    for n, (wk, bk) in plan.layers.items():
        a, g = io[n][0][:k], io[n][1][:k]
        if wk is not None:
            conv1d = plan.tapped.specs[n].kind == "conv1d"  # stored [in, out]
            grads[wk] = a[:, :, None] * g[:, None, :] if conv1d else g[:, :, None] * a[:, None, :]
        if bk is not None:
            grads[bk] = g
    got = torch.cat([grads[key].reshape(k, -1) for key in params], 1)
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    if not err <= 10 * torch.finfo(ref.dtype).eps ** 0.5 * max(scale, 1e-30):
        return None
    return decided_plan(plan, PlanDecisions(tuple(plan.layers), False, False,
                                            tuple((n, "flat") for n in plan.layers)))


def _flat_io_checked(plan: LayerPlan, params: dict, batch) -> tuple[dict, LayerPlan | None]:
    """``(_flat_io(plan, params, batch), _flat_checked(plan, params, batch, io))`` with ONE
    autograd engine call for the pass and the check's reference rows.

    The batched loss and the first examples' own losses share no leaf (probes on one side,
    per-example parameter copies on the other), so one backward gives each exactly its own
    gradients: the same values as the two calls (one engine call and its set-up saved).
    """
    model, tapped = plan.model, plan.tapped
    k = min(batch_leaves(batch)[0].shape[0], 3)
    args, kwargs, target = (model.unpack or default_unpack)(batch)
    with torch.enable_grad():
        run = tapped.probed({**model.fixed, **params}, *args, **kwargs)
        # gradients at the probes' autograd edges: the probes (the layer outputs) are dropped
        # before the loss and the backward, as in batched_io
        edges, zeros, calls = _edges(tapped, run.probes)
        out, acts, fold = run.output, run.acts, run.fold
        del run
        value = per_example_losses(model.loss_fn, out, target).sum()
        del out
        lives, losses = _row_losses(model, params, batch, tapped.ties_any, k)
        leaves = [t for live in lives for t in live.values()]
        flat = torch.autograd.grad([value, *losses], edges + leaves, allow_unused=True)
    grads = iter([z() if g is None else g for g, z in zip(flat[:len(edges)], zeros, strict=True)])
    g = fold({n: [next(grads) for _ in range(calls[n])] for n in tapped.layers})
    io = {n: (acts[n].detach(), g[n]) for n in tapped.layers}
    rows = [torch.zeros_like(t) if r is None else r
            for r, t in zip(flat[len(edges):], leaves, strict=True)]
    return io, _flat_checked(plan, params, batch, io, ravel_batched(_rows_of(params, rows)))


def _flat_sketch(plan: LayerPlan, stage1, params: dict, batch) -> Tensor:
    """Stage 1 from one capture pass, as ``stage1.layer_grads`` of the plan's gradients: the
    same factors (``[a, 1]``, ``g``; the first position of a flat layer), the same products.  # [b, w]
    """
    model = plan.model
    args, kwargs, target = (model.unpack or default_unpack)(batch)
    io = batched_io(plan.tapped, model.loss_fn, {**model.fixed, **params}, args, kwargs, target,
                    None, next(iter(params.values())))
    out = []
    for n in stage1.layers:
        wk, bk = plan.layers[n]
        a, g = io[n]
        a = a.reshape(a.shape[0], -1, a.shape[-1])[:, 0]
        g = g.reshape(g.shape[0], -1, g.shape[-1])[:, 0]
        cols = ([a] if wk is not None else []) + ([a.new_ones((*a.shape[:-1], 1))]
                                                  if bk is not None else [])
        a = torch.cat(cols, -1) if len(cols) > 1 else cols[0]
        out.append(stage1.project_factors(n, a, g))
    return torch.cat(out, -1) if len(out) > 1 else out[0]
