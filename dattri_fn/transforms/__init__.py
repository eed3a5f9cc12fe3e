"""Transforms of a model or a loss into per-example quantities: gradients (:mod:`.grad`), the
per-layer capture of ``a``/``g`` (:mod:`.capture`, :mod:`.layer_grads`) and random projections,
dense or Kronecker-factored (:mod:`.project`)."""

from .capture import CaptureError, LayerSpec, layer_specs, probe_shapes, tap
from .kronecker import KroneckerLayer, KroneckerProjector, make_kronecker_projector

__all__ = ["CaptureError", "KroneckerLayer", "KroneckerProjector", "LayerSpec", "layer_specs",
           "make_kronecker_projector", "probe_shapes", "tap"]
