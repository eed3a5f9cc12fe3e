"""Batch losses for :func:`~dattri_fn.model.functional_model` where users otherwise write their own.

``causal_lm_loss`` is the next-token cross-entropy of a causal language model on a batch of one
sequence (the bridge adds the batch dim): logits ``[1, T, V]`` (or a Hugging Face output with
``.logits``) against labels ``[1, T]``, shifted by one position, ``-100`` ignored. Its batched
form ``causal_lm_loss.per_example`` gives every sequence's loss in one call, which the factored
paths use instead of ``vmap`` (see :func:`dattri_fn.layers.per_example_losses`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._checks import _msg

__all__ = ["causal_lm_loss", "causal_lm_mean_loss"]


def _logits(output, func: str) -> Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(_msg(func, "output", "logits [B, T, V] or an output with .logits", got))
    return logits


def _token_losses(output, labels: Tensor, func: str) -> tuple[Tensor, Tensor]:
    """``([B, T-1] token losses, [B, T-1] kept mask)`` of the shifted cross-entropy."""
    logits = _logits(output, func)
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2] \
            or labels.is_floating_point():
        got = (f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, Tensor)
               else type(labels).__name__)
        raise ValueError(_msg(func, "labels", f"integer token ids {list(logits.shape[:2])} "
                              "(-100 ignored)", got))
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
    return loss, target != -100


def _sum_rows(output, labels: Tensor) -> Tensor:
    """Each sequence's summed token loss.  # [B, T, V], [B, T] -> [B]"""
    return _token_losses(output, labels, "causal_lm_loss")[0].sum(1)


def causal_lm_loss(output, labels: Tensor) -> Tensor:
    """Return the SUM over tokens of the next-token cross-entropy (-100 ignored).  # -> []

    ``loss = sum_t CE(logits[:, t], labels[:, t + 1])`` over a batch (of one sequence under
    the bridge); summing, not averaging, keeps each sequence's gradient independent of its
    length's padding, as kronfluence and LoGra do.
    """
    return _sum_rows(output, labels).sum()


causal_lm_loss.per_example = _sum_rows


def _mean_rows(output, labels: Tensor) -> Tensor:
    """Each sequence's mean token loss over its kept tokens.  # -> [B]"""
    loss, keep = _token_losses(output, labels, "causal_lm_mean_loss")
    return loss.sum(1) / keep.sum(1).clamp_min(1)


def causal_lm_mean_loss(output, labels: Tensor) -> Tensor:
    """Return the MEAN over kept tokens of the next-token cross-entropy, summed over the batch
    (of one sequence under the bridge).  # -> []"""
    return _mean_rows(output, labels).sum()


causal_lm_mean_loss.per_example = _mean_rows
