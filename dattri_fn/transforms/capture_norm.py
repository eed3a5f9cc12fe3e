"""The capture engine's LayerNorm kind and its broadcast embeddings (:mod:`.capture`).

LayerNorm (``F.layer_norm(x, shape, w, b, eps)``, ``nn.LayerNorm`` with an affine weight, with
or without a bias): ``y_t = w * xhat_t + b`` with ``xhat_t = (x_t - mean_t) / sqrt(var_t + eps)``
over the normalised dims, so at positions ``t`` of one example

    dW = sum_t g_t * xhat_t        db = sum_t g_t          (elementwise, g = dloss / dy)

``a`` is ``xhat`` (recomputed from the call's input with the call's ``eps``, not the affine
output), ``[B, T, D]`` with ``D`` the normalised dims' size.

RMSNorm, the same kind with no bias: ``F.rms_norm`` (``a = x / rms(x)``), or a norm module's
1-D scale read by one ``w * x`` with ``x`` batch-first (HF's ``LlamaRMSNorm``/``T5LayerNorm``
write ``weight * x_hat``): ``dW = sum_t g_t * x_t`` whatever ``x`` is, so ``a = x`` itself.

A broadcast embedding: GPT-2 reads ``wpe`` with position ids ``[1, T]`` shared by the batch
(BERT keeps them as a ``[1, T]`` buffer; a hand-written model passes ``arange(T)``), and the
``[1, T, d]`` output is added to the ``[B, T, d]`` token embeddings. The lookup itself holds no
example; only the add makes one copy per example. So a not-batch-first call is held back
(*pending*) until its output reaches an add, subtract or multiply whose other operand ``o``
is batch-first, and whose result is ``o``'s shape with the lookup's batch dim absent or 1
(the output is copied to every example, never aligned with the batch). There the output is
replaced by ``out + probe`` with the probe shaped as the result ``[B, ..., d]``: each example
gets its own copy and its own ``g``, and ``a`` = the indices broadcast to ``[B, T']``. Every
such use is one record (a wpe read twice is two, summed); any other use of the pending output
(a ``cat``, a view, an in-place op on it, a second pending operand) is a problem. An op that
returns the pending tensor itself (``.to(device)`` on its own device) is transparent.

Rows held this way remember the grad mode of their read: read under ``torch.no_grad()`` and
used outside it, they would get the use's probe (a gradient vmap(grad) does not give them), so
that use is a problem. Rows of width 1 (a ``[V, 1]`` table) broadcast over the use's width are
a problem too (``g`` would have the use's width).

The converse hazard is checked too: ids shared by the batch look batch-first when their first
dim happens to equal ``B`` (``[T]`` ids at ``T = B``; a relative-position bias's ``[T, T]`` ids
at ``T = B``), so the call is captured as per-example rows. Every per-example row read (an
Embedding's or a bare weight's) is therefore watched up to its first use: a binary or in-place
op with a tensor of more dims (the rows broadcast over the batch), or an op that puts new dims
before the rows' batch dim (``unsqueeze(0)``, ``[None]``, ``expand(k, ...)``), is a problem. An
op whose result keeps the rows' rank and a dim 0 of size ``B`` (``.contiguous()``, ``* scale``,
``.transpose(0, 1)`` of ``[T, T]``) passes the watch on to its result; a shape or dtype query is
no use; rows of one example (``B = 1``) cannot be mixed and are never refused. Other shape ops
on such rows (a reshape to another rank, then a broadcast) are refused when the plan is checked
at a batch whose ``B`` differs from those dims (the rows are held there); checked at ``B = T``,
only the comparison with vmap(grad) catches them, and then the whole checked plan goes dense
(exact, one warning), not only the table (tests/test_capture_rank_change.py). The watch cannot
follow them: at ``B = T`` no shape tells shared ``[T, T]`` rows from per-example ``[B, T]`` rows,
and a rank change that moves or drops the batch-sized dim (``flatten().view(T, T)``, a
``permute`` to sequence-first) is also what per-example rows of a sequence-first model do.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .capture_mode import _Capture

# the binary ops through which a shared lookup may reach the batch; the in-place ones only
# with the pending output as their second operand (never written into)
_BINARY = frozenset({Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add,
                     Tensor.__sub__, Tensor.__rsub__, Tensor.sub, torch.sub,
                     Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul})
_INPLACE = frozenset({Tensor.__iadd__, Tensor.add_, Tensor.__isub__, Tensor.sub_,
                      Tensor.__imul__, Tensor.mul_})


class Broadcast(NamedTuple):
    """An Embedding call whose indices are not batch-first: held back until its output is used."""

    idx: Tensor  # the indices, padding_idx masked to -1; shape = the output's minus d


class _Pending(NamedTuple):
    name: str
    out: Tensor  # held so that its id stays its own for the whole forward
    idx: Tensor
    grad: bool  # grad mode at the read


def layer_norm_inspect(mode: _Capture, name, args, kwargs):
    """``F.layer_norm``: ``(xhat [B, T, D], flat, T)`` or why the call cannot be captured."""
    from .capture_kinds import _arg

    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    if mode.roles.get(id(w)) != (name, "weight"):
        return "its bias is used without its weight"
    spec = mode.specs[name]
    if (spec.bias is not None and mode.roles.get(id(b)) != (name, "bias")) or \
            (spec.bias is None and b is not None):
        return "its weight is used without its bias (or with another bias)"
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    k = len(shape)
    if x.ndim <= k:
        return f"an unbatched input {list(x.shape)}"
    B = mode.rows_of(x)
    if isinstance(B, str):
        return B
    xhat = F.layer_norm(x, shape, None, None, eps)
    if x.ndim == k + 1:  # flat: [B, D]
        return xhat.reshape(B, math.prod(shape)), True, 1
    T = math.prod(x.shape[1:-k])
    return xhat.reshape(B, T, math.prod(shape)), False, T


def _positions(mode: _Capture, x: Tensor, k: int):
    """``(x [B, T, D], flat, T)`` of a norm's batch-first input or output over its last ``k``
    dims, or why not."""
    if x.ndim <= k:
        return f"an unbatched input {list(x.shape)}"
    B = mode.rows_of(x)
    if isinstance(B, str):
        return B
    D = math.prod(x.shape[x.ndim - k:])
    if x.ndim == k + 1:  # flat: [B, D]
        return x.reshape(B, D), True, 1
    T = math.prod(x.shape[1:-k])
    return x.reshape(B, T, D), False, T


def rms_norm_inspect(mode: _Capture, name, args, kwargs):
    """``F.rms_norm`` (torch's ``nn.RMSNorm``): ``a = x / rms(x)``, its own unscaled call."""
    from .capture_kinds import _arg

    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    w, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "eps")
    if mode.roles.get(id(w)) != (name, "weight"):
        return "its weight is used as an input"
    if mode.specs[name].bias is not None:
        return "its weight is used without its bias"
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if x.ndim <= len(shape):
        return f"an unbatched input {list(x.shape)}"
    return _positions(mode, F.rms_norm(x, shape, None, eps), len(shape))


