"""AdamW-influence: first-order influence through the recorded Adam/AdamW second moments.

From the checkpoints ``c`` of a :class:`~dattri_fn.training.Record` of an Adam/AdamW run (state
``theta_c`` before step ``t_c``, second moment ``v_c`` after ``t_c >= 1`` steps, learning rate
``lr_c`` of step ``t_c``):

    D_c = 1 / (sqrt(v_c / (1 - b2^t_c)) + eps)                       (diagonal, [P])
    scores[i, j] = sum_c lr_c < grad target(theta_c, z_j), D_c * grad loss(theta_c, z_i) >

Derivation: adding ``epsilon g_i`` to the gradient of the step taken from ``theta_c`` moves
Adam's first moment by ``(1 - b1) epsilon g_i``, which the momentum spreads over the following
steps with weights ``b1^k`` (summing to ``1 / (1 - b1)``); with the denominators held at
``D_c`` (the second moment's own response, second order in a small ``epsilon g_i`` against
the batch's ``v``, is dropped) the parameters move by ``-lr_c epsilon D_c g_i`` to first order,
and the test loss by ``-lr_c epsilon <grad target, D_c g_i>``: a positive score is a proponent.
It is TracIn-CP with the Adam preconditioner on the training side only; the test side is the
plain gradient. Decoupled weight decay and the bias correction of ``m`` are the same for every
example and left out; so is the batch mean's ``1/|B|`` (scores are per unit of gradient, as
TracIn's). Checkpoints before the first Adam step (``t_c = 0``, ``v = 0``) have no
denominator and are skipped by default.

The exact influence of the whole AdamW run, through every step and both moments, is MAGIC's
metagradient (:mod:`dattri_fn.attribute.magic`, with ``adamw``); dattri-LLM's
``AdamWInfluence`` unrolls a Gauss-Newton linearisation of the same run. This method is their
one-step, moment-frozen truncation, as cheap as TracIn.

References:
    Pruthi et al. 2020, TracIn, arXiv 2002.08484 (the checkpoint sum); Xia et al. 2024, LESS,
    arXiv 2402.04333 (Adam-preconditioned training gradients); dattri-LLM's ``precondition``
    and ``AdamWInfluence`` (TRAIS-Lab), for the Adam denominator ``1 / (sqrt(v_hat) + eps)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._types import Loss
from ..model import FunctionalModel
from .less import RecordedCheckpoints, optimizer_method
from .method import Method


def adam_preconditioned(G: Tensor, ck: RecordedCheckpoints) -> Tensor:
    """Return ``D_c * g`` for every row, ``D_c = 1 / (sqrt(v_c / (1 - b2^t_c)) + eps)``.
    # [C, B, P] -> [C, B, P]"""
    v_hat = ck.nu / (1 - ck.betas[1] ** ck.counts)[:, None]
    return G / (v_hat.sqrt() + ck.eps)[:, None]


def adamw_influence(loss: Loss | FunctionalModel, *, target: Loss | FunctionalModel | None = None,
                    checkpoints: Sequence[int] | None = None, proj_dim: int | None = None,
                    kind: str = "rademacher", seed: int = 0,
                    chunk_size: int | None = None) -> Method:
    """Return AdamW-influence: ``scores[i, j] = sum_c lr_c <grad target_j, D_c grad loss_i>``.

    ``params`` given to ``prepare``/``score``/``self_score`` is the
    :class:`~dattri_fn.training.Record` of an Adam/AdamW run; see the module docstring for
    ``D_c`` and the derivation.  # -> [n_train, n_test]

    Args:
        loss: per-example training loss, or a FunctionalModel (its ``loss``).
        target: test-side function whose DECREASE a positive score predicts (default ``loss``).
        checkpoints: the step indices of the record's checkpoints to sum over (default: every
            checkpoint before the final state with at least one Adam step taken).
        proj_dim, kind, seed: random projection of both sides after preconditioning (None:
            exact).
        chunk_size: examples per per-sample-gradient call.
    """
    return optimizer_method("adamw_influence", loss, adam_preconditioned, target=target,
                            checkpoints=checkpoints, normalize=False, min_count=1,
                            proj_dim=proj_dim, kind=kind, seed=seed, chunk_size=chunk_size)


__all__ = ["adam_preconditioned", "adamw_influence"]
