"""Which layers a capture plan reads (:mod:`dattri_fn.transforms.layer_grads`), ties included.

A weight tied between layers of different kinds (GPT-2's ``wte``, an Embedding, read again by
``lm_head``, a Linear) is attributed under one key, but two layers read it. The capture engine
takes each use under its own layer (``capture.tap(..., tied=True)``) and the key's per-example
gradient is the sum of the members' gradients,

    dW_i = sum_{t: ids_it = v} g_it  (row v, the Embedding)  +  sum_t g'_it a_it^T  (the Linear),

which is no Kronecker product: the plan writes it into the dense block as rows, as it does for
LayerNorms, and keeps the members out of ``plan.layers``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import capture
from .factored_grads import LayerGrads, _embedding_rows
from .tie_factors import TIE_KINDS, TieFactors


def attributed_layers(module: nn.Module, params) -> list[str]:
    """The capturable layers (LayerNorms and bare parameters included) that read an attributed
    parameter: as weight or bias, or as a weight attributed under another name (a tie), in
    module order."""
    out, held, named = [], None, {}
    for n, s in capture.layer_specs(module, norms=True, bare=True).items():
        if s.weight not in params and s.bias not in params:
            if held is None:  # walked only where a layer's own keys are not attributed
                named = dict(module.named_parameters(remove_duplicate=False))
                held = {id(named[k]) for k in params if k in named}
            if s.weight not in named or id(named[s.weight]) not in held:
                continue
        out.append(n)
    return out


def tap_plan(module: nn.Module, names: list[str]):
    """``capture.tap`` of ``names``, with ``tied=True`` where some of them share a weight
    (``tapped.tied`` then names the groups; without one the tap is the plain one)."""
    tapped = capture.tap(module, names)
    if not tapped.ties_any:  # no tensor held under two names: nothing to tie
        return tapped
    both = capture.tap(module, names, tied=True)
    return both if both.tied else tapped


def tied_keys(module: nn.Module, tapped, params) -> dict[str, tuple[str, ...]]:
    """``{attributed key: the layers of its tie group}`` for the groups of ``tapped.tied``."""
    if not tapped.tied:
        return {}
    named = dict(module.named_parameters(remove_duplicate=False))
    key_of = {id(named[k]): k for k in params if k in named}
    out = {}
    for group in tapped.tied:
        key = key_of.get(id(named[tapped.specs[group[0]].weight]))
        if key is not None:
            out[key] = tuple(group)
    return out


def tie_biases(module: nn.Module, tapped, params, members) -> dict[str, str]:
    """``{attributed key: layer}`` of the biases of the tie ``members`` (a tied decoder's own
    bias, BERT-MLM's ``cls.predictions.bias`` under another name too): found by identity."""
    held = [m for m in tapped.specs if m in members and tapped.specs[m].bias is not None]
    if not held:
        return {}
    named = dict(module.named_parameters(remove_duplicate=False))
    key_of = {id(named[k]): k for k in params if k in named}
    out = {}
    for m in held:
        key = key_of.get(id(named[tapped.specs[m].bias]))
        if key is not None:
            out[key] = m
    return out


def _layer_rows(spec, a: Tensor, g: Tensor, lead: int, shape) -> Tensor:
    """One member's weight gradient rows, raveled as the weight.  # -> [*lead, numel]"""
    if spec.kind == "embedding":
        return _embedding_rows(spec, a, g, lead, shape)
    a = a.reshape(*a.shape[:lead], -1, a.shape[-1])
    g = g.reshape(*g.shape[:lead], -1, g.shape[-1])
    if spec.kind == "conv1d":  # stored [in, out]
        return torch.einsum("...ti,...to->...io", a, g).flatten(lead)
    return torch.einsum("...to,...ti->...oi", g, a).flatten(lead)


def dense_rows(plan, raw: dict, lead: int, *, skip=()) -> dict[str, Tensor]:
    """``{key: [*lead, numel]}``: the rows of ``plan.norms``' keys, of its bare keys and of its
    tied keys from the capture pass's ``{layer: (a, g)}`` (the dense block's entries that are
    not ``vmap(grad)``). A bare key: ``dW[v] = sum_{t: id_t = v} g_t`` (an Embedding's rows).

    A LayerNorm (``a = xhat``): ``dw = sum_t g_t * xhat_t``, ``db = sum_t g_t`` (positions, if
    any, are every dim between the lead dims and the normalised one; the normalised dims come
    folded into one, raveled as the weight is). A tied key: the sum of its members' rows
    (``skip``: tied keys left out, kept as :func:`tie_factors` instead). A tie member's own
    bias: ``sum_t g_t``.
    """
    rows = {}
    for key in getattr(plan, "bare", ()):  # row ids and g as an Embedding's
        a, g = raw[key]
        rows[key] = _embedding_rows(plan.tapped.specs[key], a.reshape(*a.shape[:lead], -1),
                                    g.reshape(*g.shape[:lead], -1, g.shape[-1]), lead,
                                    plan.model.params[key].shape)
    for n, (wk, bk) in plan.norms.items():
        a, g = raw[n]
        g = g.reshape(*g.shape[:lead], -1, g.shape[-1])  # [*lead, T, D]
        if wk is not None:
            rows[wk] = (g * a.reshape(g.shape)).sum(-2)
        if bk is not None:
            rows[bk] = g.sum(-2)
    plain = torch._C._functorch.maybe_current_level() is None
    for key, members in plan.ties.items():
        if key in skip:
            continue
        shape = plan.model.params[key].shape
        total = None
        for m in members:  # one [*lead, numel] block at a time: a tied vocabulary is wide
            part = _layer_rows(plan.tapped.specs[m], *raw[m], lead, shape)
            if total is None:
                total = part
            elif plain and not (total.requires_grad or part.requires_grad):
                total.add_(part)
            else:
                total = total + part
        rows[key] = total
    for key, m in plan.tie_biases.items():
        g = raw[m][1]
        rows[key] = g.reshape(*g.shape[:lead], -1, g.shape[-1]).sum(-2)  # sum_t g_t
    return rows


def tie_factors(plan, raw: dict, lead: int) -> dict[str, TieFactors]:
    """``{key: TieFactors}``: the tied keys of ``plan.ties`` kept as their members' factors
    from the capture pass's ``{layer: (a, g)}`` (an Embedding's ids and output gradient, a
    Linear's input and output gradient), so that no ``[*lead, V D]`` row is formed. A tie with
    a member of another kind (a Conv1D) is left out: :func:`dense_rows` forms its rows."""
    out = {}
    for key, members in plan.ties.items():
        specs = [plan.tapped.specs[m] for m in members]
        if any(s.kind not in TIE_KINDS for s in specs):
            continue
        parts = []
        for m, spec in zip(members, specs, strict=True):
            a, g = raw[m]
            g = g.reshape(*g.shape[:lead], -1, g.shape[-1])  # positions folded: [*lead, T, .]
            a = (a.reshape(*a.shape[:lead], -1) if spec.kind == "embedding"
                 else a.reshape(*a.shape[:lead], -1, a.shape[-1]))
            parts.append((spec.kind, a, g))
        V, D = plan.model.params[key].shape
        out[key] = TieFactors((int(V), int(D)), tuple(parts))
    return out


def keep_ties(lg: LayerGrads, ties: dict[str, TieFactors]) -> LayerGrads:
    """Return ``lg`` with the tied keys of ``ties`` read from those factors (layout ``("t",
    key, TieFactors)``) and their columns dropped from the dense block: the same gradients,
    the ``V D`` columns no longer held."""
    drop = {k: src for k, src in lg.layout if k in ties and src[0] == "d"}
    if not drop:
        return lg
    keep, layout, off = [], [], 0
    for k, src in lg.layout:
        if k in drop:
            layout.append((k, ("t", k, ties[k])))
        elif src[0] == "d":
            keep.append(lg.dense[..., src[1]:src[2]])
            layout.append((k, ("d", off, off + src[2] - src[1])))
            off += src[2] - src[1]
        else:
            layout.append((k, src))
    dense = torch.cat(keep, -1) if keep else lg.dense[..., :0]
    return LayerGrads(lg.factors, dense, tuple(layout))
