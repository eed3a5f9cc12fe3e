"""TRAK's state and the helpers that read it: :class:`TRAKState`, its checks, the factored
dual form's prepare and the row blocks ``score``/``self_score`` stream.

Split out of :mod:`dattri_fn.attribute.trak` (stop 22, no behaviour change); every name stays
importable from there. ``TRAKState`` keeps ``dattri_fn.attribute.trak`` as its module: saved states
(:mod:`dattri_fn.io` records ``module:QualName``) and :func:`~dattri_fn.store.state_hash` (whose tree
spec names the class) are the same as before the split.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import _msg, all_finite
from ..transforms.factored_grads import LayerGrads
from ..transforms.layer_grads import PlanDecisions
from ..transforms.tie_factors import layout_to
from .method import num_checkpoints
from .trak_kernel import dual_kernel, factored_width, pack_rows, packed_size, unpacked

_CACHED_ENTRIES = 2**19  # cached features widened and scored per block: C x rows x d entries


class TRAKState(NamedTuple):
    """What :func:`~dattri_fn.attribute.trak.trak`'s ``prepare`` computes once from the training set.

    Attributes:
        kernel: ``K_c = (Phi_c^T Phi_c + damping I)^-1`` per checkpoint  # [C, d, d]
            or, in the dual form (``d > n_train``, features cached, ``damping > 0``),
            ``(Phi_c Phi_c^T + damping I)^-1``  # [C, n_train, n_train]
            or, with ``kernel_rows > 0``, that dual kernel's lower triangle block-packed
            (:func:`~dattri_fn.attribute.trak_kernel.packed_blocks`; the full matrix:
            :meth:`kernel_matrix`).  # [C, packed_size(n_train, kernel_rows)]
        train_features: the projected train features ``phi_c(z_i)``, or None when built with
            ``cache_features=False`` or kept factored (``train_factors``).  # [C, n_train, d]
        train_weights: ``Qbar_i = (1/C) sum_c Q(theta_c; z_i)``, or None likewise.  # [n_train]
        plan: the decisions of ``output_fn``'s capture plan, checked on the first training
            batch of 2 or more examples (:class:`~dattri_fn.transforms.layer_grads.PlanDecisions`,
            plain values): ``score`` and ``self_score`` apply them without checking again.
            None: no plan (a plain ``output_fn``); each call then checks its own first batch.
        train_factors: without projection, with ``output_fn`` a FunctionalModel whose layers
            are all flat, the train rows as captured (each layer's ``a`` and ``g``, not the
            ``[C, n_train, P]`` rows; :class:`~dattri_fn.transforms.factored_grads.LayerGrads`),
            else None.
        kernel_rows: rows a block of the packed dual kernel (with ``train_factors``); 0: the
            kernel is kept whole.
        train_print: the print of the training rows in order
            (:func:`~dattri_fn.attribute.train_print.take`): ``score`` refuses other rows or
            another order for cached rows; None (saved before stop 28): counted only.  # [n]
    """

    kernel: Tensor
    train_features: Tensor | None
    train_weights: Tensor | None
    plan: PlanDecisions | None = None
    train_factors: LayerGrads | None = None
    kernel_rows: int = 0
    train_print: Tensor | None = None

    # Saved states and state_hash name the class by module: kept where it was defined before.
    __module__ = "dattri_fn.attribute.trak"

    def kernel_matrix(self) -> Tensor:
        """Return the kernel as full matrices, unpacked if kept packed.  # [C, s, s]"""
        if not self.kernel_rows:
            return self.kernel
        n = self.train_weights.shape[0]
        return torch.stack([unpacked(k, n, self.kernel_rows) for k in self.kernel])


