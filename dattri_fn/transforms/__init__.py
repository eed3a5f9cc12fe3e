"""Transforms of a model or a loss into per-example quantities: gradients (:mod:`.grad`), the
per-layer capture of ``a``/``g`` (:mod:`.capture`, :mod:`.layer_grads`) and random projections,
dense or Kronecker-factored (:mod:`.project`)."""

from .capture import CaptureError, LayerSpec, Probed, layer_specs, probe_shapes, tap
from .kronecker import KroneckerLayer, KroneckerProjector, make_kronecker_projector
from .layer_grads import (
    LayerPlan,
    PlanDecisions,
    certified_plan,
    check_plan,
    decided_plan,
    layer_grads_fn,
    layer_grads_stream,
    layer_plan,
    plan_decisions,
)

__all__ = ["CaptureError", "KroneckerLayer", "KroneckerProjector", "LayerPlan", "LayerSpec",
           "PlanDecisions", "Probed", "certified_plan", "check_plan", "decided_plan", "layer_grads_fn",
           "layer_grads_stream", "layer_plan", "layer_specs", "make_kronecker_projector",
           "plan_decisions", "probe_shapes", "tap"]
