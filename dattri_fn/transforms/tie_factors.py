"""A tied weight's per-example gradients kept as its members' captured factors.

GPT-2's ``wte`` (``[V, D]``) is read by an Embedding and by the ``lm_head`` Linear. Example
``i``'s gradient of that one key is the sum of the members' gradients,

    dW_i = sum_{t} e_{id_it} g_it^T  (Embedding: ids, output gradient g [D])
         + sum_{t} g'_it a_it^T      (Linear: input a [D], output gradient g' [V]),

``V D`` numbers per example (38.6M at GPT-2's size) that need never exist at once: a
projection of the key reads the factors (``P[id_t]`` gathers, ``P^T a_t`` products) and
:meth:`TieFactors.rows` forms only the rows of ``dW`` a caller asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

TIE_KINDS = ("embedding", "linear")


class _TieFields(NamedTuple):
    shape: tuple[int, int]
    members: tuple[tuple[str, Tensor, Tensor], ...]


class TieFactors(_TieFields):
    """The factors of one tied key ``[V, D]`` for ``C`` checkpoints and ``B`` examples.

    Attributes:
        shape: ``(V, D)``, the key's shape (rows: the vocabulary).
        members: ``((kind, a, g), ...)`` in module order: ``("embedding", ids [C, B, T],
            g [C, B, T, D])`` (a negative id adds nothing, as in the capture engine) or
            ``("linear", a [C, B, T, D], g [C, B, T, V])``; positions folded into ``T``.

    Constructing one zeroes an Embedding member's ``g`` at its negative ids (review R6 F1):
    the engine drops those positions (``padding_idx``), where the model's output gradient
    may be NaN (``e / |e|`` of a zero padding row under a ``where`` mask) while the key's
    gradient is finite. Every consumer (the rows, ``P[id] g^T`` gathers, finiteness scans of
    :meth:`tensors`) then reads a finite factor, not ``NaN * 0``.
    """

    __slots__ = ()

    def __new__(cls, shape, members):
        return super().__new__(cls, shape, tuple(
            (kind, a, _kept(a, g) if kind == "embedding" else g) for kind, a, g in members))

    def tensors(self) -> list[Tensor]:
        return [t for _, a, g in self.members for t in (a, g)]

    def rows(self, r0: int, r1: int) -> Tensor:
        """Return rows ``[r0, r1)`` of every example's ``dW`` (raveled).  # -> [C, B, (r1 - r0) D]"""
        D = self.shape[1]
        out = None
        for kind, a, g in self.members:
            if kind == "embedding":
                C, B, T = a.shape
                n = r1 - r0
                # ids outside [r0, r1) (and negative ones) land in a dropped row n
                local = torch.where((a >= r0) & (a < r1), a - r0, n)
                part = g.new_zeros(C * B, n + 1, D).scatter_add_(
                    1, local.reshape(C * B, T, 1).expand(-1, -1, D), g.reshape(C * B, T, D))
                part = part[:, :n].reshape(C, B, n * D)
            else:
                part = torch.einsum("cbtv,cbtd->cbvd", g[..., r0:r1], a).flatten(2)
            out = part if out is None else out + part
        return out

    def map(self, fn_a, fn_g) -> TieFactors:
        """The factors with ``fn_a`` applied to every ``a`` (ids too) and ``fn_g`` to every ``g``."""
        return self._replace(members=tuple((k, fn_a(a), fn_g(g)) for k, a, g in self.members))

    def to(self, device=None, dtype: torch.dtype | None = None) -> TieFactors:
        """The factors on ``device`` and in ``dtype``; ids keep their integer dtype."""
        return self.map(lambda a: a.to(device) if not a.is_floating_point() else a.to(device, dtype),
                        lambda g: g.to(device, dtype))

    def write(self, out: Tensor) -> Tensor:
        """Write every example's raveled ``dW`` into ``out`` (``[C, B, V D]``, any dtype).

        The rows are formed about ``2**18`` entries at a time, each rounded once into ``out``:
        a narrower ``out`` (bfloat16) never meets a full-precision ``[C, B, V D]`` temporary,
        nor does one of the factors' dtype.  # -> out
        """
        V, D = self.shape
        C, B = out.shape[:2]
        step = max(1, _WRITE_ENTRIES // max(1, C * B * D))
        for r in range(0, V, step):
            r1 = min(V, r + step)
            out[..., r * D:r1 * D].copy_(self.rows(r, r1))
        return out

    def scale(self, w: Tensor) -> TieFactors:
        """``w_ci dW_ci`` (``w`` ``[C, B]`` or ``[C, 1]``): each member is linear in its ``g``."""
        return self.map(lambda a: a, lambda g: g * w[..., None, None])

    @staticmethod
    def cat(parts: Sequence[TieFactors]) -> TieFactors:
        """Concatenate along examples; positions are zero-padded (a zero ``g`` adds nothing)."""
        first = parts[0]
        members = []
        for m, (kind, _, _) in enumerate(first.members):
            a_s = [p.members[m][1] for p in parts]
            g_s = [p.members[m][2] for p in parts]
            Tm = max(g.shape[2] for g in g_s)
            members.append((kind, torch.cat([_pad(a, Tm, kind != "embedding") for a in a_s], 1),
                            torch.cat([_pad(g, Tm, True) for g in g_s], 1)))
        return first._replace(members=tuple(members))


_WRITE_ENTRIES = 2**18  # rows' entries formed at a time by TieFactors.write


def _kept(ids: Tensor, g: Tensor) -> Tensor:
    """``g`` zeroed where ``ids < 0`` (``torch.where``: a NaN there stays out, unlike ``* 0``).
    Plain tensors with no negative id keep ``g`` itself (no copy)."""
    drop = ids < 0
    if torch._C._functorch.maybe_current_level() is None and not bool(drop.any()):
        return g
    return torch.where(drop[..., None], 0, g)


def layout_to(layout: tuple, device=None, dtype: torch.dtype | None = None) -> tuple:
    """A ``LayerGrads`` layout with every tie source's factors (``("t", key, TieFactors)``) on
    ``device`` and in ``dtype`` (:meth:`TieFactors.to`), for code that moves or widens a
    ``LayerGrads``' factors and dense block by hand (review R6 F3)."""
    return tuple((k, ("t", src[1], src[2].to(device, dtype)) if src[0] == "t" else src)
                 for k, src in layout)


def _pad(x: Tensor, T: int, tail: bool) -> Tensor:
    """``x`` zero-padded to ``T`` positions (dim 2; ``tail``: one dim follows it)."""
    return torch.nn.functional.pad(x, (0, 0) * tail + (0, T - x.shape[2]))


def tie_inner(x: TieFactors, y: TieFactors) -> Tensor:
    """Return ``sum_c <dW_ci, dW'_cj>`` for every pair, from rows formed ``2**20`` entries of
    each side at a time (never both ``[C, B, V D]`` blocks whole).  # -> [B, n]"""
    V, D = x.shape
    C, B = x.members[0][2].shape[:2]
    n = y.members[0][2].shape[1]
    step = max(1, (1 << 20) // max(1, C * max(B, n) * D))
    out = None
    for r in range(0, V, step):
        r1 = min(V, r + step)
        part = torch.bmm(x.rows(r, r1), y.rows(r, r1).transpose(1, 2)).sum(0)
        out = part if out is None else out + part
    return out


def tie_row_dots(x: TieFactors, y: TieFactors) -> Tensor:
    """Return ``sum_c <dW_ci, dW'_ci>`` row by row (same examples).  # -> [B]"""
    V, D = x.shape
    C, B = x.members[0][2].shape[:2]
    step = max(1, (1 << 20) // max(1, C * B * D))
    out = None
    for r in range(0, V, step):
        r1 = min(V, r + step)
        part = (x.rows(r, r1) * y.rows(r, r1)).sum((0, 2))
        out = part if out is None else out + part
    return out


def tie_sq_norms(x: TieFactors) -> Tensor:
    """Return ``|dW_ci|^2`` per checkpoint and example.  # -> [C, B]"""
    V, D = x.shape
    C, B = x.members[0][2].shape[:2]
    step = max(1, (1 << 20) // max(1, C * B * D))
    out = None
    for r in range(0, V, step):
        R = x.rows(r, min(V, r + step))
        part = (R * R).sum(-1)
        out = part if out is None else out + part
    return out