class WeightedRows(NamedTuple):
    """TRAK's train rows ``w_i phi_ci`` with the weight kept apart.  # phi [C, b, d], w [b]

    ``scores`` scales the ``[b, n]`` product instead of a ``[C, b, d]`` copy of the features.
    """

    phi: Tensor
    w: Tensor

    def scores(self, other: Tensor) -> Tensor:
        """Return ``w_i sum_c <phi_ci, other_cj>``.  # other [C, n, d] -> [b, n]"""
        return torch.bmm(self.phi, other.transpose(1, 2)).sum(0).mul_(self.w[:, None])

    def row_dots(self, other: Tensor) -> Tensor:
        """Return ``w_i sum_c <phi_ci, other_ci>``.  # -> [b]"""
        return (self.phi * other).sum((0, 2)) * self.w

    @staticmethod
    def cat(blocks) -> WeightedRows:
        return WeightedRows(torch.cat([b.phi for b in blocks], 1), torch.cat([b.w for b in blocks]))


def _moved(lg: LayerGrads, device, dtype: torch.dtype | None = None) -> LayerGrads:
    """``lg`` on ``device`` (and in ``dtype``; itself when already so)."""
    dtype = lg.dense.dtype if dtype is None else dtype
    if lg.dense.device == torch.device(device) and lg.dense.dtype == dtype:
        return lg
    return LayerGrads({k: (a.to(device, dtype), g.to(device, dtype))
                       for k, (a, g) in lg.factors.items()}, lg.dense.to(device, dtype),
                      layout_to(lg.layout, device, dtype))


def factored_state(func: str, calls, data, total: int, dtype, wts: Tensor,
                   damping: float) -> TRAKState:
    """The dual form without projection from the captured rows: kept factored where every
    layer is flat and the factors are at most half the rows (``n (in' + out)`` entries per
    layer, not ``n in' out``), the Gram formed from them (:func:`factored_gram`: ``n^2 (in'
    + out)`` multiply-adds per layer, not ``n^2 in' out``) and the kernel kept packed
    (about half of ``[C, n, n]``); otherwise the dense rows, written from the captured
    ones (a batch of one or a sequence layer: another layout)."""
    d, C = calls.d, num_checkpoints(calls.stacked)
    kept = calls.factors(func, "train", data, calls.device, wts)
    width = factored_width(kept) if sum(b.num_rows for b in kept) == total else None
    # factored only where that at least halves the rows: the batches are concatenated
    # while kept, and the Gram widens the dense block (review R3 F1: a model whose dense
    # block is most of the width peaked at 2.3x the dense rows' prepare)
    if width is not None and 2 * width <= d:
        rows = kept[0] if len(kept) == 1 else LayerGrads.cat(kept)
        del kept
        pack = pack_rows(total)
        K = dual_kernel(func, None, d, dtype, damping, [rows], pack=pack)
        return TRAKState(K, None, wts, calls.plan(), rows, pack)
    feats = torch.empty((C, total, d), dtype=calls.fdt, device=calls.device)
    n = 0
    for lg in kept:
        lg.to_dense(out=feats[:, n:n + lg.num_rows])
        n += lg.num_rows
    del kept
    return TRAKState(dual_kernel(func, feats, d, dtype, damping), feats, wts, calls.plan())


def stacked_dtype(stacked) -> torch.dtype:
    return next(iter(stacked.values())).dtype


