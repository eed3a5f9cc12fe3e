"""The plan check's narrowing and warnings (:func:`~dattri_fn.transforms.layer_grads.check_plan`):
the layers a forward shows cannot be captured are dropped after one warning (:func:`_narrowed`),
a dense fallback is announced (:func:`_warn_dense`). Moved out of
:mod:`~dattri_fn.transforms.layer_grads` (which imports all three names) to keep that module
within the house size; the warnings point at the user's own call (review RU5 M4: ``sys:1``)."""

from __future__ import annotations

import warnings

from .._checks import all_finite
from .._types import Batch, Params
from . import capture
from .capture_mode import OneTensor
from .layer_grads_paths import _unpack
from .layer_grads_plan import LayerPlan, _plan_of, user_stacklevel


def _all_finite(grads: Params) -> bool:
    """Whether every tensor of ``grads`` (autodiff's reference rows, or the pass's summed
    parameter gradients) is finite."""
    return all(all_finite(v) for v in grads.values())


def _narrowed(plan: LayerPlan, batch: Batch, stacked: Params, *,
              drop: dict[str, str] | None = None) -> LayerPlan | None:
    """Return ``plan`` without the layers a forward on ``batch`` shows cannot be captured (one
    warning names them), or None when no layer is left; after a drop a plan with tie groups is
    checked again (one more forward), since a tie that lost a member is a problem of its own.
    ``drop``: ``{layer: why}`` known refused already (a :class:`CaptureError`'s problems)."""
    args, kwargs, _ = _unpack(plan.model)(batch)
    state = {**plan.model.fixed, **{k: v[0] for k, v in stacked.items()}}
    problems = dict(drop) if drop else plan.tapped.check(state, *args, **kwargs)
    narrowed = plan if not problems else _plan_of(
        plan.model, [n for n in plan.captured if n not in problems])
    # A tie group left with one member after a drop is a problem of its own: check again.
    # Without tie groups one forward's problems are every refused layer's (a layer's problems
    # come from its own calls), so the layers left pass: no second forward.
    while problems and plan.tapped.tied and narrowed is not None and (
            new := narrowed.tapped.check(state, *args, **kwargs)):
        problems.update(new)
        narrowed = _plan_of(plan.model, [n for n in plan.captured if n not in problems])
    if not problems:
        return plan
    # a bare parameter the forward never read by rows was never a candidate: it keeps
    # vmap(grad) as every other parameter outside the layers, silently
    loud = {n: w for n, w in problems.items()
            if not (plan.tapped.specs[n].kind == "bare" and w.startswith(capture.NOT_ROWS))}
    # ... unless it is a norm's (a weight and bias, or a 2-D scale): a norm module the capture
    # did not recognise puts the whole model on vmap(grad), a cost to name (review RU5 M3)
    norms = sorted(n for n in problems if n not in loud and _in_norm(plan, n))
    if norms:
        warnings.warn(f"layer_grads: the parameters {norms} of {type(plan.model.module).__name__} "
                      f"belong to a norm module the capture does not recognise (it captures "
                      f"LayerNorm, and an RMSNorm's one 1-D scale read as weight * x), so every "
                      f"example's gradient of the whole model is computed by vmap(grad) for "
                      f"them. {_REMEDY}", RuntimeWarning, stacklevel=user_stacklevel())
    if not loud:
        return narrowed
    why = "; ".join(_listed(loud))
    tail = f" {_REMEDY}" if any(plan.tapped.specs[n].kind == "layernorm" for n in loud) else ""
    warnings.warn(f"layer_grads: computing these layers of {type(plan.model.module).__name__} "
                  f"densely (vmap(grad)) instead of from captured factors: {why}.{tail}",
                  RuntimeWarning, stacklevel=user_stacklevel())
    return narrowed


_REMEDY = ("If they need no attribution, leave their keys out of functional_model(..., "
           "params=...) (e.g. params=lambda k: 'norm' not in k) to keep vmap(grad) off the model.")


def _in_norm(plan: LayerPlan, key: str) -> bool:
    """Whether bare parameter ``key`` is registered on a module whose class name holds "norm"."""
    owner = plan.model.module.get_submodule(key.rpartition(".")[0])
    return "norm" in type(owner).__name__.lower()


def _warn_dense(plan: LayerPlan, why: str, *, batch_only: bool = False) -> None:
    scope = "this batch's per-example gradients" if batch_only else \
        "the per-example gradients"
    warnings.warn(f"layer_grads: computing {scope} of {type(plan.model.module).__name__} "
                  f"densely{'' if batch_only else ' (the checked plan)'}: {why}. Layers applied "
                  f"to non-batch-first tensors or examples mixed in a batch cause this.",
                  RuntimeWarning, stacklevel=user_stacklevel())


def _listed(problems: dict[str, str]) -> list[str]:
    """``"layer: why"`` per layer; a why that names every layer giving it (a tie of three or
    more, review RU5 L3: a :class:`~.capture_mode.OneTensor`) is given once, on its own."""
    by: dict[str, list[str]] = {}
    for n, w in problems.items():
        by.setdefault(w, []).append(n or "<root>")
    out = []
    for w, ns in by.items():
        if len(ns) > 1 and isinstance(w, OneTensor):
            out.append(w)
        else:
            out.extend(f"{n}: {w}" for n in ns)
    return out

