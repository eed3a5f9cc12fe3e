"""LoGra's EK-FAC in the projected space: the corrected eigenvalues ``Lambda`` and the
preconditioner ``(F' + damping)^-1`` they give (:func:`~dattri_fn.attribute.logra.logra` uses them).

For a layer with eigenbases ``Q_A [k_in, k_in]``, ``Q_G [k_out, k_out]`` and a feature
``M = DW'`` (``[k_out, k_in]``, ``vec`` row-major):

    Lambda = E[(Q_G^T DW'_i Q_A)^2]                       # [k_out, k_in]
    (F' + damping)^-1 M = Q_G ((Q_G^T M Q_A) / (Lambda + damping)) Q_A^T

where a layer's ``k_out k_in`` is at most ``kron_max``, ``vec(Q_G^T M Q_A) = vec(M) (Q_G kron Q_A)``
is one GEMM each way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import _msg

# torch's CPU parallel grain (at::internal::GRAIN_SIZE): a full reduction of more elements is
# split over threads, which a stack's per-row reduction is not
_GRAIN = 32768


def _precondition(eigvecs: dict, eigvals: dict, phi: Tensor, kron_max: int) -> Tensor:
    """``(F' + damping)^-1`` applied to every row, layers side by side.  # [b, d] -> [b, d]"""
    one = len(eigvecs) == 1  # one layer: its block is the result (no copy into out)
    out, start = None if one else torch.empty_like(phi), 0
    for n, (QA, QG) in eigvecs.items():
        ki, ko = QA.shape[0], QG.shape[0]
        block = phi[:, start:start + ko * ki]
        if ko * ki <= kron_max:
            # vec(Q_G^T M Q_A) = vec(M) (Q_G kron Q_A) (row-major vec): one GEMM each way
            K = torch.kron(QG, QA)
            got = ((block @ K) / eigvals[n].flatten()) @ K.mT
        else:
            M = block.reshape(-1, ko, ki)
            R = (QG.mT @ M @ QA) / eigvals[n]
            got = (QG @ R @ QA.mT).flatten(1)
        if one:
            return got
        out[:, start:start + ko * ki] = got
        start += ko * ki
    return out


def _factored_sums(factors: dict, eigvecs: dict, layers) -> dict:
    """``{layer: sum_i (Q_G^T DW'_i Q_A)^2}`` (``[k_out, k_in]``) of the layers held as ``T = 1``
    factors ``{layer: (a' [n, k_in], g' [n, k_out])}``; 0.0 for every other layer of ``layers``."""
    sums = {ln: 0.0 for ln in layers}
    for ln, (a2, g2) in factors.items():
        QA, QG = eigvecs[ln]
        # T = 1: Q_G^T DW'_i Q_A = (Q_G^T g'_i)(Q_A^T a'_i)^T, so its squares summed over i
        # are one [k_out, n] x [n, k_in] product of the squared rotated factors
        # (rotated transposed, (Q^T a'^T): [k, n] GEMMs, as _outer_rows rotates the same rows)
        ta, tg = QA.mT.mm(a2.mT), QG.mT.mm(g2.mT)
        sums[ln] = tg.mul_(tg).mm(ta.mul_(ta).mT)  # squared in place: no [n, k] copies
    return sums


def _add_lambda(sums: dict, eigvecs: dict, rest: list, phi: Tensor, kron_max: int) -> None:
    """Add ``sum_i (Q_G^T DW'_i Q_A)^2`` of the feature rows ``phi`` to ``sums`` for the layers
    in ``rest`` (the others' columns are skipped).  # phi: [b, d]"""
    start = 0
    for ln, (QA, QG) in eigvecs.items():
        ki, ko = QA.shape[0], QG.shape[0]
        if ln in rest:
            block = phi[:, start:start + ko * ki]
            if ko * ki <= kron_max:
                rot = block @ torch.kron(QG, QA)
            else:
                rot = QG.mT @ block.reshape(-1, ko, ki) @ QA
            sums[ln] = sums[ln] + (rot ** 2).sum(0).reshape(ko, ki)
        start += ko * ki


def _eigvals(func: str, sums: dict, n: int, damping: float | None) -> dict:
    """``{layer: Lambda + damping}`` from ``sums`` over ``n`` examples (None: ``0.1 mean(Lambda)``
    per layer); a ValueError naming ``damping`` where one is not positive, or, at ``damping=0``,
    not above ``eps(dtype) * max``: dividing by a rounding-level eigenvalue (a softmax's null
    direction: ~1e-17 of the largest in float32, ~1e-35 in float64) gives noise, while real
    small eigenvalues (1e-6 of the largest in float32, review R8) are kept.

    Contiguous CPU layers of one shape and dtype, of at most 32768 entries each, are computed as
    one stack ``[L, k_out, k_in]`` (each layer's values are views of it): the same elementwise
    ops, and per-layer reductions that below torch's parallel grain (32768 elements) run in the
    order of a layer's own, so the same bits at any thread count, in one op each and one check
    for the stack. Larger layers (a full mean is split over threads there, a stack's row is
    not), other devices (untested kernels) and lone layers keep the per-layer form."""
    groups: dict = {}
    for ln, s in sums.items():
        stack = s.device.type == "cpu" and s.numel() <= _GRAIN and s.is_contiguous()
        groups.setdefault((s.shape, s.dtype, s.device) if stack else ln, []).append(ln)
    eigvals, floors, bad = {}, {}, False
    for names in groups.values():
        if len(names) == 1:
            lam = sums[names[0]] / n
            mu = lam + (0.1 * lam.mean() if damping is None else damping)
            floor = mu.abs().amax() * torch.finfo(mu.dtype).eps if damping == 0 else 0
            mus, fls = [mu], [floor]
        else:
            lam = torch.stack([sums[ln] for ln in names]) / n
            mu = lam + (0.1 * lam.mean((1, 2), keepdim=True) if damping is None else damping)
            floor = (mu.abs().amax((1, 2), keepdim=True) * torch.finfo(mu.dtype).eps
                     if damping == 0 else 0)
            mus, fls = mu, (floor if damping == 0 else [0] * len(names))
        bad = bad or not bool((mu > floor).all())
        eigvals.update(zip(names, mus, strict=True))
        floors.update(zip(names, fls, strict=True))
    for ln in sums if bad else ():  # the first layer that fails, in layer order
        if not bool((eigvals[ln] > floors[ln]).all()):
            raise ValueError(_msg(func, "damping", "a positive damping (or None) where the "
                                  f"projected eigenvalues of layer {ln!r} vanish (some "
                                  f"Lambda + damping <= {float(floors[ln]):.3g}"
                                  f"{', rounding level' if damping == 0 else ''})",
                                  f"damping={damping}"))
    return {ln: eigvals[ln] for ln in sums}


def _eigen_rows(io: dict, eigvecs: dict, eigvals: dict) -> Tensor:
    """``vec((Q_G^T DW'_j Q_A) / (Lambda + damping))`` of every row, layers side by side, from a
    pass's projected factors ``{layer: (a' [B, T, k_in], g' [B, T, k_out])}`` (or 2-d ``[B, k]``:
    one position).  # [B, d]

    Against eigenbasis rows of the train side, ``vec(Q_G^T DW'_i Q_A)``, these give the scores
    ``<DW'_i, (F' + damping)^-1 DW'_j>`` (``Q_A``, ``Q_G`` orthogonal), with the factors rotated
    before they meet: ``Q_G^T DW' Q_A = sum_t (Q_G^T g'_t)(Q_A^T a'_t)^T``, no Kronecker GEMMs."""
    B = next(iter(io.values()))[0].shape[0]
    d = sum(QA.shape[0] * QG.shape[0] for QA, QG in eigvecs.values())
    out, start = next(iter(io.values()))[0].new_empty(B, d), 0
    for ln, (a, g) in io.items():
        QA, QG = eigvecs[ln]
        ko, ki = QG.shape[0], QA.shape[0]
        block = out[:, start:start + ko * ki].view(B, ko, ki)
        if a.ndim == 2:  # one position, 2-d (_raw's plain-MLP factors)
            torch.mul(g.mm(QG)[:, :, None], a.mm(QA)[:, None, :], out=block)
        elif a.shape[1] == 1:
            torch.mul(g[:, 0].mm(QG)[:, :, None], a[:, 0].mm(QA)[:, None, :], out=block)
        else:
            block.copy_(torch.einsum("bto,bti->boi", g @ QG, a @ QA))
        block.div_(eigvals[ln])
        start += ko * ki
    return out

