"""Per-token scores: how much each position of a training sequence contributes to a score.

For a captured layer (input ``a``, output gradient ``g``) a training example's gradient is a
sum over positions, ``DW_i = sum_t g_it a_it^T`` (``db_i = sum_t g_it``), so any score that is
linear in the training gradient splits exactly over positions:

    s_ij = <grad_i, p_j> = sum_t sum_layers (g_it^T M_jl a_it + g_it . m_jl)

with ``p_j`` a test feature in the params' ravel layout (for influence ``p_j = (C + damping
I)^-1 grad_j``, for Grad-Dot ``p_j = grad_j``) and ``M_jl``, ``m_jl`` its weight and bias blocks.
``token_scores(...).sum(1)`` is the per-example score (kronfluence's per-token scores).

The same split holds for every other layer the capture engine reads position by position: an
``nn.Embedding`` (``dW_i = sum_t e_{id_it} g_it^T``: position ``t`` adds ``M_j[id_it] . g_it``)
and an affine ``nn.LayerNorm`` (``dw_i = sum_t g_it * xhat_it``, ``db_i = sum_t g_it``). A
parameter the engine does not capture (a bare ``nn.Parameter``, a layer after pooling) has a
gradient that is no sum over the sequence's positions as the layer sees them, so it is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .._checks import _msg, batch_size, batch_to, blame_data, check_params, check_tensor
from ..model import FunctionalModel, check_bridged, check_eval, default_unpack
from ..operators.kfac_layers import _tied_uses
from ..operators.kfac_tied import pooled_io, tied_group
from ..transforms import capture
from ..transforms.layers import batched_io


def token_scores(model: FunctionalModel, params, batch, test_features: Tensor) -> Tensor:
    """Return ``s_itj``, position ``t`` of train example ``i`` against test ``j``.  # -> [B, T, n_test]

    ``s_itj = sum_l g_itl^T M_jl a_itl (+ g_itl . m_jl)``; summed over ``t`` it equals
    ``grad_i . p_j`` exactly.

    Args:
        model: a FunctionalModel with a ``loss_fn`` whose every attributed parameter is the weight
            or bias of an ``nn.Linear``, HF ``Conv1D`` or ``nn.Conv2d`` (positions: tokens, or a
            convolution's output pixels), the weight of an ``nn.Embedding`` or the weight or bias
            of an affine ``nn.LayerNorm``, all applied at the same ``T`` positions, or a weight
            tied between an ``nn.Embedding`` and an ``nn.Linear`` (GPT-2's ``wte`` =
            ``lm_head``): its position ``t`` scores both uses there, ``g_t^T M h_t +
            M[id_t] . u_t`` (:mod:`dattri_fn.operators.kfac_tied`).
        params: the attributed parameters (keys and order of ``model.params``).
        batch: training examples (a Batch laid out as ``model``'s loss takes them).
        test_features: ``p_j`` in the params' ravel layout.  # [n_test, P]

    Raises:
        TypeError/ValueError: naming the argument: a replaced loss (``model._replace(loss=
            ...)``: the scores are of module and loss_fn), a parameter outside captured layers, layers
            at different numbers of positions, features of another width, or summed token scores
            of the first ``min(B, 3)`` examples that are not their own gradients' scores (by
            autograd): layers whose positions mix examples (sequence-first where ``T == B``).
    """
    func = "token_scores"
    if not isinstance(model, FunctionalModel) or model.loss_fn is None:
        raise TypeError(_msg(func, "model", "a FunctionalModel with a loss_fn",
                             type(model).__name__))
    check_bridged(func, "model", model)  # its layers are captured with module and loss_fn
    check_eval(func, "model", model)  # train-mode Dropout: random gradients (review RF M1)
    params = check_params(func, "params", params)
    if list(params) != list(model.params):
        raise ValueError(_msg(func, "params", f"the keys of model.params {list(model.params)}",
                              f"{list(params)}"))
    P = sum(v.numel() for v in params.values())
    check_tensor(func, "test_features", test_features)
    if test_features.ndim != 2 or test_features.shape[1] != P:
        raise ValueError(_msg(func, "test_features", f"[n_test, {P}] (the params' ravel layout)",
                              f"{list(test_features.shape)}"))
    every = capture.layer_specs(model.module, norms=True)
    # A tied weight is pooled over its uses or refused, whichever layer holds its key (a Linear
    # head declared before its Embedding too): one use's (a, g) misses the other's share.
    tied = _tied_uses(model.module, list(params))
    specs = {n: s for n, s in every.items()
             if (s.kind in ("linear", "conv1d", "conv2d", "embedding") and s.weight in params
                 and s.weight not in tied)
             or (s.kind == "layernorm" and (s.weight in params or s.bias in params))}
    owned = {k for s in specs.values() for k in (s.weight, s.bias) if k in params}
    groups = {}  # a weight tied between an Embedding and a Linear: group -> members
    unpooled = {}
    for k in tied:
        members = tied_group(model.module, k, params)
        if isinstance(members, tuple):
            groups[members[0]] = members
            owned.add(k)
        else:
            unpooled[k] = members
    if unpooled:
        raise ValueError(_msg(func, "params", "tied weights read by one Embedding and one "
                              "Linear, keyed by the first, no bias of theirs in params",
                              "; ".join(f"{k!r} shared by {tied[k]}: {why}"
                                        for k, why in unpooled.items()),
                              "Leave them (or the tied layer's bias) out: "
                              "functional_model(..., params=...)."))
    left = [k for k in params if k not in owned]
    if left:
        raise ValueError(_msg(func, "params", "only weights and biases of Linear, Conv1D, "
                              "Conv2d, Embedding or LayerNorm layers (their gradients split "
                              "over positions), or a weight tied between an Embedding and a "
                              "Linear",
                              f"other parameters {left}",
                              "Select them away: functional_model(..., params=...)."))
    B = batch_size(func, "batch", batch)
    state = {**model.fixed, **params}
    device = next(iter(params.values())).device
    batch = batch_to(batch, device)
    names = sorted({*specs, *(m for ms in groups.values() for m in ms)}, key=list(every).index)
    tapped = capture.tap(model.module, names, tied=bool(groups))
    like = next(iter(params.values()))
    args, kwargs, target = (model.unpack or default_unpack)(batch)
    with blame_data(func, "batch", batch):
        problems = tapped.check(state, *args, **kwargs)
        if problems:
            raise ValueError(_msg(func, "model", "layers the capture engine can factor",
                                  "; ".join(f"{n}: {w}" for n, w in problems.items())))
        io = batched_io(tapped, model.loss_fn, state, args, kwargs, target, None, like)
    offsets, start = {}, 0
    for k, v in params.items():
        offsets[k] = slice(start, start + v.numel())
        start += v.numel()
    feats = test_features.to(like.dtype)
    total, T0 = None, None
    for name in [n for n in every if n in specs or n in groups]:
        if name in groups:  # both uses' positions, pooled as one [V, d] Linear (kfac_tied)
            members = groups[name]
            for m in members:
                T0 = _positions(func, T0, io[m][1].reshape(B, -1, io[m][1].shape[-1]).shape[1],
                                m)
            V = next(tapped.specs[m].out_features for m in members
                     if tapped.specs[m].kind == "linear")
            a, g = pooled_io(tapped.specs, members, {m: io[m] for m in members}, V)
            spec = every[name]
        elif specs[name].kind in ("embedding", "layernorm"):
            a, g = io[name]
            a, g = a.detach(), g.detach().reshape(B, -1, g.shape[-1])
            T0 = _positions(func, T0, g.shape[1], name)
            part = _rows_split(specs[name], a, g, feats, offsets, params)
            total = part if total is None else total + part
            continue
        else:
            spec = specs[name]
            a, g = io[name]
            a = a.reshape(B, -1, a.shape[-1])
            g = g.reshape(B, -1, g.shape[-1])
            T0 = _positions(func, T0, a.shape[1], name)
        a, g = a.detach(), g.detach()
        out, inp = g.shape[-1], a.shape[-1]
        M = feats[:, offsets[spec.weight]]
        M = M.reshape(-1, inp, out).mT if spec.kind == "conv1d" else M.reshape(-1, out, inp)
        part = torch.einsum("btjo,bto->btj", torch.einsum("joi,bti->btjo", M, a), g)
        if name in groups:  # position t of each use: the uses' contributions at t summed
            part = part.reshape(B, len(groups[name]), T0, -1).sum(1)
        elif spec.bias in params:
            part = part + g @ feats[:, offsets[spec.bias]].T
        total = part if total is None else total + part
    _check_examples(func, model, params, batch, feats, total)
    return total


def _check_examples(func: str, model: FunctionalModel, params, batch, feats: Tensor,
                    S: Tensor) -> None:
    """Raise unless ``sum_t S[i, t] == grad_i . p_j`` for the first ``min(B, 3)`` examples,
    ``grad_i`` by autograd on example ``i`` alone (review R6 F2).

    The batch totals agree by construction, so only a per-example reference sees a layer
    whose positions are another example's: one applied to sequence-first ``[T, B, D]``
    tensors reads as batch-first where ``T == B`` (``nn.Transformer``'s default layout), and
    the capture engine cannot tell. The gap allowed is ``10 sqrt(eps)`` times
    ``max_ij |p_j| . |grad_i|``, which bounds both sides' rounding.
    """
    k = min(S.shape[0], 3)
    example = lambda i: tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, batch)
    want, scale = [], []
    with blame_data(func, "batch", batch), torch.enable_grad():
        for i in range(k):
            live = {key: v.detach().requires_grad_(True) for key, v in params.items()}
            grads = torch.autograd.grad(model.loss(live, example(i)), list(live.values()),
                                        allow_unused=True, materialize_grads=True)
            row = torch.cat([x.reshape(-1) for x in grads]).to(feats.dtype)  # [P]
            want.append(feats @ row)
            scale.append(feats.abs() @ row.abs())
    want, scale, got = torch.stack(want), torch.stack(scale), S[:k].sum(1).detach()  # [k, n]
    ok = torch.isfinite(want) & torch.isfinite(got)
    if not torch.equal(ok, torch.isfinite(want) | torch.isfinite(got)):
        err = float("inf")  # finite on one side only
    else:
        err = float((got - want)[ok].abs().max()) if bool(ok.any()) else 0.0
    top = float(scale[ok & torch.isfinite(scale)].max()) if bool(ok.any()) else 0.0
    if not err <= 10 * torch.finfo(feats.dtype).eps ** 0.5 * max(top, 1e-30):
        raise ValueError(_msg(
            func, "model", f"layers whose positions are each example's own (sum_t s_itj == "
            f"grad_i . p_j on the first {k} examples, grad_i by autograd on example i alone)",
            f"a difference of {err:.3g} (scale {top:.3g}): positions of other examples, as "
            f"where a layer runs on sequence-first [T, B, ...] tensors with T == B",
            "Run the model batch-first, or pass batches whose size is not the sequence length "
            "(the capture engine then refuses such a layer by name)."))


def _rows_split(spec, a: Tensor, g: Tensor, feats: Tensor, offsets: dict, params) -> Tensor:
    """Position ``t``'s share of an Embedding's or a LayerNorm's gradient against ``feats``.  # -> [B, T, n]

    Embedding (``a`` = ids): ``M_j[id_t] . g_t`` (a negative id, a row the engine drops, adds
    nothing); LayerNorm (``a`` = ``xhat``): ``(g_t * xhat_t) . m_jw + g_t . m_jb``.
    """
    B, T, D = g.shape
    if spec.kind == "embedding":
        ids = a.reshape(B, T)
        M = feats[:, offsets[spec.weight]].reshape(feats.shape[0], -1, D)  # [n, V, D]
        rows = M[:, ids.clamp(min=0)]  # [n, B, T, D]
        # where, not a 0 multiply: g may be NaN at a dropped position (review R6 F1)
        return torch.where((ids >= 0)[..., None], torch.einsum("jbtd,btd->btj", rows, g), 0)
    out = 0
    if spec.weight in params:
        out = (g * a.reshape(g.shape)) @ feats[:, offsets[spec.weight]].T
    if spec.bias in params:
        out = out + g @ feats[:, offsets[spec.bias]].T
    return out


def _positions(func: str, T0: int | None, T: int, name: str) -> int:
    """The positions every layer shares (the first layer's), or an error naming ``name``."""
    if T0 is not None and T != T0:
        raise ValueError(_msg(func, "model", "layers applied at the same number of positions",
                              f"{T0} and {T} (layer {name!r})"))
    return T


__all__ = ["token_scores"]