def scale_inspect(mode: _Capture, name, args, kwargs, op: str = "__mul__"):
    """``w * x`` (``x * w``, ``torch.mul``) of a norm's 1-D scale ``w`` [D] with a batch-first
    ``x`` [B, ..., D]: the output is ``x``'s shape, so ``dw = sum_t g_t * x_t`` (``a = x``, as
    the module computed it: HF's RMSNorm casts ``x / rms(x)`` back to the input's dtype)."""
    if mode.specs[name].bias is not None:  # a LayerNorm's: g would reach its bias's sum too
        return f"its tensors are used by {op}"
    if len(args) != 2 or kwargs:
        return f"a {op} with more than two operands (or out=)"
    j = 0 if mode.roles.get(id(args[0])) == (name, "weight") else 1
    w, x = args[j], args[1 - j]
    if mode.roles.get(id(w)) != (name, "weight"):
        return f"its weight is no positional operand of {op}"
    if not isinstance(x, Tensor) or mode.roles.get(id(x)) is not None or w.ndim != 1 or \
            x.ndim < 2 or x.shape[-1] != w.shape[0]:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        return f"a multiply with {got}, not an elementwise scale of the last dim of an input"
    return _positions(mode, x, 1)


def _operands(args, kwargs):
    for i, x in enumerate(args):
        yield i, x
    for k, x in kwargs.items():
        yield k, x


def _tensors(x):
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        yield from (t for t in x if isinstance(t, Tensor))


