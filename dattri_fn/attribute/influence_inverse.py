"""Influence's inverse-curvature side: the training objective, its batched form, the CG that
sketches its own preconditioner (used by :func:`~dattri_fn.attribute.influence.influence`)."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import batch_cat, batch_size, batch_slice, iter_batches
from .._types import LinOp, Loss, Params
from ..model import FunctionalModel, batched_loss
from ..operators import kfac


def _concat(train) -> Any:
    return batch_cat(list(iter_batches("influence", "train", train)))


def _with_l2(loss: Loss, l2: float) -> Loss:
    """Return ``(p, z) -> loss(p, z) + l2 |p|^2``."""
    if l2 == 0:
        return loss
    return lambda p, z: loss(p, z) + l2 * sum((v * v).sum() for v in p.values())


def _independent(model: FunctionalModel) -> bool:
    """True when ``model``'s module cannot mix the examples of a batch: no BatchNorm or dropout
    in training mode (batch statistics, or one draw for the batch where ``vmap`` refuses)."""
    mixing = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)
    return not any(m.training and isinstance(m, mixing) for m in model.module.modules())


def _batched_train(model: FunctionalModel, l2: float):
    """``(p, batch) -> [B]``: ``loss(p, x_i) + l2 |p|^2`` for every example from ONE forward
    (:func:`~dattri_fn.model.batched_loss`); exact for a module whose examples do not interact."""
    rows = batched_loss(model)
    if l2 == 0:
        return rows
    return lambda p, b: rows(p, b) + l2 * sum((v * v).sum() for v in p.values())


# Examples compared, once per prepare, between the batched loss and the per-example one.
_CHECK_ROWS = 3


def _example(batch, i: int):
    """Example ``i`` of a batch (tensor, tuple/list or dict of tensors), its batch dim removed."""
    if isinstance(batch, torch.Tensor):
        return batch[i]
    if isinstance(batch, dict):
        return {k: v[i] for k, v in batch.items()}
    return type(batch)(v[i] for v in batch)


def _same_losses(per_example: Loss, batched, params: Params, data) -> bool:
    """True when ``batched`` gives ``per_example``'s values on the first few examples of
    ``data`` (a custom ``unpack`` or a forward that mixes examples would not)."""
    k = min(_CHECK_ROWS, batch_size("influence", "train", data))
    with torch.no_grad():  # a loop, not vmap: vmap's loss batching rules import sympy
        one = torch.stack([per_example(params, _example(data, i)) for i in range(k)])
        many = batched(params, batch_slice(data, 0, k))
    if not isinstance(many, torch.Tensor) or many.shape != one.shape:
        return False
    return bool(torch.allclose(many, one, rtol=1e-5, atol=1e-6 * float(one.abs().max())))


# The Nystrom sketch costs one curvature product on r rows; on the digits MLPs (r = 200,
# P = 2.4k and 9.6k) it saved more CG time than it cost from 11-12 right-hand sides on.
AUTO_SKETCH_RHS_PER_RANK = 1 / 16


SKETCH_SEED = 0  # the automatic sketch's seed: scores are deterministic


def _sketched_cg(name: str, C: LinOp, damping: float, opts: dict, *, always: bool) -> LinOp:
    """CG on ``C + damping I`` whose first call of ``k >= r / 16`` rows (any call if
    ``always``) builds the rank-``r`` Nystrom preconditioner of ``C`` (``r = min(200, P)``,
    seed 0, only if its sketch fits ``memory_budget()`` unless ``always``), used from then on;
    until then, plain CG. Errors of the sketch name ``name(curvature=...)``."""  # [k, P] -> [k, P]
    from ..operators.gauss_newton import memory_budget
    from ..solve import ihvp_cg
    from ..solve.nystrom import DEFAULT_RANK, nystrom_preconditioner, sketch_bytes

    plain = ihvp_cg(C, damping=damping, **opts)  # settings checked here, at prepare
    r = min(DEFAULT_RANK, C.dim)
    fits = always or sketch_bytes(C.dim, C.dtype, r) <= memory_budget()
    sketched: list[LinOp] = []

    def solve(V: torch.Tensor) -> torch.Tensor:
        if not sketched and (always or (fits and V.shape[0] >= r * AUTO_SKETCH_RHS_PER_RANK)):
            M = nystrom_preconditioner(C, damping=damping, rank=r, seed=SKETCH_SEED, func=name,
                                       arg="curvature")
            sketched.append(ihvp_cg(C, damping=damping, M=M, **opts))
        return (sketched[0] if sketched else plain)(V)

    return LinOp(solve, C.dim, C.dtype, C.device, name=plain.name)


def _factor_kinds(solver: str):
    return (kfac.EKFACFactors,) if solver == "ekfac" else (kfac.KFACFactors,)
