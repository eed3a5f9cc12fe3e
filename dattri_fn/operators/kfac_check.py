"""K-FAC/EK-FAC's once-per-pass check that each layer's captured per-example gradient is the
example's own (see :mod:`dattri_fn.operators.kfac` for the method).

The capture engine (:mod:`dattri_fn.transforms.capture`) takes a layer input whose first dim is
the batch size as batch-first. A layer applied to a sequence-first ``[S, B, d]`` tensor with
``S = B`` (``nn.MultiheadAttention``'s default layout, a hand-written transpose), or to a tensor
that mixes the examples of the batch, then gives captured blocks ``sum_t g_t a_t^T`` that are
not any example's gradient, silently: K-FAC's ``A`` and ``G`` sum over every position and are
unchanged, but EK-FAC's ``Lambda`` and every per-example score are wrong.

The factor pass keeps the first ``_CHECK_ROWS`` rows of its first chunk's ``(a, g)`` per layer
(the chunk the pass captures anyway, at its real batch size: a separate small batch would not
have ``S = B``), and after the pass those rows' blocks are compared with autodiff of each example
alone, one backward pass per example (a loop, not vmap: vmap refuses some models and its loss
rules import sympy; never the capture engine, which is what is checked), with the
layer-gradient plan's tolerance
(:mod:`dattri_fn.transforms.layer_grads`: ``10 sqrt(eps)`` of the layer's gradient scale). A
layer that differs is no Kronecker layer: its params join the params outside them (the exact
Fisher-diagonal block, one warning naming each key and why).

A tied Embedding/Linear group (:mod:`.kfac_tied`) is always checked: its weight's pooled
gradient ``sum_t g_t h_t^T + sum_s e_{id_s} u_s^T`` (both uses summed) against autodiff of the
weight; a group that differs moves to the diagonal block as a whole, named as the group.

Under a sharded ``reduce`` the check's decision is this process's, taken before its sums are
reduced and reduced with them (:func:`~.kfac_stats.kfac_factors`' ``"R:<layer>"``): a layer
moved on one process is moved on all.

Note:
    Only layers read at positions (a ``[B, T, in]`` input, several calls, Conv2d's patches) are
    checked: there a dim other than the examples' can equal ``B`` and be taken for them. A flat
    layer (one call on a ``[B, in]`` input) is taken as one example per row, the capture
    engine's stated assumption (independent examples, eval mode), unchecked: checking it costs
    two one-example forward and backward passes (about 2 ms, 15% of EK-FAC's prepare + score on
    digits-lr on this machine), and the only way for its rows not to be examples is a model
    that mixes the batch (or reads ``x.T`` of a square ``[B, B]`` tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .._checks import batch_size, batch_slice
from ..transforms import capture
from ..transforms.layers import unpack_example
from .kfac_diag import _example_loss
from .kfac_fisher import _ExpectedLoss, _SampledLoss
from .kfac_layers import _keys

# Examples of the first chunk compared with autodiff, once per factor pass: two rows show a
# layer whose rows are positions (or mixtures) of the batch, not examples.
_CHECK_ROWS = 2


class Rows:
    """What a K-FAC pass keeps for the check: ``first`` the pass's first batch, ``a`` / ``g``
    the first ``k`` rows of the first chunk (copies: the chunk is freed) of each layer with
    positions (module Note: flat layers are not checked), ``pooled`` each tied group's first
    rows of :class:`~.kfac_tied.PooledParts` (two uses of one weight: always checked)."""

    def __init__(self):
        self.first, self.a, self.g = None, {}, {}
        self.seen: set[str] = set()
        self.pooled: dict = {}

    def on_pooled(self, group: str, parts) -> None:
        if group not in self.pooled:
            self.pooled[group] = type(parts)(*(t[:_CHECK_ROWS].clone() for t in parts))

    def on_input(self, layer: str, a: Tensor) -> None:
        if layer in self.seen:
            return
        self.seen.add(layer)
        if a.ndim > 2:  # [B, T, in]: a dim other than the examples' could equal B
            self.a[layer] = a[:_CHECK_ROWS].clone()

    def on_grad(self, layer: str, g: Tensor) -> None:
        if layer in self.a and layer not in self.g:  # the first direction of an expected pass
            self.g[layer] = g[:_CHECK_ROWS].clone()


def _reference_loss(loss):
    """``(loss_fn, target of the first rows)`` of the check's autodiff, for the pass's loss:
    the observed targets, the sampled loss's first draw, or the expected Fisher's first output
    direction ``b_0`` (its ``g`` is ``J^T b_0``)."""
    if isinstance(loss, _SampledLoss):
        return loss.loss_fn, loss.first
    if isinstance(loss, _ExpectedLoss):
        return (lambda out, *_: (out * loss.directions(out)[0]).sum()), None
    return loss, None


def _autodiff(module: nn.Module, loss_fn, state, keys, args, kwargs, target, k: int
              ) -> dict[str, Tensor]:
    """``{key: [k, *shape]}``: each of the first ``k`` examples' gradient of ``keys``, from a
    forward of that example alone (a batch of one) on its own leaf copies of ``keys``, and
    ONE backward of the examples' summed losses (their graphs share no leaf)."""
    one = _example_loss(module, loss_fn, state)
    live = [{key: state[key].detach().requires_grad_(True) for key in keys} for _ in range(k)]
    with torch.enable_grad():
        total = 0
        for i in range(k):
            pick = lambda t, i=i: t[i] if isinstance(t, Tensor) else t  # noqa: E731
            total = total + one(live[i], tree_map(pick, args), tree_map(pick, kwargs),
                                None if target is None else tree_map(pick, target))
        flat = torch.autograd.grad(total, [v for r in live for v in r.values()],
                                   allow_unused=True, materialize_grads=True)
    n = len(keys)
    return {key: torch.stack(flat[j::n]) for j, key in enumerate(keys)}