def watched_call(mode: _Capture, func, args, kwargs):
    """Handle a call that reads a pending or watched output (module docstring).

    Returns the call's result, or ``mode`` itself when no such output is read (or only a
    watched one, whose check is done; or the call also reads a selected layer's tensors, after
    the pending output's problem is recorded): the call then goes the usual way."""
    from .capture_mode import _benign, _name

    if mode.watch and not _benign(func):  # a shape or dtype query is no use of the rows
        kept = None
        for _, x in _operands(args, kwargs):
            for t in _tensors(x):
                hit = mode.watch.pop(id(t), None)
                if hit is None:
                    continue
                kept = (t, hit)
                other = [o for _, y in _operands(args, kwargs) for o in _tensors(y) if o is not t]
                if func in _BINARY | _INPLACE and other and other[0].ndim > t.ndim and t.shape[0] != 1:
                    ids = (f"flat indices [{t.shape[0]}]" if hit[2] else
                           f"indices, batch-first by shape only, give rows {list(t.shape)} that")
                    mode.problems.setdefault(hit[0], (
                        f"its {ids} are broadcast as positions against {list(other[0].shape)} "
                        f"(B = {mode.batch}): not one row per example"))
        if kept is not None and not mode.pending and not mode._hits(args, kwargs):
            out = func(*args, **kwargs)
            t, hit = kept
            if not isinstance(out, Tensor) or hit[0] in mode.problems or t.shape[0] == 1:
                return out  # one example (B = 1) cannot be mixed with another
            if out is t or (out.ndim == t.ndim and out.shape[0] == t.shape[0]):
                # .contiguous(), * scale, .transpose(0, 1) of [T, T]: still rows with a batch-sized
                # dim 0, watched to their next use
                mode.watch[id(out)] = hit
            elif out.ndim > t.ndim and out.shape[-t.ndim:] == t.shape:
                # unsqueeze(0), [None], expand(k, ...): new dims before the rows' batch dim, the
                # form of rows shared by the batch (ids [T, T] at B == T), never of per-example ones
                mode.problems.setdefault(hit[0], (
                    f"its rows {list(t.shape)}, batch-first by shape only, are moved behind new "
                    f"dims ({list(out.shape)}) by {_name(func)} (B = {mode.batch}): positions "
                    f"shared by the batch, not one row per example"))
            return out
    if not mode.pending:
        return mode
    found = [(i, t) for i, x in _operands(args, kwargs) for t in _tensors(x)
             if id(t) in mode.pending]
    if not found or _benign(func):
        return mode if not found else func(*args, **kwargs)
    pend = mode.pending[id(found[0][1])]
    i = found[0][0]
    why = _broadcast_use(mode, func, args, kwargs, found)
    if mode._hits(args, kwargs):
        # a selected layer's own call (a Linear on the lookup): the usual dispatch records it or
        # names its real problem; bypassed, that layer would read "not called" (review R1 F6)
        from .capture_mode import _name

        mode.problems.setdefault(pend.name, f"its indices are not batch-first (B = {mode.batch}) "
                                            f"and its output {list(pend.out.shape)} "
                                            f"{why or f'reaches {_name(func)} with a selected layer'}")
        return mode
    if why is not None:
        out = func(*args, **kwargs)
        if len(found) == 1 and out is found[0][1]:  # .to(its own device): the same tensor
            return out
        mode.problems.setdefault(pend.name, f"its indices are not batch-first (B = {mode.batch}) "
                                            f"and its output {list(pend.out.shape)} {why}")
        return out
    R = args[1 - i].shape
    # the result's dims before the rows' width (a bare 1-D weight's rows have none)
    lead = R if pend.out.ndim == pend.idx.ndim else R[:-1]
    a = pend.idx.expand(lead).reshape(R[0], -1)
    from .capture_mode import _Record

    mode.records[pend.name].append(_Record(a[:, 0] if len(lead) == 1 else a, len(lead) == 1))
    p = mode._probe(pend.name, a.shape[1], pend.out.expand(R))
    if p is not None:
        p = pend.out + (p if p.ndim == 0 or p.shape == R else p.reshape(R))
        args = (*args[:i], p, *args[i + 1:])
    return func(*args, **kwargs)


def _broadcast_use(mode: _Capture, func, args, kwargs, found) -> str | None:
    """None when the pending output's use copies it to every example (module docstring),
    else what the use is."""
    from .capture_mode import _name

    if len(found) > 1:
        return f"is read twice by one {_name(func)} call"
    i, t = found[0]
    if torch.is_grad_enabled() and not mode.pending[id(t)].grad:
        return "is read under torch.no_grad() and used outside it"
    if func not in _BINARY and not (func in _INPLACE and i == 1):
        return f"reaches {_name(func)}, not an add, subtract or multiply with the batch"
    if not isinstance(i, int) or i > 1 or len(args) < 2 or "out" in kwargs:
        return f"reaches {_name(func)} in an unexpected argument"
    o = args[1 - i]
    B = mode.batch
    if not isinstance(o, Tensor) or B is None or o.ndim == 0 or o.shape[0] != B:
        got = list(o.shape) if isinstance(o, Tensor) else type(o).__name__
        return f"meets {got}, not a batch-first tensor"
    try:
        shape = torch.broadcast_shapes(t.shape, o.shape)
    except RuntimeError:
        return f"does not broadcast against {list(o.shape)}"
    if shape != o.shape or (t.ndim == o.ndim and t.shape[0] != 1):
        return f"meets {list(o.shape)} with a result that is not one copy per example"
    if t.ndim > mode.pending[id(t)].idx.ndim and t.shape[-1] != o.shape[-1]:
        # a 2-D weight's rows of width 1 broadcast over the width (review R7 F3): g would have
        # the use's width, not the row's
        return f"has rows of width {t.shape[-1]} broadcast over {list(o.shape)}'s width"
    return None


def hold(mode: _Capture, name: str, out: Tensor, idx: Tensor) -> Tensor:
    """Hold a broadcast call's output back until its use (:func:`watched_call`), with the grad
    mode of its read: rows read under ``torch.no_grad()`` and used outside it would get the
    use's probe, a gradient vmap(grad) does not give them (review R7 F2)."""
    mode.pending[id(out)] = _Pending(name, out, idx, torch.is_grad_enabled())
    return out