def check_state(func: str, state, stacked, d: int, calls=None) -> bool | str:
    """Raise unless ``state`` fits these checkpoints and ``d``; return True for the dual
    form, ``"factored"`` for its train rows kept factored."""
    if not isinstance(state, TRAKState):
        raise TypeError(_msg(func, "state", "the TRAKState returned by trak's prepare",
                             type(state).__name__))
    C = num_checkpoints(stacked)
    if state.train_factors is not None:
        n, rows = state.train_factors.num_rows, state.kernel_rows
        want = (C, packed_size(n, rows)) if rows > 0 else None
        if calls is None or calls.factors is None:  # review R3 F3: say which settings
            raise ValueError(_msg(func, "state", "a factored state only for a trak with "
                                  "proj_dim=None, a FunctionalModel output_fn and "
                                  "feature_dtype None or the params' dtype",
                                  "this trak, which forms dense rows"))
        if n >= d or tuple(state.kernel.shape) != want \
                or state.train_factors.dense.shape[0] != C:
            raise ValueError(_msg(func, "state", f"a factored state of {C} checkpoints with "
                                  f"n_train < d = {d} and its kernel packed (prepared with "
                                  "the same checkpoints, proj_dim=None)",
                                  f"n_train = {n}, kernel {list(state.kernel.shape)}, "
                                  f"kernel_rows = {rows}"))
        return "factored"
    n = None if state.train_features is None else state.train_features.shape[1]
    if n is not None and n < d and tuple(state.kernel.shape) == (C, n, n):
        if state.train_features.shape[2] != d:  # another model's state (review R3 F4)
            raise ValueError(_msg(func, "state", f"train features of width d = {d} (prepared "
                                  "with the same model and proj_dim)",
                                  f"width {state.train_features.shape[2]}"))
        return True
    if tuple(state.kernel.shape) != (C, d, d):
        raise ValueError(_msg(func, "state", f"a kernel of shape [C, d, d] = [{C}, {d}, {d}] "
                              "(prepared with the same checkpoints and proj_dim)",
                              f"{list(state.kernel.shape)}"))
    return False


def train_rows(phi: Tensor, q: Tensor) -> WeightedRows:  # [C, b, d], [b]
    return WeightedRows(phi, q / phi.shape[0])


def test_rows(K: Tensor, phi: Tensor) -> Tensor:  # [C, b, d] -> [C, b, d], rows K_c phi
    return phi @ K


def one_block_scores(func: str, rows: WeightedRows, test_feats: Tensor) -> Tensor:
    """Return ``w_i sum_c <phi_ci, psi_cj>`` for the whole cache as one block: finite test rows
    and finite scores checked as :func:`~dattri_fn.attribute.pipeline.stream_scores` checks them,
    and rows of another width or dtype refused by name (where stream_scores, on TRAK's weighted
    rows, leaves that to the matrix product's error).  # [C, n, d], [C, m, d] -> [n, m]"""
    from .pipeline import check_finite_scores

    if not all_finite(test_feats):
        raise ValueError(_msg(func, "test_features", "finite features", "NaN or inf"))
    feats = rows.phi
    if feats.shape[0] != test_feats.shape[0] or feats.shape[-1] != test_feats.shape[-1] \
            or feats.dtype != test_feats.dtype:
        raise ValueError(_msg(func, "test_features", "rows like the train features "
                              f"{list(feats.shape[:-2])} x [n, {feats.shape[-1]}] in "
                              f"{feats.dtype}", f"shape {list(test_feats.shape)} in "
                              f"{test_feats.dtype}"))
    S = rows.scores(test_feats)
    check_finite_scores(func, S)
    return S


def cached_chunks(state: TRAKState, device):
    """Row ranges of the cached features and ``idx -> train rows``, ``C x rows x d`` about
    ``_CACHED_ENTRIES`` a block (256 to 4096 rows): bounds the widened copy of a bfloat16
    cache and the ``[rows, n_test]`` score block."""
    C, n, d = state.train_features.shape
    block = max(256, min(4096, _CACHED_ENTRIES // max(1, C * d)))
    feats, wts = state.train_features.to(device), state.train_weights.to(device)
    dtype = wts.dtype  # the params' dtype; a bfloat16 cache is widened block by block
    # 1-tuples: a list of bare tensors would read as ONE (x, y, ...) batch
    idx = [(torch.arange(s, min(n, s + block), device=device),)
           for s in range(0, n, block)]

    # One widening buffer for every block: a fresh block each time lets the C allocator's
    # dynamic thresholds keep freed copies resident. A block is used before the next is read.
    buf = None if feats.dtype == dtype else feats.new_empty((C, min(n, block), d), dtype=dtype)

    def rows(i):  # views of the cache, not an indexed copy (one sync per block)
        start, b = int(i[0][0]), i[0].shape[0]
        part = feats[:, start:start + b]
        return (part if buf is None else buf[:, :b].copy_(part)), wts[start:start + b]

    return idx, rows
