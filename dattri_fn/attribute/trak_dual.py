"""TRAK's dual forms scored: ``score`` and ``self_score`` from a kernel over the training rows.

With ``d > n_train`` :func:`~dattri_fn.attribute.trak.trak`'s ``prepare`` keeps
``K_c = (Phi_c Phi_c^T + damping I)^-1`` (``[C, n, n]``), whole beside the dense rows, or
block-packed beside the rows kept factored (``TRAKState.train_factors``). Split out of
:mod:`dattri_fn.attribute.trak` (stop 26, no behaviour change).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_optional_int
from ..transforms.factored_grads import LayerGrads
from .boundary import check_cached_train
from .pipeline import TopK, merge_topk
from .trak_kernel import packed_diag, packed_matmul
from .trak_state import TRAKState, _moved


def dual_scores(func: str, state: TRAKState, K: Tensor, dual: bool | str, calls, train, test,
                device, top_k: int | None, largest: bool) -> Tensor | TopK:
    """Return ``w_i / C sum_c [K_c Phi_c Psi_c^T]_ij`` (or its top-k) for the validated
    ``test``; ``dual``: ``True`` or ``"factored"`` (:func:`check_state`).  # -> [n_train, n_test]"""
    if dual == "factored":
        n, rows = state.train_factors.num_rows, state.kernel_rows
        check_cached_train(func, train, n, read=False, rows=state.train_print)
        check_optional_int(func, "top_k", top_k)
        train_lg = _moved(state.train_factors, device)
        # params of another dtype than prepare's: the test rows take the state's (review R3 F2)
        test_lg = _moved(LayerGrads.cat(calls.factors(func, "test", test, device)), device,
                         train_lg.dense.dtype)
        S = None
        for c in range(K.shape[0]):
            # K_c (G_c G_test_c^T), the products from the factors: n m (in' + out) a layer
            S = packed_matmul(K[c], n, rows, train_lg.select(c).scores(test_lg.select(c)), S)
        S.mul_((state.train_weights.to(device) / K.shape[0])[:, None])
        return S if top_k is None else merge_topk(None, S, 0, top_k, largest)
    check_cached_train(func, train, state.train_features.shape[1], read=False,
                       rows=state.train_print)
    check_optional_int(func, "top_k", top_k)
    test_phi = calls.collect(func, "test", test, device).to(K.dtype)
    feats, wts = state.train_features.to(device, K.dtype), state.train_weights.to(device)
    # K_c (Phi_c Psi_c^T): [C, n, n] x [C, n, m], summed over checkpoints
    S = torch.bmm(K, torch.bmm(feats, test_phi.mT)).sum(0)
    S.mul_((wts / K.shape[0])[:, None])
    return S if top_k is None else merge_topk(None, S, 0, top_k, largest)


def dual_self_scores(func: str, state: TRAKState, K: Tensor, dual: bool | str, train,
                     device) -> Tensor:
    """Return ``s_ii = w_i / C sum_c [K_c Phi_c Phi_c^T]_ii``, without the ``[n, n]``.  # -> [n_train]"""
    if dual == "factored":
        n, rows = state.train_factors.num_rows, state.kernel_rows
        check_cached_train(func, train, n, read=False, rows=state.train_print)
        train_lg = _moved(state.train_factors, device)
        s = 0
        for c in range(K.shape[0]):
            lc = train_lg.select(c)
            # [K_c G_c G_c^T]_ii, G_c G_c^T by blocks of rows from the factors
            s = s + packed_diag(K[c], n, rows, lambda a, e, lc=lc: lc.rows(a, e).scores(
                lc.rows(0, e)))
        return s * (state.train_weights.to(device) / K.shape[0])
    check_cached_train(func, train, state.train_features.shape[1], read=False,
                       rows=state.train_print)
    feats, wts = state.train_features.to(device, K.dtype), state.train_weights.to(device)
    # s_ii = sum_c [K_c Phi_c Phi_c^T]_ii / C * Qbar_i, row by row without the n x n
    return (torch.bmm(K, feats) * feats).sum((0, 2)) * (wts / K.shape[0])
