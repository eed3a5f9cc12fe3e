"""The call kinds of the capture engine (:mod:`dattri_fn.transforms.capture`).

Each kind recognises one torch function that consumes a selected layer's weight, returns that
call's layer input in the linear form ``dW = sum_t g_t a_t^T`` (or why the call cannot be
factored), and adds the layer's probe to the call's output.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .capture_norm import Broadcast, layer_norm_inspect, rms_norm_inspect, scale_inspect
from .capture_specs import grouped

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
        return grouped(groups)
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


def _row_ids(index, V: int, device) -> Tensor | str:
    """The row ids ``W[index]`` reads (a slice, an int or an integer tensor on dim 0, then
    whole dims only), shaped as the result's lead dims, or what else ``index`` is."""
    if isinstance(index, tuple):
        if not index or any(not (i is Ellipsis or (isinstance(i, slice) and i == slice(None)))
                            for i in index[1:]):
            return f"an index {_show(index)} that selects more than rows"
        index = index[0]
    if isinstance(index, slice):
        return torch.arange(V, device=device)[index]
    if isinstance(index, int) and not isinstance(index, bool):
        if not -V <= index < V:
            return f"a row {index} out of range"
        return torch.tensor(index % V, device=device)
    # torch indexes by a bool or uint8 tensor as a mask (review R7 F5), not as row ids
    if isinstance(index, Tensor) and not index.is_floating_point() and \
            index.dtype not in (torch.bool, torch.uint8) and not index.is_complex():
        return torch.where(index < 0, index + V, index)
    return f"an index {_show(index)} that is not a slice, an int or integer rows"


def _show(index) -> str:
    return f"[{list(index.shape)} {index.dtype}]" if isinstance(index, Tensor) else repr(index)


def _bare_inspect(mode: _Capture, name, args, kwargs):
    """``W[index]`` of a bare weight (:func:`.capture_specs.layer_specs`' ``bare``): read like
    an Embedding's rows. Per-example ids (an integer tensor, batch-first) are recorded here;
    rows shared by the batch (``W[:T]``, ``W[t]``, ids not batch-first) are held until their
    use copies them to every example (:mod:`.capture_norm`)."""
    w, index = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "index")
    if mode.roles.get(id(w)) != (name, "weight") or len(args) != 2 or kwargs:
        return "its weight is used as an index"
    idx = _row_ids(index, w.shape[0], w.device)
    if isinstance(idx, str):
        return idx
    if isinstance(index, Tensor) or (isinstance(index, tuple) and isinstance(index[0], Tensor)):
        B = mode.rows_of(idx)
        if not isinstance(B, str):  # one row set per example: a lookup as an Embedding's
            if idx.ndim == 1:
                return idx, True, 1
            return idx.reshape(B, -1), False, math.prod(idx.shape[1:])
    if mode.batch is None:
        return f"rows shared by a batch of unknown size ({_show(index)})"
    return Broadcast(idx)


_CALLS = {
    F.linear: ("linear", _linear_inspect, _add_positions),
    F.layer_norm: ("layernorm", layer_norm_inspect, _add_positions),
    torch.addmm: ("conv1d", _addmm_inspect, _add_positions),
    F.conv2d: ("conv2d", _conv2d_inspect, _conv2d_probe),
    F.embedding: ("embedding", _embedding_inspect, _add_positions),
    Tensor.__getitem__: ("bare", _bare_inspect, _add_positions),
    F.rms_norm: ("layernorm", rms_norm_inspect, _add_positions),
    # an RMSNorm's scale (weight * x_hat); a multiply reading any other selected tensor is a
    # problem as before
    **{f: ("layernorm", partial(scale_inspect, op=f.__name__), _add_positions)
       for f in (Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul)},
}
