"""The plan check's comparisons: captured per-example gradients against autodiff reference rows
(:func:`~dattri_fn.transforms.layer_grads.check_plan`), each ``(error, scale, dtype)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._types import Params
from ..tree import ravel_batched
from .factored_grads import LayerGrads


def _gap(lg: LayerGrads, ref: Params, k: int, *, keyed: bool = False):
    """``(max |captured - autodiff|, max |autodiff|, dtype)`` over the first ``k`` examples at
    the first checkpoint, on the raveled rows (one ``[k, P]`` block per side: at the check's
    3 rows this costs less than a parameter-by-parameter comparison, whose per-key calls
    dominate on small models). A NaN on either side gives a NaN difference. ``keyed``: one
    such triple per key of ``ref`` (:func:`_mismatch`), from one segmented maximum."""
    C, B = lg.dense.shape[:2]
    part = lg if (C, B) == (1, k) else lg.select(0).rows(0, k)
    want = ravel_batched(ref)[:k]  # {key: [k, *shape]} -> [k, P]
    if keyed:
        m = _key_maxima(torch.cat([part.to_dense()[0] - want, want]), ref).tolist()  # [K, 2k]
        return {key: (max(row[:k], key=_nan_first), max(row[k:]), ref[key].dtype)
                for key, row in zip(ref, m, strict=True)}
    return (float((part.to_dense()[0] - want).abs().max()), float(want.abs().max()),
            want.dtype)


def _gap_sums(lg: LayerGrads, ref: Params, sums: Params, k: int,
              at: tuple[int, ...] = (0,), *, keyed: bool = False):
    """The check's comparison from the reference rows of examples ``at`` and the pass's sum
    identity.

    With ``G_i`` the captured rows of the ``k`` examples, ``l_i`` the batched pass's
    per-example losses and ``L_i`` example ``i``'s loss as a batch of one (its own autodiff row):

        (r)  G_i == grad L_i  for i in at    (scale max_i |grad L_i|)
        (s)  sum_i G_i == grad sum_i l_i     (scale max_i |G_i|: rounding of the k terms)

    Returns the ``(error, scale, dtype)`` of the worse of the two (a NaN or inf in either: NaN).
    The plan check takes ``at = (0, k - 1)``: the first and the last example.

    What they catch, against :func:`_gap`'s ``G_i == grad L_i`` for every ``i``: write the
    batched gradients as ``grad l_i = G_i + E_i``, ``E_i`` the part no captured call carries
    (a use of a captured weight that the engine does not see), and let ``J_ji = dl_j/dz_i``
    at a captured layer's output row ``i``. Row ``i``'s probe gradient is ``sum_j J_ji``, so
    examples coupled in the backward (a batch mean or BatchNorm after a captured layer, a
    ``[T, B, d]`` layer with ``T = B`` whose row 0 is position 0 of every example) put other
    examples' terms into ``G_0``, and coupling in the forward (before the first captured
    layer), a batch-size switch, random draws or a batched ``loss_fn.per_example`` that
    disagrees with ``loss_fn`` on one example make ``l_i`` differ from ``L_i``: (r) fails
    for each unless both compared examples are untouched. Causal or shift-like mixing along
    the batch (a cumulative sum, differences of neighbours, an RNN fed the batch as time)
    leaves example 0 alone but always reaches the last one, which is why it is compared too;
    what is missed is a fault confined to the examples in between (with ``k = 3``, example 1
    alone), and random draws that happen to agree on both rows (dropout left on: p^2 where
    three rows gave p^3). A missing use gives ``sum_i E_i != 0`` in (s) unless the ``E_i``
    cancel over the examples not compared. Example 1's reference row is not taken: its
    ``functional_call`` forward is ~0.1 ms of the ~1.5 ms check on digits-lr.
    """
    C, B = lg.dense.shape[:2]
    part = lg if (C, B) == (1, k) else lg.select(0).rows(0, k)
    rows = part.to_dense()[0]  # [k, P]
    r = len(at)
    want = _flat(ref, r)  # [r, P]
    # the first and last rows as a strided view: a gather costs ~4x the slice
    got = rows[::k - 1] if k > 1 and tuple(at) == (0, k - 1) else rows[list(at)]
    # one [2r + k + 1, P] block and one read-back (on small models each op's dispatch is most
    # of the cost): the r row errors, the sum's error, then each row's and each reference's
    # maximum magnitude
    block = torch.cat([got - want, rows.sum(0, keepdim=True) - _flat(sums, 1), rows, want])
    if keyed:  # the same worse-of-two pick, key by key
        return {key: _worse(row, r, k, ref[key].dtype)
                for key, row in zip(ref, _key_maxima(block, ref).tolist(), strict=True)}
    return _worse(block.abs().amax(1).tolist(), r, k, want.dtype)


def _worse(values: list[float], r: int, k: int, dtype: torch.dtype):
    """:func:`_gap_sums`'s ``(error, scale, dtype)`` from the maxima of its block's rows."""
    err_r, err_s = max(values[:r]), values[r]
    scale_s, scale_r = max(values[r + 1:r + 1 + k]), max(values[r + 1 + k:])
    if not all(math.isfinite(v) for v in values[:r + 1]):
        # NaN, or an inf row error / sum error (review R4 F4: inf <= tol * inf passed, and the
        # worse part's pick, inf * scale > err * inf, took the finite one): no comparison holds
        return float("nan"), max(scale_r, scale_s), dtype
    worse = err_s * max(scale_r, 1e-30) > err_r * max(scale_s, 1e-30)
    return (err_s, scale_s, dtype) if worse else (err_r, scale_r, dtype)


def _nan_first(v: float) -> tuple[bool, float]:
    """A max key that picks a NaN over any number."""
    return math.isnan(v), v


def _overall(gaps: dict) -> tuple[float, float]:
    """The keyed gaps' ``(error, scale)`` over the whole model (NaN where any is not finite:
    the check's non-finite branch)."""
    errs = [e for e, _, _ in gaps.values()]
    scale = max(s for _, s, _ in gaps.values())
    return (max(errs) if all(math.isfinite(e) for e in errs) else float("nan")), scale


