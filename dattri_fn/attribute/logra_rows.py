"""LoGra's feature rows: the raw and projected factors of a capture pass, their outer products, and
the row blocks a pass adds to the train cache (:func:`~dattri_fn.attribute.logra.logra` uses them).

A layer's feature is ``DW'_i = sum_t (P_out^T g_it)(P_in^T a_it)^T`` (``[k_out, k_in]``), its rows
``vec(DW'_i)`` side by side over the layers (``[b, d]``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .._checks import batch_leaves, batch_slice
from ..model import FunctionalModel
from ..operators.kfac import _tokens
from ..transforms.layers import batched_io
from ..transforms.mlp_io import mlp_chain, mlp_io


def _sliceable(module) -> bool:
    """Whether a batch's per-example rows are those of its slices: no BatchNorm or Dropout in
    training mode (batch statistics, one random stream per call) anywhere in ``module``."""
    return not any(m.training and isinstance(m, (_BatchNorm, _DropoutNd)) for m in module.modules())


def _flat_row_bytes(model: FunctionalModel, specs: dict, batch) -> int | None:
    """What one example of a plain MLP (``mlp_chain``: every layer at one position) holds in a
    pass, exactly as the pass will measure it (its batch row, each layer's ``a`` and ``g``);
    None for any other model (nothing is known before the first pass)."""
    leaves = batch_leaves(batch)
    if mlp_chain(model.module) is None or any(t.ndim > 2 for t in leaves):
        return None
    w = [model.params.get(s.weight, model.fixed.get(s.weight)) for s in specs.values()]
    # (per row by the trailing shape: an empty batch is named by merged_passes' check)
    return (sum(t.element_size() * t.shape[1:].numel() for t in leaves if t.ndim)
            + sum(x.shape[0] + x.shape[1] for x in w) * w[0].element_size())


def _outer_rows(factors: dict, eigvecs: dict | None = None) -> Tensor:
    """``vec(g'_i a'_i^T)`` of every row, layers side by side, from ``{layer: (a' [b, k_in],
    g' [b, k_out])}``: the same one multiply per entry as the features of a ``T = 1`` pass; with
    ``eigvecs`` ``{layer: (Q_A, Q_G)}`` the eigenbasis rows ``vec((Q_G^T g'_i)(Q_A^T a'_i)^T)``
    (each layer's factors rotated just before its block: one layer's at a time), a transposed
    ``[d, b]`` tensor's view.  # [b, d]"""
    first = next(iter(factors.values()))[0]
    b, d = first.shape[0], sum(a.shape[1] * g.shape[1] for a, g in factors.values())
    if eigvecs is not None:
        # the rows written transposed, [d, b] (returned as its [b, d] view): each product's
        # innermost run is b long instead of k_in (same products, ~0.7x the multiply's time
        # on digits-mlp); a GEMM reads the transposed view as it reads the rows
        outT, start = first.new_empty(d, b), 0
        for ln, (a, g) in factors.items():
            # rotated as (Q^T a'^T): [k, b] made contiguous by the GEMM itself, so the multiply
            # reads unit-stride rows (~0.5x its time against strided (a' Q)^T views, digits-mlp)
            a, g = eigvecs[ln][0].mT.mm(a.mT), eigvecs[ln][1].mT.mm(g.mT)
            ko, ki = g.shape[0], a.shape[0]
            torch.mul(g[:, None, :], a[None, :, :], out=outT[start:start + ko * ki].view(ko, ki, b))
            start += ko * ki
        return outT.T
    out, start = first.new_empty(b, d), 0
    for a, g in factors.values():
        ko, ki = g.shape[1], a.shape[1]
        torch.mul(g[:, :, None], a[:, None, :], out=out[:, start:start + ko * ki].view(b, ko, ki))
        start += ko * ki
    return out


class _Gather:
    """Row blocks taken one after another into one ``[total, ...]`` tensor: written into it in
    place when ``total`` is known (no concatenated copy of the whole at the end), else joined at
    the end; a first block of all ``total`` rows is kept as it is, unless it is ``borrowed``."""

    def __init__(self, total: int | None):
        self.total, self.parts, self.buf, self.sizes = total, [], None, []

    def add(self, rows: Tensor, *, borrowed: bool = False) -> None:
        n, b = sum(self.sizes), rows.shape[0]
        if self.total is None or (n == 0 and b == self.total):
            # borrowed rows view a tensor of the caller's (its training inputs): a state holding
            # them would move with the caller's in-place changes and save the caller's whole storage
            self.parts.append(rows.clone() if borrowed else rows)
        else:
            if self.buf is None:
                self.buf = rows.new_empty(self.total, *rows.shape[1:])
            self.buf[n:n + b].copy_(rows)
        self.sizes.append(b)

    def value(self) -> Tensor:
        if self.buf is not None:
            return self.buf[:sum(self.sizes)]
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)


def _raw(tapped_for, specs: dict, model: FunctionalModel, unpack, chunk_size: int | None, state: dict,
         layers: tuple[str, ...], batch):
    """``{layer: (a, g)}`` (no bias column): ``([B, in], [B, out])`` for a one-position layer
    (mlp_io's, or the engine's on ``[B, in]`` inputs), else ``([B, T, in], [B, T, out])``; chunk
    by chunk: a plain softmax cross-entropy MLP's by :func:`~dattri_fn.transforms.mlp_io.mlp_io`
    (the same values, without the engine's graph), any other model's by the capture engine."""
    like = state[specs[layers[0]].weight]
    b = batch_leaves(batch)[0].shape[0]  # the caller checked the batch (batch_size)
    step = b if chunk_size is None else chunk_size
    parts = []
    for s in range(0, b, step):
        part = batch if step >= b else batch_slice(batch, s, s + step)
        args, kwargs, target = unpack(part)
        io = mlp_io(model.module, model.loss_fn, state, args, kwargs, target, layers)
        # outside torch.func transforms each probe takes its call's output shape: no
        # shapes, so no extra no-grad forward per chunk
        parts.append(io if io is not None else batched_io(
            tapped_for(layers), model.loss_fn, state, args, kwargs, target, None, like))
    out = {}
    for n in layers:
        a = torch.cat([p[n][0] for p in parts]) if len(parts) > 1 else parts[0][n][0]
        g = torch.cat([p[n][1] for p in parts]) if len(parts) > 1 else parts[0][n][1]
        if a.ndim == 2 and g.ndim == 2:
            # one position per example ([B, in]: mlp_io's, or the engine's on [B, in] inputs):
            # kept 2-d, T = 1 by shape (no [B, 1, in] views to take apart again downstream)
            out[n] = (a.detach() if a.requires_grad else a, g.detach() if g.requires_grad else g)
        else:
            out[n] = _tokens(a.detach(), g.detach(), False)
    return out


def _projected(io: dict, projections: dict, specs: dict, model: FunctionalModel,
               transposed: bool = False) -> dict:
    """``{layer: (a' [B, T, k_in], g' [B, T, k_out])}``: ``[a, 1] P_in`` and ``g P_out`` (a layer
    given 2-d, ``[B, in]``, one position per example, stays 2-d: ``[B, k_in]``); ``transposed``:
    one-position factors laid out ``[k, B]`` (strides ``(1, B)``: prepare's, cached in the state)."""
    out = {}
    params = model.params
    # (an out= product is not autocast: kept plain)
    transposed = transposed and not torch._C._is_any_autocast_enabled()
    for n, (a, g) in io.items():
        Pa, Pg = projections[n]
        flat = a.ndim == 2
        if not flat:
            B, T = a.shape[:2]
            a, g = a.reshape(B * T, -1), g.reshape(B * T, -1)
        # transposed (prepare's passes): a one-position product written into a [k, B] buffer's
        # transposed view (the GEMM runs as P^T a^T: ~0.6-0.8x the [B, k] one's time at k = 8,
        # digits-mlp), for the grams and the cached factors' rotations (Q^T a'^T); feature rows
        # (_features: ~15% slower on such strided factors) keep the row form
        one = transposed and (flat or T == 1)
        if specs[n].bias not in params:
            a = a if Pa is None else torch.mm(a, Pa, out=_transposed(a, Pa) if one else None)
        elif Pa is None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        else:  # [a, 1] P_in = a P_in[:-1] + P_in[-1]: no [B T, in + 1] copy
            a = torch.addmm(Pa[-1], a, Pa[:-1], out=_transposed(a, Pa) if one else None)
        g = g if Pg is None else torch.mm(g, Pg, out=_transposed(g, Pg) if one else None)
        out[n] = (a, g) if flat else (a.reshape(B, T, -1), g.reshape(B, T, -1))
    return out


def _transposed(x: Tensor, P: Tensor) -> Tensor:
    """An empty ``[B, k]`` for ``x P`` (``x [B, in]``, ``P [in(+1), k]``), laid out ``[k, B]``."""
    return x.new_empty(P.shape[1], x.shape[0]).mT


def _features(io: dict) -> Tensor:  # [B, d]
    B = next(iter(io.values()))[0].shape[0]
    d = sum(a.shape[-1] * g.shape[-1] for a, g in io.values())
    out, start = next(iter(io.values()))[0].new_empty(B, d), 0
    for a, g in io.values():
        ko, ki = g.shape[-1], a.shape[-1]
        block = out[:, start:start + ko * ki].view(B, ko, ki)
        if a.ndim == 2:  # one position, 2-d (_raw's plain-MLP factors)
            torch.mul(g[:, :, None], a[:, None, :], out=block)
        elif a.shape[1] == 1:
            # one position (T = 1): the outer product g' a'^T itself, one multiply per
            # entry, written in place (no per-layer block, no concatenation)
            torch.mul(g[:, 0, :, None], a[:, 0, None, :], out=block)
        else:
            block.copy_(torch.einsum("bto,bti->boi", g, a))
        start += ko * ki
    return out


def _cached_spans(state, device, block_bytes: int, eigvecs: dict | None = None) -> tuple:
    """``(rows(start, stop), [(start, stop), ...])`` over a LoGraState's cached rows: views of
    the features (4096 rows a span, no copy), or features formed from the cached factors a
    power-of-two number of rows at a time (a block at least ``block_bytes``); with ``eigvecs``,
    factors only, their eigenbasis rows (:func:`_outer_rows`), each block rotated in it."""
    n = state.cached_rows()
    if state.train_features is not None:
        feats, block = state.train_features.to(device), 4096
        rows = lambda s, e: feats[s:e]  # noqa: E731
    else:
        # (factors already on ``device`` taken as they are: ``to`` would return them, one
        # dispatch each later)
        held = state._replace(train_factors={
            ln: (a, g) if a.device == device and g.device == device else (a.to(device), g.to(device))
            for ln, (a, g) in state.train_factors.items()})
        feats, rows = None, held.feature_rows
        d = sum(QA.shape[0] * QG.shape[0] for QA, QG in state.eigvecs.values())
        row = d * next(iter(held.train_factors.values()))[0].element_size()
        # a block holds at most a sixteenth of the features it stands for (at least
        # block_bytes, at most 4096 rows), a power of two of rows: on the CPU each row's
        # product then equals the whole product's
        want = max(1, max(block_bytes, n * row // 16) // row)
        block = min(4096, 1 << (want.bit_length() - 1))
        if eigvecs is not None:
            # each block's factors rotated in it, (Q_A^T a'_i, Q_G^T g'_i): no rotated copy of
            # every cached row is held while the blocks are scored (review RC F1, stop 25: one
            # rotation of all rows raised the peak at n = 16000 by 46% for no measured time)
            whole = held.train_factors

            def rows(s, e):  # (one block of every row: the factors themselves, no slices)
                return _outer_rows(whole if s == 0 and e == n else {
                    ln: (a[s:e], g[s:e]) for ln, (a, g) in whole.items()}, eigvecs)
    return rows, [(s, min(n, s + block)) for s in range(0, n, block)]
