"""FactGraSS's feature stream: one stream's rows ``phi [b, d]`` of its batches, from one capture pass
per part (the flat path's factor pairs, or the plan's stage-1 rows), checking the capture plan on
its first part of 2 or more examples (:func:`~dattri_fn.attribute.factgrass.factgrass` uses it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import batch_leaves, batch_size, batch_slice, blame_data
from ..transforms import capture
from ..transforms.layer_grads import LayerPlan, _check, keep_tie_factors, layer_grads_stacked
from .factgrass_blocks import _blocks_of, _Sketches, _stage_two
from .factgrass_flat import (
    _all_flat,
    _flat_capturable,
    _flat_factored,
    _flat_io,
    _flat_io_checked,
    _plain_io,
)


class _Rows:
    """``rows(batch) -> phi [b, d]`` for one stream; ``rows.held()``: the plan it applies.
    Without ``checked`` the stream checks the plan on its first chunk of >= 2 examples (that
    chunk's gradients come from the checking pass) and holds the checked plan after it.

    ``rows.held_bytes`` is set by :meth:`pieces` to the bytes one example held in the pass (its
    batch and captured factors); None before any pass."""

    def __init__(self, plan: LayerPlan, params: dict, sk: _Sketches, func: str, arg: str,
                 chunk_size: int | None, sketch_bytes: int, checked: LayerPlan | None = None,
                 keep_ties=keep_tie_factors, validated: bool = False):
        self.params, self.sk, self.func, self.arg = params, sk, func, arg
        # the caller checks every batch it passes (batch_size: sizes, finite values) first
        # (pipeline.collect / stream_scores): its rows are read here, not checked again
        self.validated = validated
        self.chunk_size, self.sketch_bytes = chunk_size, sketch_bytes
        self.stage1 = sk.stage1
        self.cols = _blocks_of(sk)
        self.width = self.cols[-1][2]
        self._stacked = None  # the params as one checkpoint, formed where a part needs them
        # stage one reads a tie from its members' factors (no [b, V D] rows)
        self.plan = keep_ties(plan if checked is None else checked)
        self.held_bytes = None

    def held(self) -> LayerPlan:
        return self.plan

    @property
    def stacked(self) -> dict:
        """``{key: param[None]}``, detached: formed on the first part that takes the plan's own
        path (a stream whose parts all take the flat path never needs it: 2 ops a parameter)."""
        if self._stacked is None:
            self._stacked = {k: v.detach()[None] for k, v in self.params.items()}
        return self._stacked

    def grads(self, part):
        if not self.plan.checked and batch_size(self.func, self.arg, part) >= 2:
            self.plan, lg = _check(self.plan, self.stacked, part)
            return lg
        return layer_grads_stacked(self.plan, self.stacked, part)

    def flat_io(self, part) -> dict | None:
        """The part's flat factors from one capture pass, checking the plan on the way
        when this stream holds none yet; None: the plan's own path takes the part."""
        p = self.plan
        if not p.checked:
            if not _flat_capturable(p):
                return None
            io = _plain_io(p, self.params, part)
            if io is not None:  # a plain MLP: every layer flat, no check needed (_all_flat)
                self.plan = _all_flat(p)
                return io
            if batch_leaves(part)[0].shape[0] < 2:
                return None
            try:
                io, checked = _flat_io_checked(p, self.params, part)
            except capture.CaptureError:  # the full check decides (and warns)
                return None
            if checked is None:
                return None
            self.plan = checked
            return io
        if not _flat_factored(p):
            return None
        io = _plain_io(p, self.params, part)
        if io is not None:
            return io
        try:
            io = _flat_io(p, self.params, part)
        except capture.CaptureError:  # this batch takes another path: the plan's
            return None
        # a batch with positions (a [b, T, in]) is not one factor pair per example
        return io if all(a.ndim == 2 for a, _ in io.values()) else None

    def flat_sides(self, io: dict, caller: frozenset = frozenset()):
        """``(block, start, stop, P_in^T [a, 1], P_out^T g)`` of each layer in turn: its
        projected sides (stage 1's factors, as :func:`_flat_sketch` forms them). Each
        layer's ``a`` and ``g`` leave ``io`` as its sides are formed, so a caller that
        takes the sides one by one never holds both for all layers. ``caller``: the
        storages of the part's own tensors; a side that views one is copied."""
        p = self.plan
        for blk, s, e in self.cols:
            wk, bk = p.layers[blk]
            a, g = io.pop(blk)
            # the features are no differentiable output: an input that requires grad (a
            # first layer's a) would refuse the out= products below (review RD F2)
            if a.requires_grad or g.requires_grad:
                a, g = a.detach(), g.detach()
            if a.ndim != 2:  # the first position (a [b, in] is that already: no view op)
                a = a.reshape(a.shape[0], -1, a.shape[-1])[:, 0]
            if g.ndim != 2:
                g = g.reshape(g.shape[0], -1, g.shape[-1])[:, 0]
            if wk is None:  # a bias alone: its factor is the ones column
                a = a.new_ones((*a.shape[:-1], 1))
            pa, pg = self.stage1.project_sides(blk, a, g, ones=bk is not None and wk is not None)
            # a side kept whole is the layer input itself: for a first layer, the caller's
            # batch. A cache holding it would move with the caller's in-place changes (and
            # keep its whole storage alive)
            pa, pg = (t.clone() if t.untyped_storage().data_ptr() in caller else t
                      for t in (pa, pg))
            a = g = None
            yield blk, s, e, pa, pg
            pa = pg = None

    def write_flat(self, sides, out: Tensor, r0: int) -> None:
        """Stage 1 (``vec(g' a'^T)``) and stage 2 of each layer into ``out[r0:]``, a bounded
        number of rows at a time."""
        for blk, s, e, pa, pg in sides:
            n = pa.shape[0]
            # g' a'^T's dtype (as pg * pa): the block's bytes are counted in it (review RD F3)
            dt = pg.dtype if pg.dtype == pa.dtype else torch.promote_types(pg.dtype, pa.dtype)
            step = max(1, min(n, self.sketch_bytes // (self.stage1.dims[blk] * dt.itemsize)))
            # one [step, k_out, k_in] buffer for every row block, and every block's views cut
            # by one split each: the same products into the same rows, 2 tensor ops a full block
            # (each op ~5-15 us here; digits-mlp: 13 blocks of 64 rows, was 5 ops a block)
            g3, a3 = pg[:, :, None], pa[:, None, :]
            dst = out if r0 == 0 and n == out.shape[0] else out[r0:r0 + n]
            if e - s != out.shape[1]:  # (one block spanning every column: no narrow op)
                dst = dst.narrow(1, s, e - s)
            if step == n:  # one block (a test batch): no split, S is the product's own
                _stage_two(self.sk, blk, torch.mul(g3, a3).view(n, -1), dst)
                continue
            S = pa.new_empty(step, pg.shape[1], pa.shape[1], dtype=dt)
            Sw = S.view(step, -1)
            cut = zip(g3.split(step), a3.split(step), dst.split(step), strict=True)
            for gb, ab, db in cut:
                c = gb.shape[0]
                if c == step:
                    torch.mul(gb, ab, out=S)
                    piece = Sw
                else:
                    piece = torch.mul(gb, ab, out=S[:c]).view(c, -1)
                _stage_two(self.sk, blk, piece, db)
                piece = gb = ab = db = None
            g3 = a3 = dst = cut = None
            S = Sw = None

    def pieces(self, box: list, validated: bool | None = None):
        """The batch in ``box``, which is emptied (once a part's factors are captured the
        batch is not held here: the caller can let it go), as ``(start, rows, b, like,
        sides, S)`` per part of ``chunk_size`` rows (``like``: an empty tensor of the rows'
        dtype and device): ``sides`` (:meth:`flat_sides`, taken one layer at a time) where
        the part took the flat path, else its stage-1 rows ``S [rows, w]``.
        ``self.held_bytes`` is set to the bytes one example held in the pass (its batch and
        captured factors). ``validated``: the caller checked the batch (``batch_size``)
        already (None: as the stream was built, ``self.validated``)."""
        func, arg = self.func, self.arg
        batch = box.pop()
        b = (batch_leaves(batch)[0].shape[0]
             if (self.validated if validated is None else validated)
             else batch_size(func, arg, batch))
        in_bytes = sum(t.nbytes for t in batch_leaves(batch))
        step = b if self.chunk_size is None else self.chunk_size
        # the storages of the caller's tensors (a part is a view of them)
        caller = frozenset(t.untyped_storage().data_ptr() for t in batch_leaves(batch)
                           if t.numel())
        for s in range(0, b, step):
            part = batch if step >= b else batch_slice(batch, s, s + step)
            c = min(step, b - s)
            with blame_data(func, arg, part):  # where the model runs on the examples
                io = self.flat_io(part)
                S = self.stage1.layer_grads(self.grads(part))[0] if io is None else None
            if s == 0:
                took = (sum(a.nbytes + g.nbytes for a, g in io.values()) if io is not None
                        else S.nbytes)
                self.held_bytes = -(-(in_bytes * c // max(b, 1) + took) // c)
            part = None
            if step >= b:
                batch = None
            like = (S if io is None else next(iter(io.values()))[1]).new_empty(0)
            yield s, c, b, like, None if io is None else self.flat_sides(io, caller), S
            io = S = None

    def write(self, sides, S: Tensor | None, out: Tensor) -> None:
        """One part's rows ``phi`` into ``out`` ``[c, d]``: from its sides, or its S."""
        if sides is not None:
            self.write_flat(sides, out, 0)
            return
        start = 0
        for (blk, w), (_, c0, c1) in zip(self.stage1.dims.items(), self.cols, strict=True):
            _stage_two(self.sk, blk, S[:, start:start + w], out[:, c0:c1])
            start += w

    def of(self, box: list, into: Tensor | None = None) -> Tensor:  # [b, d]
        """``rows`` of the batch in ``box`` (emptied, see :meth:`pieces`). ``into``: the
        ``[b, d]`` rows are written into its first ``b``."""
        out = None
        for s, c, b, like, sides, S in self.pieces(box):
            # every layer's sides before the rows are allocated: the raw factors go first
            sides = None if sides is None else list(sides)
            if out is None:
                out = like.new_empty(b, self.width) if into is None else into[:b]
            self.write(sides, S, out[s:s + c])
            sides = S = None
        return out

    def __call__(self, batch) -> Tensor:  # [b, d]
        return self.of([batch])