def _key_maxima(block: Tensor, ref: Params) -> Tensor:
    """``[K, R]``: the maximum of ``|block|`` ``[R, P]`` over each key's columns (``ref``'s
    raveling order). One amax per key: a scatter_reduce over the columns cost ~6x as much."""
    sizes = [v[0].numel() for v in ref.values()]
    return torch.stack([part.amax(1) for part in block.abs().split(sizes, 1)])


def _mismatch(gaps: dict, device_type: str) -> str | None:
    """Why the captured rows fail the check, or None: each key against its OWN scale (review
    RF2 MED-1: against the model's largest gradient a small layer's rows passed mixed), at the
    tolerance of the dtype that computed it (:func:`tolerance`). A key's scale counts as at
    least ``tol / 10`` of the model's largest gradient: a gradient that cancels to near zero
    (a key bias under softmax) keeps no relative accuracy, and the error allowed there,
    ``tol^2 / 10`` of the largest (10 eps for float32 and float64, 10 eps^2 for bf16 and fp16
    rows or autocast), is rounding. A mixing bf16 layer under 0.3% of the largest may pass."""
    top = max((s for _, s, _ in gaps.values()), default=0.0)
    worst, why, tols = 1.0, None, {}
    for key, (err, scale, dtype) in gaps.items():
        if dtype not in tols:
            tols[dtype] = tolerance(dtype, device_type)
        tol, source = tols[dtype]
        floor = tol / 10 * top
        ratio = err / (tol * max(scale, floor, 1e-30))
        if ratio > worst:
            worst, why = ratio, (
                f"they do not match vmap(grad) on its first examples (at {key}: max "
                f"difference {err:.3g}, gradient scale {scale:.3g}, tolerance {tol:.2g} of "
                f"the scale from {source}'s rounding)")
    return why


def _flat(grads: Params, r: int):
    """``{key: [r, *shape]}`` (or ``{key: shape}`` with ``r = 1``) raveled to ``[r, P]``."""
    parts = [v.reshape(r, -1) for v in grads.values()]
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def tolerance(dtype: torch.dtype, device_type: str) -> tuple[float, str]:
    """``(relative tolerance, what it comes from)`` of the check's gap: ``10 sqrt(eps)`` of the
    rows' dtype, or ``10 eps`` of autocast's dtype where autocast computes in a coarser one
    (review RU5 M4: bf16 rounding, 4e-3 of the scale, read as a mismatch). Not ``10 sqrt(eps)``
    of bf16 (0.88 of the scale): that would pass examples mixed in a batch."""
    tol, source = 10 * torch.finfo(dtype).eps ** 0.5, f"{dtype}".removeprefix("torch.")
    if torch.finfo(dtype).bits <= 16:
        # half rows (review RF2 MED-2): 10 sqrt(eps) is 0.88 (bf16) / 0.31 (fp16) of the
        # scale and passed mixed examples; the reference is computed in the same dtype
        tol = 10 * torch.finfo(dtype).eps
    low = _computing(dtype, device_type)
    if low != dtype:
        tol, source = max(tol, 10 * torch.finfo(low).eps), \
            f"autocast to {low}".replace("torch.", "")
    return tol, source


def _computing(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype that computes rows of ``dtype``: autocast's where it is enabled and coarser."""
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        if torch.finfo(low).eps > torch.finfo(dtype).eps:
            return low
    return dtype


def _device_type(stacked) -> str:
    """The device type of the checked params (where autocast would compute the rows)."""
    return next(iter(stacked.values())).device.type if stacked else "cpu"

