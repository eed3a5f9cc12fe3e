"""K-FAC/EK-FAC's factor passes: which layers leave the Kronecker layers (the capture engine's
refusal, :mod:`.kfac_check`'s decision, a layer whose output never reaches the loss) and the
sharded ``reduce`` of the passes' sums (see :mod:`dattri_fn.operators.kfac` for the method and
:mod:`.kfac_stats` for the passes)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import _msg, batch_size, regroup
from ..transforms import capture
from .kfac_layers import _keys


def _reduced(func: str, reduce, sums: dict[str, Tensor], n: int) -> tuple[dict[str, Tensor], int]:
    """``reduce(sums, n)``: this process's sums and count in, every process's out (checked)."""
    if reduce is None:
        return sums, n
    out = reduce(dict(sums), n)
    ok = (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict)
          and set(out[0]) == set(sums) and isinstance(out[1], int) and out[1] >= n)
    if not ok:
        raise TypeError(_msg(func, "reduce", "a callable (sums, count) -> (sums with the same "
                             "keys, total count >= count)", f"{type(out).__name__} {out!r}"[:200]))
    return out


def _check_reduce(func: str, reduce) -> None:
    if reduce is not None and not callable(reduce):
        raise TypeError(_msg(func, "reduce", "None or a callable (sums, count) -> (sums, count)",
                             type(reduce).__name__))


def _check_dtype(func: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(_msg(func, "dtype", "None or a floating torch.dtype (torch.bfloat16, ...)",
                             repr(dtype)))


# Entries of captured (a, g) that EK-FAC's K-FAC pass may hold for its Lambda pass (16 MiB in
# float32): below it the second forward and backward over the data are skipped.


def _fill_unreached(func: str, tapped, names, A: dict[str, Tensor], G: dict[str, Tensor]
                    ) -> None:
    """Give each layer whose output never reached the loss (an unused output, a layer run under
    ``torch.no_grad``: no ``g`` arrived, so ``g = 0`` for every example) its zero ``G``: its
    Fisher block is zero and its inverse the damping's alone. A tied group's ``A`` takes its
    embedding's gradients, so a group with a silent member is refused by name."""
    for n in names:
        if n in G:
            continue
        if n not in A:
            raise ValueError(_msg(func, "params", "tied layers whose uses all reach the loss "
                                  "(their pooled statistics take both uses' gradients)",
                                  f"no output gradient for the tied group {n!r} "
                                  f"{list(tapped.tied[[t[0] for t in tapped.tied].index(n)])}",
                                  "Leave its weight out of params."))
        out = tapped.specs[n].out_features
        G[n] = A[n].new_zeros(out, out)


_OTHERS = (None, "diagonal", "error")


def _without(func, names, pnames, rest, bad: dict[str, str], fisher, others):
    """``(names, rest)`` with the layers ``bad`` (layer -> why: :func:`.kfac_check.mismatched`,
    or the capture engine's refusal) moved from the Kronecker layers to the params outside
    them (the diagonal block), or an error naming them where that block cannot take them."""
    _refuse(func, bad, fisher, others)
    keys = {k: why for n, why in bad.items() for k in _keys(n) if k in pnames}
    rest = {k: {**rest, **keys}[k] for k in pnames if k in rest or k in keys}
    return [n for n in names if n not in bad], rest


def _refuse(func, bad: dict[str, str], fisher, others) -> None:
    """The error of :func:`_without` where the diagonal block cannot take the layers ``bad``."""
    listed = "; ".join(f"{n!r}: {why}" for n, why in bad.items())
    if others == "error":
        raise ValueError(_msg(func, "others", "layers whose captured per-example gradients "
                              "are the examples' own (others='error' refuses any other "
                              "block)", listed, "Pass others=None or 'diagonal' (their exact "
                              "Fisher diagonal) or leave these layers' params out."))
    if fisher == "expected":
        raise ValueError(_msg(func, "fisher", "'empirical' or 'true' where a layer's captured "
                              "per-example gradients are not the examples' own (its params "
                              "then take the diagonal block, from per-example gradients of "
                              "targets)", f"'expected' with {listed}",
                              "Use fisher='true' or leave these layers' params out."))


def _uncaptured(names, tapped, err: capture.CaptureError) -> dict[str, str]:
    """``{layer: why}`` of the Kronecker layers the capture engine refused on the data (a
    sequence-first input with ``S != B``...; a tied group where it refused a member, named as
    the group, whose weight then moves as a whole), or ``err`` re-raised where it names none of
    them."""
    group_of = {m: group[0] for group in getattr(tapped, "tied", ()) for m in group}
    whys: dict[str, list[str]] = {}
    for n, why in err.problems.items():
        if group_of.get(n, n) in names:
            whys.setdefault(group_of.get(n, n), []).append(
                why if n not in group_of else f"its use {n!r}: {why}")
    if not whys:
        raise err
    return {n: f"{'tied group' if n in group_of else 'layer'} {n!r}: the capture engine cannot "
               f"take it on this data ({'; '.join(w)})" for n, w in whys.items()}


def _count(func, batches, batch_rows) -> int:
    """The examples of this process's data (a process whose every Kronecker layer was dropped
    still sends its count to the reduce)."""
    return sum(batch_size(func, "data", b) for b in regroup(batches, batch_rows, func))


def _zero_factor(tapped, layer: str, pnames, state, which: int) -> Tensor:
    """A zero ``A`` (``which=0``, ``[in(+1), in(+1)]``) or ``G`` (``1``, ``[out, out]``) of
    ``layer``, for the reduce of a process that dropped it: shaped from its weight."""
    spec = tapped.specs[layer]
    w = state[spec.weight]
    if spec.kind == "conv1d":
        size = (w.shape[0], w.shape[1])
    elif spec.kind == "embedding":  # a tied group, in the Linear layout [V, d]
        size = (w.shape[1], w.shape[0])
    else:  # linear, conv2d: [out, in, (kh, kw)]
        size = (w[0].numel(), w.shape[0])
    n = size[which] + (which == 0 and _keys(layer)[1] in pnames)
    return w.new_zeros(n, n)
