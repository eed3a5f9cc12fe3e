"""Batch losses for :func:`~dattri_fn.model.functional_model` where users otherwise write their own.

``causal_lm_loss`` is the next-token cross-entropy of a causal language model on a batch of one
sequence (the bridge adds the batch dim): logits ``[1, T, V]`` (or a Hugging Face output with
``.logits``) against labels ``[1, T]``, shifted by one position, ``-100`` ignored. Its batched
form ``causal_lm_loss.per_example`` gives every sequence's loss in one call, which the factored
paths use instead of ``vmap`` (see :func:`dattri_fn.transforms.layers.per_example_losses`).

Samplers draw targets from the model's own predictive distribution, for the TRUE Fisher
(``E_{y ~ p(y|x)}[g g^T]``, kronfluence's default) instead of the empirical one: a sampler is
``sample(output, target, generator) -> target'`` on a whole batch, outside any torch.func
transform, with an explicit ``torch.Generator``. :func:`sample_categorical` serves logits
``[B, K]`` with class labels ``[B]``, :func:`sample_bernoulli` one-logit binary cross-entropy
(float labels of the logits' shape); ``causal_lm_loss.sample`` and ``causal_lm_mean_loss.sample``
draw every kept next token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import _msg

__all__ = ["causal_lm_loss", "causal_lm_margin", "causal_lm_margin_weight", "causal_lm_mean_loss",
           "sample_bernoulli", "sample_categorical"]


def _logits(output, func: str) -> Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(_msg(func, "output", "logits [B, T, V] or an output with .logits", got))
    return logits


def _checked(output, labels: Tensor, func: str) -> Tensor:
    """Return the logits ``[B, T, V]`` after checking ``labels`` are integer ids ``[B, T]``."""
    logits = _logits(output, func)
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:2] \
            or labels.is_floating_point():
        got = (f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, Tensor)
               else type(labels).__name__)
        raise ValueError(_msg(func, "labels", f"integer token ids {list(logits.shape[:2])} "
                              "(-100 ignored)", got))
    return logits


def _token_losses(output, labels: Tensor, func: str) -> tuple[Tensor, Tensor]:
    """``([B, T-1] token losses, [B, T-1] kept mask)`` of the shifted cross-entropy."""
    logits = _checked(output, labels, func)
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


def _token_margins(output, labels: Tensor, func: str) -> tuple[Tensor, Tensor]:
    """``([B, T-1] margins logit_y - logsumexp_{c != y} logit_c, [B, T-1] kept mask)``."""
    logits = _checked(output, labels, func)[:, :-1]
    keep = labels[:, 1:] != -100
    target = labels[:, 1:].clamp_min(0)
    own = logits.gather(-1, target[..., None]).squeeze(-1)
    others = logits.scatter(-1, target[..., None], float("-inf")).logsumexp(-1)
    return (own - others) * keep, keep


def _margin_rows(output, labels: Tensor) -> Tensor:
    """Each sequence's summed next-token margin.  # [B, T, V], [B, T] -> [B]"""
    return _token_margins(output, labels, "causal_lm_margin")[0].sum(1)


def causal_lm_margin(output, labels: Tensor) -> Tensor:
    """Return TRAK's output for a causal LM: the SUM over kept tokens of the next-token margin
    ``logit_y - logsumexp_{c != y} logit_c = log(p_y / (1 - p_y))``.  # -> []

    For ``trak(functional_model(lm, causal_lm_margin), weight_fn=functional_model(lm,
    causal_lm_margin_weight))``: raising it lowers every kept token's cross-entropy.
    """
    return _margin_rows(output, labels).sum()


causal_lm_margin.per_example = _margin_rows


def _margin_weight_rows(output, labels: Tensor) -> Tensor:
    """Each sequence's mean over kept tokens of ``1 - p_y = sigmoid(-margin)``.  # -> [B]"""
    margin, keep = _token_margins(output, labels, "causal_lm_margin_weight")
    weight = torch.sigmoid(-margin) * keep
    return weight.sum(1) / keep.sum(1).clamp_min(1)


def causal_lm_margin_weight(output, labels: Tensor) -> Tensor:
    """Return TRAK's weight ``Q`` for :func:`causal_lm_margin`: the mean over kept tokens of
    ``1 - p_y`` (``d CE_t / d margin_t = -(1 - p_y)``, one weight per sequence).  # -> []"""
    return _margin_weight_rows(output, labels).sum()


causal_lm_margin_weight.per_example = _margin_weight_rows


def _draw(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One class per row of ``logits [..., K]`` from ``softmax``, on the generator's device."""
    probs = logits.detach().float().softmax(-1).to(generator.device)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1]).to(
        logits.device)


def sample_categorical(output, target, generator: torch.Generator) -> Tensor:
    """Return classes ``y ~ softmax(logits)`` per row, for the true Fisher.  # [B, K] -> [B]

    ``output``: logits ``[B, K]`` or an output with ``.logits``; ``target`` is ignored (replaced).
    """
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(_msg("sample_categorical", "output", "logits [B, K] (pass a sampler "
                              "for other outputs)", got))
    # the drawn classes replace target: float or [B, K] targets are not class labels, and
    # the loss would broadcast the classes against them (regression read as logits, RU2 H2)
    if isinstance(target, Tensor) and (target.is_floating_point() or target.is_complex()
                                       or target.dtype == torch.bool
                                       or target.shape != logits.shape[:1]):
        raise ValueError(_msg("sample_categorical", "target", f"integer class labels "
                              f"{list(logits.shape[:1])} (the classes it draws replace them)",
                              f"{target.dtype} {list(target.shape)}", "Pass a sampler that "
                              "draws this loss's targets, or fisher='empirical'."))
    return _draw(logits, generator)


def sample_bernoulli(output, target, generator: torch.Generator) -> Tensor:
    """Return labels ``y ~ Bernoulli(sigmoid(logits))`` elementwise, for the true Fisher of
    ``F.binary_cross_entropy_with_logits``.  # [B, ...] -> [B, ...] in target's dtype

    ``output``: logits or an output with ``.logits``; ``target``: the float labels it replaces.
    """
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor) \
            or target.shape != logits.shape or not target.is_floating_point():
        got = (f"{target.dtype} {list(target.shape)}" if isinstance(target, Tensor)
               else type(target).__name__)
        want = list(logits.shape) if isinstance(logits, Tensor) else "the output's shape"
        raise ValueError(_msg("sample_bernoulli", "target", f"float labels {want}", got))
    probs = logits.detach().float().sigmoid().to(generator.device)
    return torch.bernoulli(probs, generator=generator).to(device=logits.device,
                                                          dtype=target.dtype)


def _sample_next_tokens(output, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Return ``labels`` with every kept next token drawn from ``softmax(logits[:, t - 1])``.

    Position 0 (never a target after the shift) and ``-100`` positions are kept.  # -> [B, T]
    The draws are taken at the kept positions only, in order, so padding (labels ``-100``) does
    not move the generator's stream: the same sequences padded otherwise get the same draws.
    """
    logits = _logits(output, "causal_lm_loss.sample")
    out = labels.clone()
    keep = labels[:, 1:] != -100
    out[:, 1:][keep] = _draw(logits[:, :-1][keep], generator)
    return out


causal_lm_loss.sample = _sample_next_tokens
causal_lm_mean_loss.sample = _sample_next_tokens
