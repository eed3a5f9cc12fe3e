"""Transforms of a model or a loss into per-example quantities (capture: per-layer ``a``/``g``)."""

from .capture import CaptureError, LayerSpec, layer_specs, probe_shapes, tap

__all__ = ["CaptureError", "LayerSpec", "layer_specs", "probe_shapes", "tap"]
