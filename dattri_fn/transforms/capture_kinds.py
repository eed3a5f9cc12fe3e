"""The call kinds of the capture engine (:mod:`dattri_fn.transforms.capture`).

Each kind recognises one torch function that consumes a selected layer's weight, returns that
call's layer input in the linear form ``dW = sum_t g_t a_t^T`` (or why the call cannot be
factored), and adds the layer's probe to the call's output.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .capture_norm import Broadcast, layer_norm_inspect

if TYPE_CHECKING:
    from .capture_mode import _Capture


def _arg(args: tuple, kwargs: dict, i: int, key: str, default=None):
    return args[i] if len(args) > i else kwargs.get(key, default)


_PER_CALL = object()  # probes made by the mode itself, one per call, shaped as that call's output
_ADDED = object()  # as _PER_CALL, every probe a zero added to the output (never the output itself)


# Each kind: (kind, inspect(mode, name, args, kwargs) -> (a, flat, T) or a reason,
#             add_probe(mode, name, out, T) -> out).
def _input_of(mode: _Capture, name, args, kwargs) -> Tensor | str:
    """``(input, weight, bias, ...)`` calls (linear, conv2d): the input, or why not captured."""
    x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), \
        _arg(args, kwargs, 2, "bias")
    if mode.roles.get(id(w)) != (name, "weight"):
        return "its bias is used without its weight"
    if mode.specs[name].bias is not None and mode.roles.get(id(b)) != (name, "bias"):
        return "its weight is used without its bias"
    return x


def _linear_inspect(mode: _Capture, name, args, kwargs):
    x = _input_of(mode, name, args, kwargs)
    if isinstance(x, str):
        return x
    B = mode.rows_of(x)
    if isinstance(B, str):
        return B
    if x.ndim == 2:  # flat: the input itself
        return x, True, 1
    T = math.prod(x.shape[1:-1])
    return x.reshape(B, T, x.shape[-1]), False, T


def _add_positions(mode: _Capture, name: str, out: Tensor, T: int) -> Tensor:
    if mode.probes is _PER_CALL:
        return mode._own(name, out)
    p = mode._probe(name, T, out)
    if p is None:
        return out
    return out + (p if p.ndim == 0 or mode.probes is _ADDED else p.reshape(out.shape))


def _addmm_inspect(mode: _Capture, name, args, kwargs):
    b, x, w = (_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat1"),
               _arg(args, kwargs, 2, "mat2"))
    if mode.roles.get(id(w)) != (name, "weight") or kwargs.get("beta", 1) != 1 \
            or kwargs.get("alpha", 1) != 1:
        return "addmm with the weight not as mat2 (or beta/alpha set)"
    spec = mode.specs[name]
    if (spec.bias is not None and mode.roles.get(id(b)) != (name, "bias")) or \
            (spec.bias is None and mode.roles.get(id(b)) is not None):
        return "its weight is used without its bias"
    if mode.batch is None or x.shape[0] % mode.batch:
        return f"rows {x.shape[0]} that are not B = {mode.batch} blocks of positions"
    T = x.shape[0] // mode.batch
    if T == 1:  # flat: the rows themselves
        return x, True, 1
    return x.reshape(mode.batch, T, x.shape[1]), False, T


def _conv2d_inspect(mode: _Capture, name, args, kwargs):
    x = _input_of(mode, name, args, kwargs)
    if isinstance(x, str):
        return x
    w = _arg(args, kwargs, 1, "weight")
    stride, padding, dilation, groups = (_arg(args, kwargs, 3, "stride", 1),
                                         _arg(args, kwargs, 4, "padding", 0),
                                         _arg(args, kwargs, 5, "dilation", 1),
                                         _arg(args, kwargs, 6, "groups", 1))
    if groups != 1:
        return f"groups = {groups} (only groups = 1 is factored)"
    if x.ndim != 4:
        return f"an unbatched input {list(x.shape)}"
    B = mode.rows_of(x)
    if isinstance(B, str):
        return B
    kernel = w.shape[2:]
    dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": symmetric only when every dilated kernel extent is odd
            total = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
            if any(t % 2 for t in total):
                return "padding='same' with an even kernel extent (asymmetric padding)"
            padding = tuple(t // 2 for t in total)
    cols = F.unfold(x, kernel, dilation=dil, padding=padding, stride=stride)  # [B, k, L]
    return cols.transpose(1, 2), False, cols.shape[2]


def _conv2d_probe(mode: _Capture, name: str, out: Tensor, T: int) -> Tensor:
    if mode.probes is _PER_CALL:
        return mode._own(name, out)
    p = mode._probe(name, T, out)
    if p is None:
        return out
    if mode.probes is _ADDED:
        return out + p
    return out + (p if p.ndim == 0 else p.transpose(1, 2).reshape(out.shape))


def _embedding_inspect(mode: _Capture, name, args, kwargs):
    idx, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if mode.roles.get(id(w)) != (name, "weight"):
        return "its weight is the indices argument"
    if _arg(args, kwargs, 3, "max_norm") is not None:
        return "max_norm (renormalises the weight in place)"
    if _arg(args, kwargs, 5, "scale_grad_by_freq", False):
        return "scale_grad_by_freq (a gradient that depends on the whole batch)"
    pad = _arg(args, kwargs, 2, "padding_idx")
    if pad is not None:
        pad = pad if pad >= 0 else w.shape[0] + pad
        idx = idx.masked_fill(idx == pad, -1)
    B = mode.rows_of(idx)
    if isinstance(B, str):  # shared by the batch (GPT-2's wpe): decided where it is used
        return Broadcast(idx) if mode.batch is not None else B
    if idx.ndim == 1:  # flat: one index per example
        return idx, True, 1
    T = math.prod(idx.shape[1:])
    return idx.reshape(B, T), False, T


_CALLS = {
    F.linear: ("linear", _linear_inspect, _add_positions),
    F.layer_norm: ("layernorm", layer_norm_inspect, _add_positions),
    torch.addmm: ("conv1d", _addmm_inspect, _add_positions),
    F.conv2d: ("conv2d", _conv2d_inspect, _conv2d_probe),
    F.embedding: ("embedding", _embedding_inspect, _add_positions),
}
