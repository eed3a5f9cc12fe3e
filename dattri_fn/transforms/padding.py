"""Padding positions of a batch, for the per-token statistics of K-FAC, EK-FAC and LoGra.

A batch marks padding the Hugging Face way: a Mapping whose ``"attention_mask"`` is a ``[B, T]``
tensor, zero at pad positions. (Labels ``-100`` only drop positions from the loss: their ``g``
is zero, but the layer inputs ``a`` there are the model's activations of pad tokens.) A layer
input ``a`` ``[B, T, d]`` of such a batch enters an input second moment only at its real
positions, each example normalised by its own count ``T_n`` of real positions:

    A_n = (1/T_n) sum_{t: mask_nt != 0} a_nt a_nt^T        (an example with T_n = 0 adds 0)

which is what the same example gives unpadded (``T_n = T``), so the statistics do not depend on
right padding or on per-batch (dynamic) padding. A layer whose positions are not the mask's (a
pooled ``[B, d]`` head has none: nothing to mask) is taken unmasked after one warning naming it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["Positions", "padding_mask", "real_gram"]


def padding_mask(batch) -> Tensor | None:
    """Return the real positions ``[B, T]`` (bool) of a batch that has padding, else None.

    None for a batch without a 2-D ``"attention_mask"`` (a tuple or tensor batch cannot say
    which positions are padding) or one whose mask has no zero: such batches take the unmasked
    statistics unchanged.
    """
    if type(batch) is tuple or not isinstance(batch, Mapping):  # (tuple: no abc check)
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return None
    real = mask != 0
    return None if bool(real.all()) else real


def real_gram(a: Tensor, real: Tensor, bias: bool = False) -> Tensor:
    """Return ``sum_n (1/T_n) sum_{t real} a_nt a_nt^T`` (``a`` augmented to ``[a, 1]`` with
    ``bias``).  # a [B, T, d], real [B, T] -> [d(+1), d(+1)]

    Only the real rows are gathered (pad activations may be anything, non-finite included) and
    scaled by ``sqrt(1/T_n)`` so that the product is one symmetric Gram matrix.
    """
    counts = real.sum(1, keepdim=True).clamp_min(1).to(a.dtype)
    w = counts.reciprocal().sqrt().expand(real.shape)[real]  # [R]
    rows = a[real]  # [R, d], a copy
    if bias:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
    rows.mul_(w[:, None])
    return rows.T @ rows


class Positions:
    """The real positions of the batch a statistics pass is in, as each layer reads them.

    ``start(batch)`` at every batch; ``take(layer, a)`` for each ``a`` ``[b, ..., d]`` a layer
    gets from it, in order (a batch taken ``chunk_size`` rows at a time: its rows in chunks),
    returns the ``[b, T]`` mask of those rows, or None where nothing is masked: a batch without
    padding, a layer input with one position per example (``[b, d]``, ``[b, 1, d]``), or
    positions that do not align with the mask's ``T`` (warned once per layer, naming it; the
    layer's statistic then includes the pad positions). ``parts``: the widths of position
    blocks concatenated along dim 1 that each repeat the mask (a tied weight's two uses).
    """

    def __init__(self, func: str):
        self.func, self.real = func, None
        self.offsets: dict[str, int] = {}
        self.warned: set[str] = set()

    def start(self, batch) -> None:
        self.real = padding_mask(batch)
        self.offsets.clear()

    def take(self, layer: str, a: Tensor, parts: tuple[int, ...] | None = None) -> Tensor | None:
        if self.real is None:
            return None
        b = a.shape[0]
        at = self.offsets.get(layer, 0)
        self.offsets[layer] = at + b
        width = math.prod(a.shape[1:-1])
        real = self.real[at:at + b]
        T = real.shape[1]
        if width == 1 and T != 1:  # one position per example (a pooled head): nothing to mask
            return None
        if real.shape[0] == b and parts is not None and all(p == T for p in parts) \
                and sum(parts) == width:
            return real.repeat(1, len(parts))
        if real.shape[0] == b and width == T and parts is None:
            return real
        if layer not in self.warned:
            self.warned.add(layer)
            warnings.warn(f"{self.func}: layer {layer!r} reads {width} positions per example "
                          f"where the batch's attention_mask has {T}: its input statistic "
                          "includes the padding positions (it depends on how much padding the "
                          "batch has).", stacklevel=2)
        return None
