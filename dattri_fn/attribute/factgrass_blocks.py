"""FactGraSS's sketches and blocks: the drawn sketches of one set of parameter shapes, each block's
columns in the features, its stage-2 product, the per-block inverse applied to rows, the check that a
state's blocks are these sketches', the cached rows in index blocks, and the features formed from
cached factors in fixed row spans (:func:`~dattri_fn.attribute.factgrass.factgrass` uses them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, NoReturn

import torch
from torch import Tensor

from .._checks import _msg
from .pipeline import check_finite_self

if TYPE_CHECKING:
    from .factgrass import FactGraSSState


class _Sketches(NamedTuple):
    """FactGraSS's sketches for parameters of one set of shapes, drawn once."""

    key: tuple  # the parameters' (name, shape)
    stage1: object  # the KroneckerProjector of masks
    stage2: dict  # {block: the stage-2 Projector, or None (kept whole)}
    dense: dict  # {block: stage 2 as a dense [w, d] matrix in stage1's dtype, or None}


def _shapes(params: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in params.items())


def _stage_two(sk: _Sketches, blk: str, piece: Tensor, out: Tensor | None = None) -> Tensor:
    """``piece @ R`` of block ``blk``; a small count-sketch as one dense product (index_add_
    per call costs more than the [w, d] matmul below ~2**20 entries; the same matrix).
    ``out``: written there (the dense product straight into it).  # [b, w] -> [b, d]"""
    R, M = sk.stage2[blk], sk.dense[blk]
    if M is None:
        got = piece if R is None else R(piece)
        return got if out is None else out.copy_(got)
    if M.dtype != piece.dtype or M.device != piece.device:
        M = R.matrix(piece.dtype, piece.device)
    return piece @ M if out is None else torch.mm(piece, M, out=out)


def _blocks_of(sk: _Sketches) -> tuple:
    out, start = [], 0
    for blk, w in sk.stage1.dims.items():
        d = w if sk.stage2[blk] is None else sk.stage2[blk].proj_dim
        out.append((blk, start, start + d))
        start += d
    return tuple(out)


