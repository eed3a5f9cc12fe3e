"""A plain softmax cross-entropy MLP's capture plan decided without the autodiff check (issue 14).

:func:`certified_plan` (and its core :func:`_certified`, and :func:`_certified_grads` for the
paths that also want the batch's gradients) moved here from :mod:`layer_grads` (review RA F5:
that module had grown to 545 lines); :mod:`layer_grads` imports and re-exports all three, and
its module Note states the rule. :func:`_mlp_factors` and :func:`_mlp_grads` are the mlp_io
steps the certification shares with a held plan's batches (``layer_grads._plain_mlp``).
Tests that turn the certified path off or count its decisions patch ``_certified`` HERE
(tests/plan_counting.py), since this module's functions call it.
"""

from __future__ import annotations

import torch

from .._checks import _msg, batch_leaves, batch_slice
from .._types import Batch, Params
from . import mlp_io as _mlp_io  # called as _mlp_io.mlp_io: a patched module attribute is seen
from .factored_grads import LayerGrads
from .layer_grads_paths import _assemble, _unpack
from .layer_grads_plan import LayerPlan, PlanDecisions, decided_plan


def certified_plan(plan: LayerPlan, stacked: Params, batch: Batch) -> LayerPlan | None:
    """Return the plan :func:`check_plan` would return for a plain softmax cross-entropy MLP,
    decided WITHOUT the check's autodiff comparison, or None (then run the check).

    Decided (every layer "flat", nothing dense, no loop; :func:`decided_plan`'s plan, so no
    probe shapes) where :func:`~dattri_fn.transforms.mlp_io.mlp_io` certifies the model and
    ``batch`` (an exact ``nn.Linear`` or ``nn.Sequential`` of Linear layers and elementwise
    activations, no hook, each Linear and parameter used once, the summed softmax
    cross-entropy on int64 labels, one dtype, outside torch.func transforms and modes) at every
    one of the ``C`` stacked checkpoints, with every attributed parameter in a captured Linear
    layer. Each such layer runs once on ``[B, in]``, so example ``i``'s weight gradient is
    ``g_i a_i^T`` exactly: the comparison cannot fail (the lead's decision, issue 14;
    tests/test_mlp_io.py and tests/test_certified_plan.py carry the equality). The
    certification is structural (module kinds, loss, dtype), so it holds for any ``C``: the
    check over ``C >= 2`` checkpoints compares checkpoint 0 and maps the others one by one
    through the same plain pass (``layer_grads_paths._by_checkpoint``), deciding the same
    all-flat plan. What the check refuses besides the comparison is left to it: None where
    mlp_io declines or raises on ``batch`` (a float label, a wrong width: the check then raises
    as ever) or where the first 3 examples' gradients ``g_i a_i^T`` may not be finite at some
    checkpoint (the check raises NonFiniteExamples or decides).

    Args:
        plan: an unchecked plan from :func:`layer_plan` (a checked one gives None).
        stacked: the attributed parameters ``{key: [C, ...]}`` at ``C >= 1`` checkpoints.
        batch: an example Batch on the parameters' device, laid out as the model's
            ``unpack`` expects (any size; its first 3 examples are looked at).
    """
    if not isinstance(plan, LayerPlan):
        raise TypeError(_msg("certified_plan", "plan", "a LayerPlan from layer_plan(model)",
                             type(plan).__name__))
    try:  # the batch is not validated here: the check owns its errors (None, then the check)
        head = batch if batch_leaves(batch)[0].shape[0] <= 3 else batch_slice(batch, 0, 3)
    except Exception:  # noqa: BLE001
        return None
    return _certified(plan, stacked, head)[0]


