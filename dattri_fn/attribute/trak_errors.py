"""TRAK's feature errors: a non-finite per-example gradient named as the call and data it came from.

:class:`NonFiniteGradient` is raised inside the feature engine (:mod:`.trak_features`) where a
gradient, a cast or a projection is not finite; :func:`named` turns it into the public
``trak.<call>(<data>=...)`` error; the ``_*cause`` helpers find the parameter to name, on the
error path only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._checks import _msg, all_finite, batch_size, batch_slice
from .._types import Params
from .method import stacked_per_sample_grad

_CAUSE_ENTRIES = 2**20  # gradient entries formed at a time when an error's cause is looked for


class NonFiniteGradient(ValueError):
    """A per-example gradient with NaN or inf, raised inside the feature engine: :func:`named`
    turns it into the error of the call and data argument it came from.

    ``param``: the first parameter (params key) whose gradient is not finite; None when every
    one is (the projected product overflowed). ``overflow``: the dtype that finite values
    overflowed (``param``'s gradient at the cast to it, or else the projected features); None
    for a gradient that is NaN or inf itself.
    """

    def __init__(self, param: str | None, overflow: torch.dtype | None = None):
        self.param, self.overflow = param, overflow
        super().__init__(f"a per-example gradient is not finite (parameter {param!r}"
                         + ("" if overflow is None else f", overflows {overflow}") + ")")


_WIDER = {torch.float16: "torch.bfloat16 (float32's range) or torch.float32",
          torch.bfloat16: "torch.float32 or torch.float64", torch.float32: "torch.float64"}


def _reason(err: NonFiniteGradient) -> tuple[str, str, str]:
    """``(expected, got, fix)`` of the error that ``err`` becomes."""
    if err.overflow is None:
        got = (f"NaN or inf in the per-example gradient of {err.param!r}" if err.param is not None
               else "NaN or inf in the projected features (every gradient finite: an overflow)")
        return ("examples whose per-example gradients are finite", got,
                "Check those examples and the model on them (e.g. a log or a division at 0).")
    # finite values beyond the dtype's range: the examples are fine, the dtype is too narrow
    dt = err.overflow
    wider = _WIDER.get(dt)
    fix = (f"Use a wider feature_dtype ({wider}) or scale those examples down." if wider
           else "Scale those examples down.")
    fits = f"fit in feature_dtype={dt} (|x| <= {torch.finfo(dt).max:g})"
    if err.param is not None:
        return (f"examples whose per-example gradients {fits}",
                f"a finite per-example gradient of {err.param!r} that overflows at the cast "
                "(inf in that dtype)", fix)
    return (f"examples whose projected features {fits}",
            "projected features that overflow it (every per-example gradient finite and within "
            "it)", fix)


@contextlib.contextmanager
def named(func: str, arg: str):
    """Raise a :class:`NonFiniteGradient` from the block as ``func(arg=...)``'s ValueError: the
    user gave the examples, not the projector's features (review R3 F5); finite values that
    overflow a narrow ``feature_dtype`` say so (review R3 F4)."""
    try:
        yield
    except NonFiniteGradient as err:
        raise ValueError(_msg(func, arg, *_reason(err))) from err


def _bad_param(lg) -> str | None:
    """The first params key of ``lg`` (LayerGrads) whose gradient has NaN or inf, from its
    factors or dense columns (a weight's ``g a^T`` is not finite where ``a`` or ``g`` is not)."""
    for key, src in lg.layout:
        if src[0] == "d":
            parts = (lg.dense[..., src[1]:src[2]],)
        elif src[0] == "t":  # a tie kept as its members' factors
            parts = tuple(src[2].tensors())
        else:
            a, g = lg.factors[src[1]]
            parts = (g,) if src[0] == "b" else (a, g)
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            return key
    return None


def _check_finite(lg) -> None:
    """Raise :class:`NonFiniteGradient` unless every factor and dense column of ``lg`` is finite
    (``n (in' + out)`` entries a layer scanned, not the ``n in' out`` rows)."""
    if not all(all_finite(t) for t in (lg.dense, *(x for f in lg.factors.values() for x in f),
                                        *(x for tie in lg.ties.values() for x in tie.tensors()))):
        raise NonFiniteGradient(_bad_param(lg))


def _bad_column(G: Tensor, params: Params) -> str | None:
    """The first key of ``params`` whose columns of the raveled rows ``G`` have NaN or inf."""
    off = 0
    for key, v in params.items():
        size = v[0].numel()
        if not bool(torch.isfinite(G[..., off:off + size]).all()):
            return key
        off += size
    return None


def _dense_cause(lg, fdt: torch.dtype) -> NonFiniteGradient:
    """Why rows densified from ``lg`` (LayerGrads) into ``fdt``, or projected there, are not
    finite: a NaN/inf gradient (in the params' dtype: a factor, or a product ``g a^T`` of finite
    factors), a finite one beyond ``fdt``'s range, or else the projected features overflowing
    ``fdt``. An error path: the columns are formed again, about 2**20 entries at a time (never
    the ``[C, b, P]`` rows a projected path avoids)."""
    key = _bad_param(lg)
    if key is not None:
        return NonFiniteGradient(key)
    C, b = lg.dense.shape[:2]
    step = max(1, _CAUSE_ENTRIES // max(1, C * b))
    for cast in (None,) if fdt == lg.dense.dtype else (None, fdt):
        off = 0
        for k, src in lg.layout:
            size = lg._size(src)
            for s in range(off, off + size, step):
                cols = lg.columns(s, min(s + step, off + size))  # [C, b, <= step]
                if not all_finite(cols if cast is None else cols.to(cast)):
                    return NonFiniteGradient(k, cast)
            off += size
    return NonFiniteGradient(None, fdt)


def _refusal_cause(output_fn, sub: Params, batch) -> NonFiniteGradient | None:
    """The first parameter whose autodiff gradient is NaN or inf on the first 3 examples of
    ``batch`` at the first checkpoint of ``sub`` (the rows the plan check refused with
    ``transforms.layer_grads.NonFiniteExamples``); None where those rows cannot be formed here
    or all are finite. An error path."""
    head = batch_slice(batch, 0, min(3, batch_size("features", "batch", batch)))
    first = {k: v[:1] for k, v in sub.items()}
    try:
        G = stacked_per_sample_grad(output_fn, first, head)
    except Exception:  # noqa: BLE001 - the check's own error is raised instead
        return None
    key = _bad_column(G, first)
    return None if key is None else NonFiniteGradient(key)
