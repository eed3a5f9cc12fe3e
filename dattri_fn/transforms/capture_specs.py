"""Capturable layers and the per-example gradients formed from a capture (:mod:`.capture`).

:func:`layer_specs` names each submodule the engine can capture (its kind, state keys and
output width); :func:`weight_grad` / :func:`bias_grad` turn one layer's captured ``a`` and
``g`` into per-example gradients in the parameter's shape; :func:`probe_shapes` gives the
probe shapes of a ``tapped`` forward. All are importable from :mod:`.capture` as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

KINDS = ("linear", "conv1d", "conv2d", "embedding", "layernorm")


class CaptureError(ValueError):
    """A selected layer was used in a way the engine cannot factor (``.problems``: layer -> why)."""

    def __init__(self, problems: Mapping[str, str]):
        self.problems = dict(problems)
        text = "; ".join(f"{n or '<root>'}: {why}" for n, why in self.problems.items())
        super().__init__(f"capture: layers outside the per-layer capture engine: {text}.")


class LayerSpec(NamedTuple):
    """A capturable layer: its kind, state keys and output width (``g``'s last dim)."""

    kind: str
    weight: str
    bias: str | None
    out_features: int


def _spec(name: str, m: nn.Module, norms: bool = False) -> LayerSpec | None:
    prefix = f"{name}." if name else ""
    bias = f"{prefix}bias" if getattr(m, "bias", None) is not None else None
    if isinstance(m, nn.LayerNorm):
        if not norms or m.weight is None:
            return None
        return LayerSpec("layernorm", f"{prefix}weight", bias, m.weight.numel())
    if isinstance(m, nn.Linear):
        return LayerSpec("linear", f"{prefix}weight", bias, m.out_features)
    if isinstance(m, nn.Conv2d):
        return LayerSpec("conv2d", f"{prefix}weight", bias, m.out_channels)
    if isinstance(m, nn.Embedding):
        return LayerSpec("embedding", f"{prefix}weight", None, m.embedding_dim)
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, Tensor) and w.ndim == 2:
        return LayerSpec("conv1d", f"{prefix}weight", bias, w.shape[1])
    return None


def layer_specs(module: nn.Module, *, norms: bool = False) -> dict[str, LayerSpec]:
    """Return ``{name: LayerSpec}`` of every capturable submodule, in ``named_modules`` order.

    A module reached under several names (shared) is listed once, under its first name; the
    root module counts (name ``""``). ``norms=True`` adds each ``nn.LayerNorm`` with an affine
    weight (kind ``"layernorm"``, whose gradients are elementwise, not ``sum_t g_t a_t^T``:
    only for consumers that know it, via :func:`weight_grad` / :func:`bias_grad`).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"layer_specs(module=...): expected an nn.Module, got "
                        f"{type(module).__name__}.")
    return {n: s for n, m in module.named_modules() if (s := _spec(n, m, norms)) is not None}



def probe_shapes(tapped, acts: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Return each layer's probe (= ``g``) shape from its ``a`` (one forward's ``acts``)."""
    out = {}
    for n, a in acts.items():
        spec = tapped.specs[n]
        lead = a.shape if spec.kind == "embedding" else a.shape[:-1]
        out[n] = (*lead, spec.out_features)
    return out


def _tokens(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``a``, ``g`` with a positions dim: ``[B, T, in]`` (``[B, T]`` indices), ``[B, T, out]``."""
    if g.ndim == 2:
        return a[:, None], g[:, None]
    return a, g


def weight_grad(spec: LayerSpec, a: Tensor, g: Tensor, weight_shape) -> Tensor:
    """Return the per-example weight gradients ``sum_t g_t a_t^T`` in the weight's shape.  # [B, *W]

    LayerNorm: ``sum_t g_t * xhat_t`` (elementwise; ``a`` = ``xhat``)."""
    a, g = _tokens(a, g)
    if spec.kind == "layernorm":
        return (g * a).sum(1).reshape(g.shape[0], *weight_shape)
    if spec.kind == "embedding":
        V = weight_shape[0]
        rows = torch.where(a < 0, V, a)[..., None].expand(-1, -1, g.shape[-1])
        out = g.new_zeros(g.shape[0], V + 1, g.shape[-1]).scatter_add(1, rows, g)
        return out[:, :V]
    if spec.kind == "conv1d":
        return torch.einsum("bti,bto->bio", a, g)
    return torch.einsum("bto,bti->boi", g, a).reshape(g.shape[0], *weight_shape)


def bias_grad(spec: LayerSpec, g: Tensor) -> Tensor:
    """Return the per-example bias gradients ``sum_t g_t``.  # [B, out]"""
    return g if g.ndim == 2 else g.sum(1)
