"""FactGraSS's sketches and blocks: the drawn sketches of one set of parameter shapes, each block's
columns in the features, its stage-2 product, the per-block inverse applied to rows, the check that a
state's blocks are these sketches', and the cached rows in index blocks
(:func:`~dattri_fn.attribute.factgrass.factgrass` uses them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .._checks import _msg

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
    if len(state.blocks) == 1:
        return phi @ state.inverses[state.blocks[0][0]].to(phi)
    out = torch.empty_like(phi)
    for blk, s, e in state.blocks:  # each block's product written in place: no concatenation
        torch.mm(phi[:, s:e], state.inverses[blk].to(phi), out=out[:, s:e])
    return out


def _check_blocks(func: str, state: FactGraSSState, sk: _Sketches) -> None:
    """Raise unless ``state``'s blocks are those these sketches form: its rows and inverses
    would otherwise meet rows sketched another way, silently (a state saved by a version whose
    ``kronecker_layers`` split the parameters otherwise, e.g. a tied ``wte`` in the rest)."""
    held, want = tuple((b, int(s), int(e)) for b, s, e in state.blocks), _blocks_of(sk)
    if held != want:
        raise ValueError(_msg(func, "state", f"a FactGraSSState sketched in the blocks "
                              f"{list(want)} of this factgrass", f"blocks {list(held)}",
                              "Call prepare again (the state was prepared by another "
                              "factgrass, or saved by an older dattri_fn)."))


def _cached(feats: Tensor):
    """The cached rows as (row fn, index blocks of 4096 rows)."""
    n, block = feats.shape[0], 4096
    return (lambda i: feats[i[0]]), [(torch.arange(s, min(n, s + block)),)
                                     for s in range(0, n, block)]
