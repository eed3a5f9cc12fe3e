"""The value of per-example gradients with Linear-like layers kept in factored form.

:class:`LayerGrads` holds, for ``C`` checkpoints and ``B`` examples, each captured layer's
factors ``(a, g)`` (``dW_i = sum_t g_it a_it^T``) and every other parameter's raveled gradient;
two blocks meet in :meth:`LayerGrads.scores` without forming ``dW``
(``<grad_i, grad_j>_layer = sum_{t,s} (a_it . a_js) (g_it . g_js)``). The plan that computes
them lives in :mod:`dattri_fn.transforms.layer_grads`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import capture
from .tie_factors import TieFactors, tie_inner, tie_row_dots, tie_sq_norms


class LayerGrads(NamedTuple):
    """Per-example gradients of ``C`` checkpoints: Linear layers factored, the rest dense.

    Attributes:
        factors: ``{layer: (a, g)}`` with ``a`` ``[C, B, in']`` and ``g`` ``[C, B, out]``, or
            ``[C, B, T, in']`` / ``[C, B, T, out]`` for sequence layers; ``in' = in + 1`` when
            the bias is attributed (a column of ones), ``1`` for a bias alone.
        dense: ``[C, B, P_dense]``: every other attributed parameter, plus the materialised
            sequence layers (``P_dense`` may be 0).
        layout: ``(key, source)`` per attributed parameter, in params order, for
            :meth:`to_dense`: source ``("w", layer, has_bias)`` (``"wt"``: a transposed
            ``[in, out]`` weight, HF Conv1D), ``("b", layer)``, ``("d", start, stop)`` or
            ``("t", key, TieFactors)``: a tied key kept as its members' factors, whose
            ``[V, D]`` rows are never formed whole (:mod:`~dattri_fn.transforms.tie_factors`;
            only where the plan keeps them so). The factors ride in the layout, not in a field
            of their own, so the states that hold a ``LayerGrads`` keep their structure and hash.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    dense: Tensor
    layout: tuple

    @property
    def ties(self) -> dict[str, TieFactors]:
        """``{key: TieFactors}`` of the keys whose source is ``("t", key, TieFactors)``."""
        return {src[1]: src[2] for _, src in self.layout if src[0] == "t"}

    def _with_ties(self, fn) -> tuple:
        """The layout with ``fn`` applied to every tie's factors."""
        if not any(src[0] == "t" for _, src in self.layout):
            return self.layout
        return tuple((k, ("t", src[1], fn(src[2])) if src[0] == "t" else src)
                     for k, src in self.layout)

    @property
    def num_rows(self) -> int:
        return self.dense.shape[1]

    def _same_layout(self, other: LayerGrads) -> bool:
        return (_structure(self.layout) == _structure(other.layout)
                and self.factors.keys() == other.factors.keys() and all(
                    self.factors[n][0].ndim == other.factors[n][0].ndim for n in self.factors))

    def scores(self, other: LayerGrads) -> Tensor:
        """Return ``sum_c <grad_ci, other_cj>`` for every pair of rows.  # -> [B, n]"""
        if not self._same_layout(other):  # e.g. a dense batch of one against factored blocks
            return torch.bmm(self.to_dense(), other.to_dense().transpose(1, 2)).sum(0)
        # the first term is the sum so far (no add of it to a zero): the same values, one op
        # fewer per call; -0.0 + 0 would have been +0.0, which compares equal
        out = None
        # over one checkpoint the sum is its one term (exact): no [1, B, n] reduction pass
        total = (lambda t: t[0]) if self.dense.shape[0] == 1 else (lambda t: t.sum(0))
        if self.dense.shape[-1]:
            out = total(torch.bmm(self.dense, other.dense.transpose(1, 2)))
        for name, (a, g) in self.factors.items():
            a2, g2 = other.factors[name]
            if a.ndim == 3:
                term = total(torch.bmm(a, a2.transpose(1, 2)) * torch.bmm(g, g2.transpose(1, 2)))
            else:
                aa = torch.einsum("cbti,cnsi->cbnts", a, a2)
                term = (aa * torch.einsum("cbto,cnso->cbnts", g, g2)).sum((0, 3, 4))
            out = term if out is None else out + term
        for key, tie in self.ties.items():
            term = tie_inner(tie, other.ties[key])
            out = term if out is None else out + term
        if out is None:
            return self.dense.new_zeros(self.num_rows, other.num_rows)
        return out

    def row_dots(self, other: LayerGrads) -> Tensor:
        """Return ``sum_c <grad_ci, other_ci>`` row by row (same examples).  # -> [B]"""
        if not self._same_layout(other):
            return (self.to_dense() * other.to_dense()).sum((0, 2))
        out = (self.dense * other.dense).sum((0, 2))
        for name, (a, g) in self.factors.items():
            a2, g2 = other.factors[name]
            if a.ndim == 3:
                out = out + ((a * a2).sum(-1) * (g * g2).sum(-1)).sum(0)
            else:
                aa = torch.einsum("cbti,cbsi->cbts", a, a2)
                out = out + (aa * torch.einsum("cbto,cbso->cbts", g, g2)).sum((0, 2, 3))
        for key, tie in self.ties.items():
            out = out + tie_row_dots(tie, other.ties[key])
        return out

    def sq_norms(self) -> Tensor:
        """Return ``|grad_ci|^2`` per checkpoint and example.  # -> [C, B]"""
        # without dense columns the first term is the sum (0 + t = t for t >= 0 or NaN)
        out = (self.dense * self.dense).sum(-1) if self.dense.shape[-1] or not self.factors \
            else None
        for a, g in self.factors.values():
            if a.ndim == 3:
                term = (a * a).sum(-1) * (g * g).sum(-1)
            else:
                term = (torch.einsum("cbti,cbsi->cbts", a, a)
                        * torch.einsum("cbto,cbso->cbts", g, g)).sum((2, 3))
            out = term if out is None else out + term
        for tie in self.ties.values():
            out = out + tie_sq_norms(tie)
        return out

    def scale(self, w: Tensor) -> LayerGrads:
        """Return the gradients times ``w`` (``[C, B]`` or ``[C, 1]``), i.e. ``w_ci grad_ci``."""
        factors = {n: (a, g * (w[..., None] if g.ndim == 3 else w[..., None, None]))
                   for n, (a, g) in self.factors.items()}
        # an empty dense block [C, B, 0] stays as it is (no product to form; same dtype)
        d = self.dense
        dense = d if not d.shape[-1] and w.dtype == d.dtype and w.device == d.device and \
            w.shape[0] == d.shape[0] else d * w[..., None]
        return LayerGrads(factors, dense, self._with_ties(lambda t: t.scale(w)))

    def to_dense(self, dtype: torch.dtype | None = None, *, out: Tensor | None = None) -> Tensor:
        """Return the raveled gradients in params order, in ``dtype`` (default: theirs).  # -> [C, B, P]

        When every parameter already sits in the dense block (in params order) and no other
        dtype or ``out`` is asked for, that block itself is returned (no copy).
        A narrower ``dtype`` (e.g. bfloat16) receives each product rounded once, as written:
        no full-precision ``[C, B, P]`` copy is made. ``out``: a ``[C, B, P]`` tensor to write
        into (its dtype wins), e.g. one buffer reused over the batches of a stream.
        """
        sizes = [self._size(src) for _, src in self.layout]
        C, B = self.dense.shape[:2]
        if out is None and (dtype is None or dtype == self.dense.dtype) and self._is_dense():
            return self.dense  # every parameter already sits in the dense block, in order
        if out is not None:
            want = (C, B, sum(sizes))
            if not isinstance(out, Tensor) or tuple(out.shape) != want:
                got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"LayerGrads.to_dense(out=...): expected a Tensor of shape "
                                 f"{list(want)}, got {got}.")
            dtype = out.dtype
        if not self._plain():  # autograd or a torch.func transform: no out= writes
            dense = self.columns(0, sum(sizes)).to(dtype or self.dense.dtype)
            return dense if out is None else out.copy_(dense)
        if out is None:
            out = self.dense.new_empty((C, B, sum(sizes)), dtype=dtype)
        off = 0
        for (_, source), size in zip(self.layout, sizes, strict=True):
            view = out[..., off:off + size]
            a, g = self.factors[source[1]] if source[0] not in ("d", "t") else (None, None)
            if source[0] in ("w", "wt") and a.ndim == 3 and a.shape[:2] == g.shape[:2] == (C, B):
                # The outer product written in place: no per-layer block, no concatenation. Into
                # another dtype torch forms each product in a temporary of the factors' dtype
                # first, so that goes by blocks of rows of about 2**18 products (at least one).
                n_in = _weight_cols(a, source)
                step = B if view.dtype == g.dtype else max(1, _NARROW_ENTRIES // max(1, C * size))
                if source[0] == "w":
                    dst = view.view(C, B, g.shape[-1], n_in)  # the last dim split: a view
                    if step >= B:  # one product, no row slices (each index op costs ~3 us)
                        torch.mul(g.unsqueeze(-1), (a if n_in == a.shape[-1] else
                                                    a[..., :n_in]).unsqueeze(-2), out=dst)
                        off += size
                        continue
                    for r in range(0, B, step):
                        torch.mul(g[:, r:r + step, :, None], a[:, r:r + step, None, :n_in],
                                  out=dst[:, r:r + step])
                else:  # a transposed weight [in, out] (Conv1D)
                    dst = view.unflatten(-1, (n_in, g.shape[-1]))
                    for r in range(0, B, step):
                        torch.mul(a[:, r:r + step, :n_in, None], g[:, r:r + step, None, :],
                                  out=dst[:, r:r + step])
            elif source[0] == "b" and g.ndim == 3:  # a flat layer's bias gradient is g itself
                view.copy_(g)
            elif source[0] == "t":  # a tie's rows a few at a time, each rounded once into view
                source[2].write(view)
            else:
                view.copy_(self._block(source, 0, size))
            off += size
        return out

    def _is_dense(self) -> bool:
        """True when the dense block holds every parameter, in params order, and nothing else."""
        off = 0
        for _, src in self.layout:
            if src[0] != "d" or src[1] != off:
                return False
            off = src[2]
        return off == self.dense.shape[-1]

    def _plain(self) -> bool:
        """True outside autograd, forward AD and torch.func: plain, grad-free tensors only."""
        if torch._C._functorch.maybe_current_level() is not None:
            return False
        tensors = [self.dense, *(t for pair in self.factors.values() for t in pair),
                   *(t for tie in self.ties.values() for t in tie.tensors())]
        if any(t.requires_grad for t in tensors):
            return False
        # a tangent exists only inside forward_ad.dual_level(): outside, no unpack per tensor
        return forward_ad._current_level < 0 or all(
            forward_ad.unpack_dual(t).tangent is None for t in tensors)

    def columns(self, start: int, stop: int) -> Tensor:
        """Return columns ``[start, stop)`` of :meth:`to_dense`, forming only those.  # [C, B, n]

        A projector that streams ``R`` row block by row block meets the matching gradient
        columns here, so the ``[C, B, P]`` matrix never exists at once.

        Raises:
            ValueError: unless ``0 <= start < stop <= P``.
        """
        P = sum(self._size(src) for _, src in self.layout)
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= P):
            raise ValueError(f"LayerGrads.columns(start=..., stop=...): expected ints with "
                             f"0 <= start < stop <= P = {P}, got start={start!r}, stop={stop!r}.")
        parts, off = [], 0
        for _, source in self.layout:
            size = self._size(source)
            lo, hi = max(start, off), min(stop, off + size)
            if lo < hi:
                parts.append(self._block(source, lo - off, hi - off))
            off += size
            if off >= stop:
                break
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def rows(self, start: int, stop: int) -> LayerGrads:
        """Return examples ``[start, stop)`` (views).  # B = stop - start"""
        factors = {n: (a[:, start:stop], g[:, start:stop]) for n, (a, g) in self.factors.items()}
        cut = lambda t: t[:, start:stop]
        return LayerGrads(factors, self.dense[:, start:stop], self._with_ties(lambda t: t.map(cut, cut)))

    def select(self, c: int) -> LayerGrads:
        """Return checkpoint ``c`` alone (views, leading dim kept).  # C = 1"""
        C = self.dense.shape[0]
        if not (isinstance(c, int) and 0 <= c < C):
            raise ValueError(f"LayerGrads.select(c=...): expected an int in [0, {C}), "
                             f"got {c!r}.")
        factors = {n: (a[c:c + 1], g[c:c + 1]) for n, (a, g) in self.factors.items()}
        one = lambda t: t[c:c + 1]
        return LayerGrads(factors, self.dense[c:c + 1], self._with_ties(lambda t: t.map(one, one)))

    def _size(self, source) -> int:
        if source[0] == "d":
            return source[2] - source[1]
        if source[0] == "t":
            V, D = source[2].shape
            return V * D
        a, g = self.factors[source[1]]
        return g.shape[-1] if source[0] == "b" else g.shape[-1] * _weight_cols(a, source)

    def _block(self, source, lo: int, hi: int) -> Tensor:
        """Columns ``[lo, hi)`` of one parameter's raveled gradient.  # -> [C, B, hi - lo]"""
        if source[0] == "d":
            return self.dense[..., source[1] + lo:source[1] + hi]
        if source[0] == "t":  # only the rows of dW the range touches
            tie = source[2]
            D = tie.shape[1]
            r0, r1 = lo // D, -(-hi // D)
            return tie.rows(r0, r1)[..., lo - r0 * D:hi - r0 * D]
        a, g = self.factors[source[1]]
        if a.ndim == 3:
            a, g = a[:, :, None], g[:, :, None]
        if source[0] == "b":
            return g.sum(2)[..., lo:hi]
        n_in = _weight_cols(a, source)
        if source[0] == "wt":  # [in, out]: rows of dW are inputs
            n_out = g.shape[-1]
            r0, r1 = lo // n_out, -(-hi // n_out)
            w = torch.einsum("cbti,cbto->cbio", a[..., r0:min(r1, n_in)], g).flatten(2)
            return w[..., lo - r0 * n_out:hi - r0 * n_out]
        r0, r1 = lo // n_in, -(-hi // n_in)  # output rows of dW that the range touches
        w = torch.einsum("cbto,cbti->cboi", g[..., r0:r1], a[..., :n_in]).flatten(2)
        return w[..., lo - r0 * n_in:hi - r0 * n_in]

    @staticmethod
    def cat(blocks: Sequence[LayerGrads]) -> LayerGrads:
        """Concatenate blocks of rows (examples).  # -> [C, sum B, ...]

        Blocks of different layouts (a batch of one computed densely next to factored ones)
        meet in dense form, in params order.
        """
        first = blocks[0]
        if not all(first._same_layout(b) for b in blocks[1:]):
            return LayerGrads({}, torch.cat([b.to_dense() for b in blocks], 1),
                              _dense_layout(first))
        factors = {n: (_cat_padded([b.factors[n][0] for b in blocks]),
                       _cat_padded([b.factors[n][1] for b in blocks])) for n in first.factors}
        layout = tuple((k, ("t", src[1], TieFactors.cat([b.ties[src[1]] for b in blocks])
                            ) if src[0] == "t" else src) for k, src in first.layout)
        return LayerGrads(factors, torch.cat([b.dense for b in blocks], 1), layout)


def _structure(layout: tuple) -> tuple:
    """``layout`` with each tie's factors replaced by its shape (what two blocks must share)."""
    return tuple((k, ("t", src[1], src[2].shape) if src[0] == "t" else src) for k, src in layout)


def _dense_layout(lg: LayerGrads) -> tuple:
    """The layout of ``lg.to_dense()`` as a dense block: every key a column range, in order."""
    out, start = [], 0
    for key, source in lg.layout:
        size = lg._size(source)
        out.append((key, ("d", start, start + size)))
        start += size
    return tuple(out)


def _cat_padded(parts: list[Tensor]) -> Tensor:
    """Concatenate along examples; sequence factors of different T are zero-padded (zero rows
    of ``a`` and ``g`` add nothing to ``sum_t g_t a_t^T``)."""
    if parts[0].ndim == 4:
        T = max(p.shape[2] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0, 0, T - p.shape[2])) for p in parts]
    return torch.cat(parts, 1)


