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

KINDS = ("linear", "conv1d", "conv2d", "embedding", "layernorm", "bare")


# The start of a bare parameter's problem when the forward never read it by rows (``x * s``,
# ``x @ W``, unused): it was never a candidate, so a plan drops it without a warning.
NOT_ROWS = "not read by rows"


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


def _scale_key(m: nn.Module) -> str | None:
    """The key of an RMSNorm-like module's one scale: torch's ``nn.RMSNorm`` (affine), or a
    module of another library (HF's ``LlamaRMSNorm``, ``Qwen2RMSNorm``, T5's ``T5LayerNorm``, a
    user's own) whose class name holds "norm" and whose only direct parameter is 1-D. The name
    only makes it a candidate: the capture takes it where its one use is ``w * x`` with ``x``
    batch-first (or ``F.rms_norm``), whose ``dw = sum_t g_t * x_t`` holds whatever ``x`` is
    (:func:`.capture_norm.scale_inspect`); any other use (Gemma's ``1 + w``) is a problem."""
    if isinstance(m, nn.RMSNorm):
        return "weight" if m.weight is not None else None
    if type(m).__module__.startswith("torch.") or "norm" not in type(m).__name__.lower():
        return None
    own = list(m.named_parameters(recurse=False))
    return own[0][0] if len(own) == 1 and own[0][1].ndim == 1 else None


def _spec(name: str, m: nn.Module, norms: bool = False) -> LayerSpec | None:
    prefix = f"{name}." if name else ""
    bias = f"{prefix}bias" if getattr(m, "bias", None) is not None else None
    if isinstance(m, nn.LayerNorm):
        if not norms or m.weight is None:
            return None
        return LayerSpec("layernorm", f"{prefix}weight", bias, m.weight.numel())
    if norms and (key := _scale_key(m)) is not None:  # RMSNorm: a LayerNorm kind with no bias
        return LayerSpec("layernorm", prefix + key, None, getattr(m, key).numel())
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


def layer_specs(module: nn.Module, *, norms: bool = False,
                bare: bool = False) -> dict[str, LayerSpec]:
    """Return ``{name: LayerSpec}`` of every capturable submodule, in ``named_modules`` order.

    A module reached under several names (shared) is listed once, under its first name; the
    root module counts (name ``""``). ``norms=True`` adds each ``nn.LayerNorm`` with an affine
    weight (kind ``"layernorm"``, whose gradients are elementwise, not ``sum_t g_t a_t^T``:
    only for consumers that know it, via :func:`weight_grad` / :func:`bias_grad`), and each
    RMSNorm-like module's scale as the same kind with no bias (:func:`_scale_key`).

    ``bare=True`` adds each *bare* parameter (kind ``"bare"``, named by its own key, listed
    after its module's layer if any): a 1-D or 2-D ``nn.Parameter`` registered directly on a
    module whose class is not one of torch's own (a hand-written model's ``self.pos``), that
    no listed layer reads as weight or bias. Its rows ``W[v]`` (a 1-D one: ``[V]`` rows of
    width 1) are captured where the model reads some of them (``W[:T]``, ``W[idx]``, ``W[t]``,
    ``F.embedding(idx, W)``, or ``W`` itself in an add) and adds (subtracts, multiplies) them
    to a batch-first tensor: ``dW[v] = sum_{t: id_t = v} g_t`` as an Embedding's
    (:mod:`.capture_norm`); any other use is a problem.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"layer_specs(module=...): expected an nn.Module, got "
                        f"{type(module).__name__}.")
    specs = {n: s for n, m in module.named_modules()
             if (s := _spec(n, m, norms or bare)) is not None}
    if not bare:
        return specs
    return _with_bare(module, specs if norms else {n: s for n, s in specs.items()
                                                  if s.kind != "layernorm"}, specs)


def grouped(groups: int) -> str:
    """Why a Conv2d call with ``groups > 1`` is not captured (its weight gradient is ``groups``
    block-diagonal pieces, not one ``sum_t g_t a_t^T``)."""
    return f"groups = {groups}, only groups = 1 is factored"


def module_problems(module: nn.Module, specs: Mapping[str, LayerSpec]) -> dict[str, str]:
    """``{layer: why}`` of the ``specs`` whose calls the capture refuses whatever the data, by
    their module alone (a grouped ``nn.Conv2d``): a method can leave them out at construction,
    in the one warning that names what it attributes, instead of a second one at its first pass."""
    mods = dict(module.named_modules())
    return {n: grouped(mods[n].groups) for n, s in specs.items()
            if s.kind == "conv2d" and isinstance(mods.get(n), nn.Conv2d) and mods[n].groups != 1}


def _with_bare(module: nn.Module, specs: dict[str, LayerSpec],
               every: dict[str, LayerSpec]) -> dict[str, LayerSpec]:
    """``specs`` with the bare parameters (:func:`layer_specs`) after their module's layer."""
    named = dict(module.named_parameters(remove_duplicate=False))
    # a tensor a layer reads (LayerNorms too, listed or not) is that layer's, never bare
    read = {id(named[k]) for s in every.values() for k in (s.weight, s.bias) if k in named}
    out, seen = {}, set()
    for n, m in module.named_modules():
        if n in specs:
            out[n] = specs[n]
        if type(m).__module__.startswith("torch."):  # torch's layers read theirs by their op
            continue
        prefix = f"{n}." if n else ""
        for k, p in m.named_parameters(recurse=False):
            if p.ndim in (1, 2) and id(p) not in read and id(p) not in seen:
                seen.add(id(p))
                out[prefix + k] = LayerSpec("bare", prefix + k, None,
                                            p.shape[1] if p.ndim == 2 else 1)
    return out