def differing(module: nn.Module, loss_fn, state, rows: dict[str, Tensor], args, kwargs,
              target) -> dict[str, str]:
    """``{key: why}`` for the keys whose captured per-example gradients ``rows`` (``{key: [k,
    *shape]}``, the first ``k`` examples of the chunk ``(args, kwargs, target)``) differ from
    autodiff of each example alone (``loss_fn`` on a batch of one, the observed or drawn
    targets): beyond ``10 sqrt(eps)`` of the key's gradient scale (at least ``sqrt(eps)`` of
    every key's), the layer-gradient plan's rule."""
    if not rows:
        return {}
    first = next(iter(rows.values()))
    k, eps = first.shape[0], torch.finfo(first.dtype).eps
    ref = _autodiff(module, loss_fn, state, list(rows), args, kwargs, target, k)
    scales = {key: float(ref[key].abs().max()) for key in rows}
    floor = eps ** 0.5 * max(scales.values())
    out = {}
    for key, got in rows.items():
        err = float((got - ref[key].to(got.dtype)).abs().max())
        if not err <= 10 * eps ** 0.5 * max(scales[key], floor, 1e-30):
            out[key] = (f"its captured per-example gradients differ from autodiff on the first "
                        f"{k} examples (max difference {err:.3g}, gradient scale "
                        f"{scales[key]:.3g}): its layer reads a tensor whose first dim is not the "
                        f"examples, e.g. a sequence-first [S, B, d] input with S = B, or one "
                        f"that mixes the batch")
    return out


def _pooled_grad(parts) -> Tensor:
    """A tied weight's per-example gradient ``sum_t g_t h_t^T + sum_s e_{id_s} u_s^T`` from
    its pooled parts (:mod:`.kfac_tied`; ``u`` is zero where ``ids`` is ``-1``).
    # -> [k, V, d]"""
    dw = parts.g.mT @ parts.h
    idx = parts.ids.clamp_min(0)[..., None].expand_as(parts.u)
    return dw.scatter_add_(1, idx, parts.u)


def mismatched(func: str, module: nn.Module, loss, state, names, param_names, tapped,
               rows: Rows) -> dict[str, str]:
    """``{layer: why}`` for the checked layers whose captured gradients ``sum_t g_t a_t^T`` of
    the first rows differ from autodiff (:func:`differing`); a tied group (:mod:`.kfac_tied`)
    is checked on its weight's pooled gradient, both uses summed, and named as its group."""
    checked = [n for n in names if n in rows.g and n in rows.a]
    groups = [n for n in names if n in rows.pooled]
    if not (checked or groups) or rows.first is None:
        return {}
    k = min(_CHECK_ROWS, batch_size(func, "data", rows.first))
    args, kwargs, target = unpack_example(batch_slice(rows.first, 0, k))
    loss_fn, drawn = _reference_loss(loss)
    if drawn is not None:
        target = tree_map(lambda t: t[:k] if isinstance(t, Tensor) else t, drawn)
    got, owner = {}, {}
    for n in checked:
        spec, (wk, bk) = tapped.specs[n], _keys(n)
        a, g = rows.a[n][:k], rows.g[n][:k]
        got[wk], owner[wk] = capture.weight_grad(spec, a, g, state[wk].shape), n
        if bk in param_names:
            got[bk], owner[bk] = capture.bias_grad(spec, g), n
    for n in groups:
        got[_keys(n)[0]], owner[_keys(n)[0]] = _pooled_grad(rows.pooled[n])[:k], n
    bad: dict[str, str] = {}
    for key, why in differing(module, loss_fn, state, got, args, kwargs, target).items():
        kind = "tied group" if owner[key] in rows.pooled else "layer"
        bad.setdefault(owner[key], f"{kind} {owner[key]!r}: {why}")
    return bad