_NARROW_ENTRIES = 2**18  # products per block when to_dense writes another dtype


def _weight_cols(a: Tensor, source) -> int:
    return a.shape[-1] - source[2]



class _Lazy(NamedTuple):
    """A dense block formed only when :func:`_concat` writes it (``make() -> [C, B, width]``)."""

    make: Any
    width: int
    inputs: tuple


def _concat(parts: list, like: Tensor, lead: int) -> Tensor:
    """Return the parts side by side, written into ONE buffer: peak ``[C, B, P_dense]`` plus
    the widest part, not the parts and their concatenation together.  # -> [C, B, P_dense]"""
    if not parts:
        return like.new_zeros((*like.shape[:lead], 0))
    tensors = [t for p in parts for t in (p.inputs if isinstance(p, _Lazy) else (p,))]
    plain = (torch._C._functorch.maybe_current_level() is None
             and not any(t.requires_grad for t in tensors))
    if not plain:  # autograd or a transform: cat keeps the graph / batching intact
        return torch.cat([p.make() if isinstance(p, _Lazy) else p for p in parts], -1)
    widths = [p.width if isinstance(p, _Lazy) else p.shape[-1] for p in parts]
    out = like.new_empty((*like.shape[:lead], sum(widths)))
    off = 0
    for p, w in zip(parts, widths, strict=True):
        out[..., off:off + w] = p.make() if isinstance(p, _Lazy) else p
        off += w
    return out


def _embedding_rows(spec, idx: Tensor, g: Tensor, lead: int, shape) -> Tensor:
    """Per-example embedding gradients, raveled.  # idx [C, B, (T)], g [C, B, (T), D] -> [C, B, V D]"""
    C, B = idx.shape[:2]
    flat = capture.weight_grad(spec, idx.reshape(C * B, *idx.shape[2:]),
                               g.reshape(C * B, *g.shape[2:]), shape)
    return flat.reshape(C, B, -1)

