"""LoGra's projections and eigenbases: the Gaussian ``P_in``, ``P_out`` drawn from the seed, per
layer, and the eigenvectors of the projected EK-FAC factors (:func:`~dattri_fn.attribute.logra.logra`
uses them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import _msg, all_finite
from ..model import FunctionalModel


def _projection(rows: int, k: int | None, seed: int) -> Tensor | None:
    """Gaussian ``[rows, k]`` float64 with entries N(0, 1/k): ``E[P P^T] = I``; None keeps all
    rows."""
    if k is None or k >= rows:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g, dtype=torch.float64) / k ** 0.5


def _projections(widths: dict, k_in: int | None, k_out: int | None, seed: int) -> dict:
    """``{layer: (P_in, P_out)}`` for layers of ``{layer: (in', out)}`` widths, in order: layer
    ``i``'s sides are drawn from seeds ``7919 seed + 2i`` and ``7919 seed + 2i + 1``."""
    return {ln: (_projection(wa, k_in, seed * 7919 + 2 * i),
                 _projection(wg, k_out, seed * 7919 + 2 * i + 1))
            for i, (ln, (wa, wg)) in enumerate(widths.items())}


def _cast(projections: dict, like: Tensor) -> dict:
    """The float64 projections in ``like``'s dtype and device."""
    return {ln: tuple(None if P is None else P.to(like) for P in pair)
            for ln, pair in projections.items()}


def _eigvecs(factors: dict, func: str = "logra.prepare", n: int | None = None,
             scale: int | None = None) -> dict:
    """``{layer: (Q_A, Q_G)}``: eigenvectors of every ``(A', G')`` (divided by ``scale`` first
    when given: one division per stacked size, the same quotients as matrix by matrix), one
    batched ``eigh`` per matrix size (the same per-matrix LAPACK call as one by one).

    A factor holding NaN or inf (an example's overflowing input or gradient, summed over the
    ``n`` examples) is refused by name, ``func(train=...)``, before ``eigh``; an ``eigh`` that
    does not converge on finite factors is re-raised the same way, with its cause."""
    mats = [m for pair in factors.values() for m in pair]
    by_size: dict = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[0], []).append(i)
    stacks = [torch.stack([mats[i] for i in idx]) for idx in by_size.values()]
    if scale is not None:
        # (the stacks are ours: divided in place; a matrix and its quotient are finite alike)
        stacks = [S.div_(scale) for S in stacks]
    if not all(all_finite(S) for S in stacks):  # one scan a matrix size (hot: every prepare)
        k = next(i for i, m in enumerate(mats) if not all_finite(m))
        over = "" if n is None else f" over the {n} examples"
        side = ("input (A')", "output-gradient (G')")[k % 2]
        raise ValueError(_msg(func, "train", "examples whose per-example layer inputs and "
                              "gradients are finite", f"NaN or inf in the {side} covariance "
                              f"factor of layer {list(factors)[k // 2]!r}{over}",
                              "A train example's gradient (or layer input) is not finite."))
    vecs = [None] * len(mats)
    for idx, S in zip(by_size.values(), stacks, strict=True):
        try:
            # torch has no half-precision eigh: float32, the basis rounded back (RU3 M4) except
            # under autocast, whose eigh returns float32 for half inputs (the params' dtype)
            low = S.dtype in (torch.float16, torch.bfloat16)
            Q = torch.linalg.eigh(S.float() if low else S)[1]
            if low and not torch.is_autocast_enabled(S.device.type):
                Q = Q.to(S.dtype)
        except torch.linalg.LinAlgError as e:
            raise ValueError(_msg(func, "train", "training examples whose covariance factors "
                                  "have an eigendecomposition", f"a failed eigh ({e})",
                                  "The factors are finite but too ill-conditioned for "
                                  f"{S.dtype}; try float64.")) from e
        for i, q in zip(idx, Q.unbind(0), strict=True):  # (one op for every view, not one each)
            vecs[i] = q
    return {ln: (vecs[2 * k], vecs[2 * k + 1]) for k, ln in enumerate(factors)}


def _widths(io: dict, specs: dict, model: FunctionalModel) -> dict:
    """``{layer: (in (+1 with an attributed bias), out)}``: the factors' full widths."""
    return {n: (a.shape[-1] + (specs[n].bias in model.params), g.shape[-1])
            for n, (a, g) in io.items()}


def _check_dtype(func: str, eigvecs: dict, weights: dict) -> None:
    """Refuse params (``weights``: the attributed layers' weights) in another dtype than the
    state's eigenvectors, which ``prepare`` formed in its params' dtype: the test rows would be
    formed in one dtype and rotated in the other."""
    want = next(iter(eigvecs.values()))[0].dtype
    got = next(iter(weights.values())).dtype
    if got != want:
        raise ValueError(_msg(func, "params", f"params in {want}, the dtype of the state's "
                              "eigenbasis (of prepare's params)", str(got),
                              "Cast the params, or call prepare again with them."))
