"""The plan check's comparisons: captured per-example gradients against autodiff reference rows
(:func:`~dattri_fn.transforms.layer_grads.check_plan`), each ``(error, scale, dtype)``."""

from __future__ import annotations

import math

import torch

from .._types import Params
from ..tree import ravel_batched
from .factored_grads import LayerGrads


def _gap(lg: LayerGrads, ref: Params, k: int) -> tuple[float, float, torch.dtype]:
    """``(max |captured - autodiff|, max |autodiff|, dtype)`` over the first ``k`` examples at
    the first checkpoint, on the raveled rows (one ``[k, P]`` block per side: at the check's
    3 rows this costs less than a parameter-by-parameter comparison, whose per-key calls
    dominate on small models). A NaN on either side gives a NaN difference."""
    C, B = lg.dense.shape[:2]
    part = lg if (C, B) == (1, k) else lg.select(0).rows(0, k)
    want = ravel_batched(ref)[:k]  # {key: [k, *shape]} -> [k, P]
    return (float((part.to_dense()[0] - want).abs().max()), float(want.abs().max()),
            want.dtype)


def _gap_sums(lg: LayerGrads, ref: Params, sums: Params, k: int,
              at: tuple[int, ...] = (0,)) -> tuple[float, float, torch.dtype]:
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
    values = block.abs().amax(1).tolist()
    err_r, err_s = max(values[:r]), values[r]
    scale_s, scale_r = max(values[r + 1:r + 1 + k]), max(values[r + 1 + k:])
    if not all(math.isfinite(v) for v in values[:r + 1]):
        # NaN, or an inf row error / sum error (review R4 F4: inf <= tol * inf passed, and the
        # worse part's pick, inf * scale > err * inf, took the finite one): no comparison holds
        return float("nan"), max(scale_r, scale_s), want.dtype
    worse = err_s * max(scale_r, 1e-30) > err_r * max(scale_s, 1e-30)
    return (err_s, scale_s, want.dtype) if worse else (err_r, scale_r, want.dtype)


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
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        if torch.finfo(low).eps > torch.finfo(dtype).eps:
            tol, source = max(tol, 10 * torch.finfo(low).eps), \
                f"autocast to {low}".replace("torch.", "")
    return tol, source


def _device_type(stacked) -> str:
    """The device type of the checked params (where autocast would compute the rows)."""
    return next(iter(stacked.values())).device.type if stacked else "cpu"

