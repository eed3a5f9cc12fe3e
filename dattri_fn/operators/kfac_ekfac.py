"""EK-FAC's statistics (:func:`ekfac_factors`): the K-FAC pass, the eigenbases, and the
corrected eigenvalues ``Lambda`` from a second pass (or the first pass's held ``(a, g)``).

Moved from :mod:`.kfac_stats` (stop 25, no behaviour change); that module still gives
``ekfac_factors``. The names this function read from ``kfac_stats``'s globals (the K-FAC pass,
``_passes``, ``_LAMBDA_ENTRIES``, ``_reduced``, ``_tokens``) are read through that module at call
time, as before, so a patch of one of them there still applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .._checks import _msg, all_finite
from . import kfac_stats as _stats
from .kfac_layers import _keys
from .kfac_stats import EKFACFactors


def ekfac_factors(module: nn.Module, loss_fn: Callable, params, data, *,
                  layers: str | Iterable[str] | None = None,
                  chunk_size: int | None = None, tapped=None,
                  batch_rows: int | None = None,
                  fisher: str = "empirical", seed: int = 0,
                  sampler: Callable | None = None, reduce: Callable | None = None,
                  dtype: torch.dtype | None = None, others: str | None = None) -> EKFACFactors:
    """Return EK-FAC bases ``Q_A, Q_G`` and ``Lambda = E[(Q_G^T DW_n Q_A)^2]`` per Linear layer.

    Two passes over ``data``: the K-FAC factors (then ``eigh``), and the corrected eigenvalues
    from the per-example gradient blocks ``DW_n = sum_t g_nt a_nt^T`` rotated into the
    eigenbasis, accumulated as running sums. ``Lambda`` is the diagonal of the empirical
    Fisher in the Kronecker eigenbasis, the Frobenius-closest such approximation.

    Args:
        module, loss_fn, params, data, layers, chunk_size, tapped, batch_rows, fisher, seed,
            sampler, dtype, others: as :func:`kfac_factors` (the params outside the Kronecker
            layers take the same diagonal block, EK-FAC's rule in the identity basis).
        reduce: as :func:`kfac_factors`, called once per pass: after the K-FAC pass (so every
            process takes the eigenbases of the same global factors), after the diagonal pass
            (only when params lie outside the Kronecker layers) and after the ``Lambda`` pass:
            two or three calls. Each pass's keys carry its own prefix (``"A:"``/``"G:"``,
            ``"D:"``, ``"L:"``); a ``reduce`` that must tell the passes apart reads the keys,
            not the number of calls.

    Returns:
        :class:`EKFACFactors`.

    Raises:
        TypeError, ValueError: as :func:`kfac_factors`.

    References:
        George et al. 2018, arXiv:1806.03884; Grosse et al. 2023, arXiv:2308.03296.
    """
    func = "ekfac_factors"
    # the K-FAC pass's (layer, a, g), when small enough to replay (not under ``reduce``: the
    # Lambda sums take this process's count)
    held: list = []
    kf, (state, names, pnames, batches, tapped, chunk_size, losses) = _stats._checked_kfac_pass(
        func, module, loss_fn, params, data, layers, chunk_size, tapped, batch_rows, fisher,
        seed, sampler, reduce, dtype, others, held if reduce is None else None)
    diag = kf.diagonal if dtype is None else {k: v.to(dtype) for k, v in kf.diagonal.items()}
    if not names:
        return EKFACFactors({}, {}, {}, pnames, kf.num_examples, (), diag)
    for side, fac in (("input (A)", kf.A), ("output-gradient (G)", kf.G)):
        for k, v in fac.items():
            if not all_finite(v):  # eigh would raise a raw LinAlgError naming no argument
                raise ValueError(_msg(func, "data", "examples whose layer inputs and gradients "
                                      "are finite", f"NaN or inf in the {side} factor of layer "
                                      f"{k!r}", "A training example's gradient (or layer "
                                      "input) is not finite."))
    QA = {k: _eigvecs(v) for k, v in kf.A.items()}
    QG = {k: _eigvecs(v) for k, v in kf.G.items()}
    bias = {n: _keys(n)[1] in pnames for n in names}
    L = {}

    def step(layer, a, g):
        if layer not in bias:  # a layer the check moved to the diagonal block
            return
        a, g = _stats._tokens(a, g, bias[layer])
        qa, qg = QA[layer], QG[layer]
        if a.shape[1] == 1:
            # One position: (Q_G^T DW Q_A)^2 = (g~ a~^T)^2 = g~^2 (a~^2)^T, summed over the
            # batch by one [out, B] x [B, in] product, never the [B, out, in] blocks.
            dL = (g[:, 0] @ qg).square_().T @ (a[:, 0] @ qa).square_()
        else:
            # (Q_G^T DW_n Q_A)^2 = ((g Q_G)^T (a Q_A))^2 summed over examples, a chunk of rows
            # at a time: rotated tokens and [rows, out, in] blocks stay ~256 KiB (this runs inside
            # the backward pass, beside the model's saved activations).
            o, i = g.shape[-1], a.shape[-1]
            step_rows = max(1, _stats._LAMBDA_ENTRIES // (o * max(i, a.shape[1])))
            dL = g.new_zeros(o, i)
            for r in range(0, g.shape[0], step_rows):
                rot = (g[r:r + step_rows] @ qg).mT @ (a[r:r + step_rows] @ qa)
                dL += rot.square_().sum(0)
        L[layer] = dL if layer not in L else L[layer] + dL

    def pooled(group, parts):
        # a tied group: the one-hot rows of Q_G gathered by id, never [B, S, V] x [V, V]
        if group not in QA:  # a group the check moved to the diagonal block
            return
        qa, qg = QA[group], QG[group]
        o, i, T = qg.shape[0], qa.shape[0], parts.h.shape[1] + parts.u.shape[1]
        step_rows = max(1, _stats._LAMBDA_ENTRIES // (o * max(i, T)))
        dL = parts.g.new_zeros(o, i)
        for r in range(0, parts.g.shape[0], step_rows):
            rows = slice(r, r + step_rows)
            rot = parts.rotated_out(qg, rows).mT @ (torch.cat([parts.h[rows], parts.u[rows]], 1)
                                                    @ qa)
            dL += rot.square_().sum(0)
        L[group] = dL if group not in L else L[group] + dL

    if held and held[-1] is not None:
        # The Lambda pass would capture the same (a, g) (a true Fisher's draws restart from
        # its seed each pass): replayed in order, the same sums bit for bit, one pass fewer.
        for layer, a, g in held:
            step(layer, a, g)
        n = int(kf.num_examples)
        held.clear()
    else:
        held.clear()
        n = _stats._passes(func, batches, tapped, losses(), state, chunk_size, step, batch_rows,
                    pooled=pooled)
    for k in names:  # a layer whose output never reached the loss: g = 0, Lambda = 0
        if k not in L:
            L[k] = QG[k].new_zeros(QG[k].shape[0], QA[k].shape[0])
    sums, n = _stats._reduced(func, reduce, {f"L:{k}": L[k] for k in names}, n)
    Lambda = {k: sums[f"L:{k}"] / n for k in names}
    if dtype is not None:
        QA, QG, Lambda = ({k: v.to(dtype) for k, v in d.items()} for d in (QA, QG, Lambda))
    return EKFACFactors(QA, QG, Lambda, pnames, torch.tensor(n, dtype=torch.int64), kf.transposed,
                        diag)


def _eigvecs(v: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of the symmetric factor ``v``; torch has no half-precision eigh, so a
    float16/bfloat16 factor is decomposed in float32 and its basis rounded back (RU3 M4), except
    under autocast, whose eigh returns float32 for half inputs."""
    if v.dtype in (torch.float16, torch.bfloat16):
        Q = torch.linalg.eigh(v.float())[1]
        return Q if torch.is_autocast_enabled(v.device.type) else Q.to(v.dtype)
    return torch.linalg.eigh(v)[1]