def _precondition(state: FactGraSSState, phi: Tensor) -> Tensor:  # [b, d] -> [b, d]
    if not state.inverses:
        return phi
    inv = state.inverses
    if len(state.blocks) == 1:
        return phi @ _like(inv[state.blocks[0][0]], phi)
    out = torch.empty_like(phi)
    for blk, s, e in state.blocks:  # each block's product written in place: no concatenation
        torch.mm(phi[:, s:e], _like(inv[blk], phi), out=out[:, s:e])
    return out


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t.to(x)`` (``x``'s dtype and device), with no tensor op where they are ``t``'s."""
    return t if t.dtype == x.dtype and t.device == x.device else t.to(x)


def _check_blocks(func: str, state: FactGraSSState, sk: _Sketches) -> None:
    """Raise unless ``state``'s blocks are those these sketches form: its rows and inverses
    would otherwise meet rows sketched another way, silently (a state saved by a version whose
    ``kronecker_layers`` split the parameters otherwise, e.g. a tied ``wte`` in the rest).
    Cached factors must also have the widths of these masks (``k_out k_in`` per block)."""
    held, want = tuple((b, int(s), int(e)) for b, s, e in state.blocks), _blocks_of(sk)
    if held != want:
        raise ValueError(_msg(func, "state", f"a FactGraSSState sketched in the blocks "
                              f"{list(want)} of this factgrass", f"blocks {list(held)}",
                              "Call prepare again (the state was prepared by another "
                              "factgrass, or saved by an older dattri_fn)."))
    factors = state.train_factors
    if factors is not None and {b: a.shape[1] * g.shape[1] for b, (a, g) in factors.items()} != dict(
            sk.stage1.dims):
        raise ValueError(_msg(func, "state", "a FactGraSSState whose factors have the mask "
                              f"widths {dict(sk.stage1.dims)} (k_out k_in) of this factgrass",
                              "factors " + str({b: (int(a.shape[1]), int(g.shape[1]))
                                                for b, (a, g) in factors.items()}),
                              "Call prepare again (the state was prepared by another "
                              "factgrass)."))


def _check_sketch(func: str, state: FactGraSSState, want: tuple) -> None:
    """Raise unless ``state.sketch`` (seed, kind, mask width, proj_dim, curvature, damping) is
    ``want``, naming the first setting that differs; a state without one (saved before it was
    recorded) is taken as it is."""
    held = state.sketch
    if held is None or tuple(map(tuple, held)) == want:
        return
    got, own = dict(held), dict(want)
    diff = [k for k in own if got.get(k, object()) != own[k]] or sorted(set(got) - set(own))
    key = diff[0]
    raise ValueError(_msg(func, "state", f"a FactGraSSState prepared with this factgrass's "
                          f"{key}={own.get(key)!r}", f"one prepared with {key}={got.get(key)!r}",
                          "Score with the factgrass that prepared it, or call prepare again."))


def _cached(feats: Tensor):
    """The cached rows as (row fn, index blocks of 4096 rows)."""
    n, block = feats.shape[0], 4096
    return (lambda i: feats[i[0]]), [(torch.arange(s, min(n, s + block)),)
                                     for s in range(0, n, block)]


def _spans(n: int, width: int, stage1_width: int, itemsize: int, least: int) -> list:
    """Fixed row spans ``[(start, stop)]`` of ``n`` cached examples whose features are formed
    from their factors at once: a power of two of rows (at most 4096) whose stage-1 and feature
    rows take at most a quarter of the bytes of all ``n`` features, and at least ``least``
    bytes. They depend on ``n`` and the widths only, so ``prepare``'s Fisher and every ``score``
    form the same rows with the same products, and the Fisher is summed in the same order
    however the examples came in passes. (The factors themselves are not bit-identical across
    groupings: a capture pass's GEMMs round differently at other row counts, ~1e-7 relative
    in float32; where the passes give the same factors, the Fisher and scores are the same bits.)"""
    cap = max(least, n * width * itemsize // 4) // max(1, (stage1_width + width) * itemsize)
    rows = 1 << max(0, min(12, cap.bit_length() - 1))
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _factor_rows(sk: _Sketches, blocks: tuple, factors: dict, start: int, stop: int,
                 out: Tensor | None = None) -> Tensor:
    """``phi`` of the cached examples ``start:stop`` from their factors: per block, stage 1
    ``vec(g' a'^T)`` then stage 2, written into its columns (of ``out`` where given).
    # -> [stop - start, d]"""
    if out is None:
        out = next(iter(factors.values()))[0].new_empty(stop - start, blocks[-1][2])
    for blk, c0, c1 in blocks:
        a, g = factors[blk]
        S = (g[start:stop, :, None] * a[start:stop, None, :]).flatten(1)
        _stage_two(sk, blk, S, out[:, c0:c1])
    return out


class _Factors:
    """Each block's factors ``(a' [n, k_in], g' [n, k_out])`` taken pass by pass: written in
    place into ``[total, k]`` buffers when ``total`` is known (no joined copy at the end), else
    joined at the end."""

    def __init__(self, total: int | None):
        self.total, self.n, self.bufs, self.parts = total, 0, {}, {}

    def add(self, sides, b: int) -> None:
        """``sides``: ``(block, start, stop, a' [b, k_in], g' [b, k_out])`` of the next ``b``
        rows, one block after another (each is copied in before the next is taken)."""
        for blk, _, _, pa, pg in sides:
            if self.total is None:
                self.parts.setdefault(blk, []).append((pa, pg))
                continue
            if blk not in self.bufs:
                self.bufs[blk] = (pa.new_empty(self.total, pa.shape[1]),
                                  pg.new_empty(self.total, pg.shape[1]))
            A, G = self.bufs[blk]
            A[self.n:self.n + b].copy_(pa)
            G[self.n:self.n + b].copy_(pg)
            pa = pg = None
        self.n += b

    def value(self) -> dict:
        if self.total is not None:
            return {blk: (A[:self.n], G[:self.n]) for blk, (A, G) in self.bufs.items()}
        return {blk: tuple(ps[0][i] if len(ps) == 1 else torch.cat([p[i] for p in ps])
                           for i in (0, 1)) for blk, ps in self.parts.items()}


def _refuse_fisher(func: str, bad: list, blocks: tuple, n: int, rows) -> NoReturn:
    """Raise the error naming ``func(train=...)`` for the blocks ``bad`` whose Fisher is NaN or
    inf: the first example whose features in them are not finite or whose self-score there
    overflows (``check_finite_self``'s words, as every method's ``self_score``), else (``rows``,
    the ``(start, phi)`` chunks ``prepare`` holds, name none) the block and its sum. Never
    ``damping``: no damping makes a non-finite Fisher factorisable."""
    cols = [(s, e) for b, s, e in blocks if b in bad]
    for r0, phi in rows:
        diag = sum((phi[:, s:e] * phi[:, s:e]).sum(1) for s, e in cols)
        check_finite_self(func, diag, r0, fix="A train example's features are not finite (an "
                          "input that overflows the dtype?): remove or rescale it.")
    raise ValueError(_msg(func, "train", "examples whose per-example features (gradients) are "
                          "finite", f"NaN or inf in block {bad[0]!r}'s Fisher over the {n} "
                          "examples", "An example's features overflow the dtype, or their sum "
                          "does: rescale the inputs (or use float64)."))