def probe_shapes(tapped, acts: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Return each layer's probe (= ``g``) shape from its ``a`` (one forward's ``acts``)."""
    out = {}
    for n, a in acts.items():
        spec = tapped.specs[n]
        lead = a.shape if spec.kind in ("embedding", "bare") else a.shape[:-1]
        out[n] = (*lead, spec.out_features)
    return out


def _tokens(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``a``, ``g`` with a positions dim: ``[B, T, in]`` (``[B, T]`` indices), ``[B, T, out]``."""
    if g.ndim == 2:
        return a[:, None], g[:, None]
    return a, g


def weight_grad(spec: LayerSpec, a: Tensor, g: Tensor, weight_shape) -> Tensor:
    """Return the per-example weight gradients ``sum_t g_t a_t^T`` in the weight's shape.  # [B, *W]

    LayerNorm: ``sum_t g_t * xhat_t`` (elementwise; ``a`` = ``xhat``). Embedding and bare
    (``a`` = row ids, ``-1`` adds nothing): ``dW[v] = sum_{t: a_t = v} g_t``."""
    a, g = _tokens(a, g)
    if spec.kind == "layernorm":
        return (g * a).sum(1).reshape(g.shape[0], *weight_shape)
    if spec.kind in ("embedding", "bare"):  # a bare 1-D weight: rows of width 1
        V = weight_shape[0]
        g = g if g.ndim == 3 else g[..., None]
        rows = torch.where(a < 0, V, a)[..., None].expand(-1, -1, g.shape[-1])
        out = g.new_zeros(g.shape[0], V + 1, g.shape[-1]).scatter_add(1, rows, g)
        return out[:, :V].reshape(g.shape[0], *weight_shape)
    if spec.kind == "conv1d":
        return torch.einsum("bti,bto->bio", a, g)
    return torch.einsum("bto,bti->boi", g, a).reshape(g.shape[0], *weight_shape)


def bias_grad(spec: LayerSpec, g: Tensor) -> Tensor:
    """Return the per-example bias gradients ``sum_t g_t``.  # [B, out]"""
    return g if g.ndim == 2 else g.sum(1)