def _certified(plan: LayerPlan, stacked: Params, batch: Batch) -> tuple[LayerPlan | None, dict]:
    """:func:`certified_plan`'s core: ``(decided plan, mlp_io's {layer: (a [C, B, in],
    g [C, B, out])} of the whole batch)``, or ``(None, {})``."""
    if (plan.checked or not plan.layers or plan.rest or plan.norms or plan.ties or plan.bare
            or plan.tie_biases or plan.tie_factors
            or any(plan.tapped.specs[n].kind != "linear" for n in plan.layers)
            or any(v.ndim == 0 for v in stacked.values())
            or len({v.shape[0] for v in stacked.values()}) != 1):
        return None, {}
    peaks: list = []
    try:
        io = _mlp_factors(plan, stacked, batch, peaks)
    except Exception:  # noqa: BLE001 -- the check runs the engine, which owns every error
        return None, {}
    if io is None:
        return None, {}
    # the check's refusal of non-finite rows: the first examples' rows g_i a_i^T (and g_i)
    # are finite where max|g| max|a| over those examples (a Python float product) is finite
    # and below the dtype's max; a NaN or inf in a or g makes it NaN or inf (abs and max
    # propagate both; inf * 0 is NaN), so one tolist() decides for every layer and checkpoint
    # (a bound over the examples together: at worst a finite batch near the max takes the
    # check; over every checkpoint, where the check reads checkpoint 0: it decides the same)
    peaks = torch.stack(peaks).tolist()  # (max|a|, max|g|) per layer, checkpoint by checkpoint
    big = torch.finfo(next(iter(io.values()))[0].dtype).max
    if not all(peaks[i] * peaks[i + 1] < big for i in range(0, len(peaks), 2)):
        return None, {}
    decided = decided_plan(plan, PlanDecisions(tuple(plan.layers), False, False,
                                               tuple((n, "flat") for n in plan.layers)))
    return decided, io


def _certified_grads(plan: LayerPlan, stacked: Params, batch: Batch,
                     losses: list | None) -> tuple[LayerPlan | None, LayerGrads | None]:
    """``(certified plan, batch's gradients)`` of a certified MLP (:func:`certified_plan`), the
    factors from the one mlp_io pass that certified it; ``(None, None)`` otherwise (then the
    check), and where ``losses`` are wanted: the check fills them or not as it always did (its
    one-call path over <= 3 examples does not), and a caller (TRAK's margins) reads the
    difference, so that stream keeps the check (TRAK decides its plan itself: certified_plan)."""
    if losses is not None:
        return None, None
    checked, io = _certified(plan, stacked, batch)
    if checked is None:
        return None, None
    return checked, _mlp_grads(checked, io)


def _mlp_factors(plan: LayerPlan, stacked: Params, batch: Batch,
                 peaks: list | None = None) -> dict | None:
    """mlp_io's ``{layer: (a [C, B, in], g [C, B, out])}`` of ``batch`` at each of ``stacked``'s
    ``C`` checkpoints for the plan's layers (one mlp_io pass per checkpoint, as the engine's
    ``_by_checkpoint`` runs one plain pass per checkpoint: the same operands, so the same bits),
    or None where mlp_io declines at any checkpoint or ``stacked``'s keys are not the
    attributed parameters (review RA F3: an extra key would override a fixed weight; the
    check, or the engine, names it). ``peaks``: receives, per checkpoint and layer, the 0-d
    ``max |a|`` and ``max |g|`` over the first 3 examples (None, and nothing appended, for an
    empty or zero-width pass: review RA F2). Errors of ``batch`` propagate (mlp_io's, torch's
    kernels'). Shared by the certification (:func:`_certified`) and a held plan's batches
    (``layer_grads._plain_mlp``)."""
    if stacked.keys() != plan.model.params.keys():
        return None
    args, kwargs, target = _unpack(plan.model)(batch)
    C = next(iter(stacked.values())).shape[0]
    raw = None
    for c in range(C):
        io = _mlp_io.mlp_io(plan.model.module, plan.model.loss_fn,
                            {**plan.model.fixed, **{k: v[c] for k, v in stacked.items()}},
                            args, kwargs, target, tuple(plan.layers))
        if io is None:
            return None
        if peaks is not None:
            if not all(a.ndim == 2 and g.ndim == 2 and a.shape[0] and a.shape[1] and g.shape[1]
                       for a, g in io.values()):
                return None
            peaks.extend(t[:3].abs().max() for pair in io.values() for t in pair)
        if C == 1:  # views, no copy
            return {n: (a[None], g[None]) for n, (a, g) in io.items()}
        if raw is None:  # written as each checkpoint comes (peak: the stack and one pass)
            raw = {n: tuple(t.new_empty((C, *t.shape)) for t in pair) for n, pair in io.items()}
        for n, pair in io.items():
            for dst, t in zip(raw[n], pair, strict=True):
                dst[c] = t
        del io
    return raw


def _mlp_grads(plan: LayerPlan, io: dict) -> LayerGrads:
    """The :class:`LayerGrads` (every layer flat) of :func:`_mlp_factors`' ``io``."""
    return _assemble(plan, io, {}, lead=2)[0]
