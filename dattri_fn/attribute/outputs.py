"""Model-output functions for TRAK-style methods: the classification margin and its weight.

``f(params, z)`` is the output whose gradient a method projects; ``Q(params, z)`` turns a change
of ``f`` into a change of the loss (``dL/df = -Q``). For softmax cross-entropy the margin is
``logit_y - logsumexp_{c != y} logit_c`` and ``Q = 1 - p_y``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._checks import _msg
from .._types import Params

OutputFn = Callable[[Params, Any], Tensor]
_MARGIN_FIX = "For classification use classification_margin(forward)."
_WEIGHT_FIX = "For classification use classification_weight(forward)."


def example_label(example) -> Tensor:
    """Return the label of one example: ``example["labels"]`` for a dict, else ``example[-1]``."""
    if isinstance(example, Mapping):
        if "labels" not in example:
            raise ValueError(_msg("example_label", "example", "a dict with a 'labels' key",
                                  f"keys {list(example)}"))
        return example["labels"]
    if isinstance(example, (tuple, list)) and len(example) >= 2:
        return example[-1]
    raise TypeError(_msg("example_label", "example", "a (x, ..., y) tuple/list or a dict with "
                         "'labels'", type(example).__name__, "Pass your own label_fn."))


def classification_margin(forward: Callable[[Params, Any], Tensor],
                          label_fn: Callable[[Any], Tensor] = example_label) -> OutputFn:
    """Return ``f(params, z) = logit_y - logsumexp_{c != y} logit_c``, TRAK's margin.  # -> []

    One logit ``s`` (a binary classifier trained with BCE-with-logits, logits ``[]`` or ``[1]``,
    labels 0/1): ``f = (2y - 1) s``, the same margin for two classes with logits ``(0, s)``.

    Args:
        forward: ``forward(params, example) -> logits [K]`` (or one logit) for ONE example (e.g.
            ``functional_model(module).forward``).
        label_fn: ``example -> y`` (an integer 0-d tensor; binary: 0/1, float allowed);
            default: the last element of a tuple example or ``example["labels"]``.

    Returns:
        ``output_fn(params, example) -> Tensor[]``, vmappable. ``sigmoid(f) = p_y``, the softmax
        (binary: sigmoid) probability of the label, so raising ``f`` lowers the cross-entropy.
    """

    return _margin_fn("classification_margin", forward, label_fn)


def _margin_fn(func: str, forward: Callable[[Params, Any], Tensor],
               label_fn: Callable[[Any], Tensor]) -> OutputFn:
    def margin(params: Params, example) -> Tensor:
        logits = forward(params, example)
        if not isinstance(logits, Tensor) or logits.ndim > 1:
            got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(_msg(func, "forward", "logits of shape [K] (or one logit) for one "
                                  "example", f"{got}"))
        y = label_fn(example)
        if isinstance(y, Tensor):
            y = y.reshape(1) if y.numel() == 1 else y
        return margins(func, logits.reshape(1, -1), y, batched=False).squeeze(0)

    return margin


def margins(func: str, logits: Tensor, labels: Tensor, *, batched: bool = True) -> Tensor:
    """Return ``logit_y - logsumexp_{c != y} logit_c`` per row.  # [B, K], [B] -> [B]

    ``K = 1`` (or logits ``[B]``): a binary classifier's logit ``s`` and 0/1 labels give
    ``(2y - 1) s``.
    """
    if logits.ndim == 1 or logits.shape[1] == 1:
        return _binary_signs(func, labels, logits, batched) * logits.reshape(-1)
    labels = _class_labels(func, labels, logits.shape[1], batched=batched)
    own = _gather_labels(func, logits, labels[:, None], "labels" if batched else "example")
    own = own.squeeze(1)
    # the label's logit set to -inf by one scatter (the same values, and the same gradient, as
    # a masked_fill with an arange == labels mask, at ~60 us less a call on [256, 10] logits)
    return own - logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)


def _binary_signs(func: str, y, logits: Tensor, batched: bool) -> Tensor:
    """Return ``2y - 1`` in the logits' dtype for 0/1 labels (integer, bool or float), or raise."""
    arg = "labels" if batched else "example"
    want = "binary labels 0/1 [B]" if batched else "a binary label 0/1 (one per example)"
    if not isinstance(y, Tensor):
        raise TypeError(_msg(func, arg, f"{want} as a Tensor", type(y).__name__))
    if y.is_complex():
        raise TypeError(_msg(func, arg, want, f"dtype {y.dtype}"))
    n = logits.reshape(-1).shape[0]
    if y.numel() != n or (batched and y.ndim not in (1, 2)):
        raise ValueError(_msg(func, arg, f"{want} for {n} logits", f"label shape {list(y.shape)}"))
    y = y.reshape(-1)
    if torch._C._functorch.maybe_current_level() is None:
        bad = (y != 0) & (y != 1)
        if bool(bad.any()):
            raise ValueError(_msg(func, arg, f"{want} for one logit per example (BCE-with-"
                                  "logits)", f"label {y[bad][0].item()}"))
    return y.to(logits.dtype) * 2 - 1


_AMINMAX = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # aminmax's CPU/CUDA dtypes


def _class_labels(func: str, y, K: int, *, batched: bool = False) -> Tensor:
    """Return ``y`` as int64 class indices in ``[0, K)``, or raise naming ``func``'s labels.

    A float label would be truncated (1.5 -> class 1) and an out-of-range one gives a raw index
    error. Values are checked eagerly; under a torch.func transform they cannot be read, and
    :func:`_gather_labels` reports the out-of-range index instead.
    """
    arg = "labels" if batched else "example"
    want = "integer class labels [B]" if batched else "an integer class label (one per example)"
    if not isinstance(y, Tensor):
        raise TypeError(_msg(func, arg, f"{want} as a Tensor", type(y).__name__))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(_msg(func, arg, want, f"dtype {y.dtype}",
                             "Class labels index the logits: convert them with .long()."))
    if (y.ndim != 1) if batched else (y.numel() != 1):
        raise ValueError(_msg(func, arg, want, f"label shape {list(y.shape)}"))
    if y.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no comparison kernels on CPU
        y = y.long()
    if torch._C._functorch.maybe_current_level() is None and y.numel():
        # one reduction and its reads, not four elementwise ops; the label named comes from
        # the elementwise test, on the error path only (other integer dtypes take it always)
        fast = y.dtype in _AMINMAX
        lo, hi = (int(v) for v in torch.aminmax(y)) if fast else (None, None)
        if not fast or lo < 0 or hi >= K:
            bad = (y < 0) | (y >= K)
            if bool(bad.any()):
                raise ValueError(_msg(func, arg, f"class labels in [0, {K}) for {K} logits",
                                      f"label {int(y[bad].reshape(-1)[0])}"))
    return y.long()


def _gather_labels(func: str, logits: Tensor, y: Tensor, arg: str) -> Tensor:
    """Return ``logits.gather(1, y)``; an out-of-range label raises naming ``func``'s ``arg``."""
    try:
        return logits.gather(1, y)
    except RuntimeError as err:  # under vmap: the labels' values could not be checked first
        if "out of bounds" not in str(err):
            raise
        raise ValueError(_msg(func, arg, f"class labels in [0, {logits.shape[-1]}) for "
                              f"{logits.shape[-1]} logits", f"an out-of-range label ({err})"))\
            from err


def classification_margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Return the batch mean of ``logit_y - logsumexp_{c != y} logit_c``.  # [B, K], [B] -> []

    The batch-loss form of :func:`classification_margin` (one logit ``[B]`` or ``[B, 1]`` with
    0/1 labels: ``(2y - 1) s``), for ``functional_model(module, classification_margin_loss)``:
    pass that model as ``trak``'s ``output_fn`` and its layer gradients come from the factored
    path.
    """
    return margins("classification_margin_loss", logits, labels).mean()


def _margin_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """The per-example form of :func:`classification_margin_loss`.  # [B, K], [B] -> [B]"""
    return margins("classification_margin_loss", logits, labels)


# One batched call where the capture engine needs per-example values (layers.per_example_losses),
# not a vmap of the batch-mean form over rows of one: the same values bit for bit (row-wise ops;
# the mean of one value is that value), at about a third less of TRAK's capture pass and weight
# forward on the digits tasks.
classification_margin_loss.per_example = _margin_rows


def classification_weight_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Return the batch mean of ``1 - p_y = sigmoid(-margin)``.  # [B, K], [B] -> []"""
    return torch.sigmoid(-margins("classification_weight_loss", logits, labels)).mean()


def _weight_rows(logits: Tensor, labels: Tensor) -> Tensor:
    """The per-example form of :func:`classification_weight_loss`.  # [B, K], [B] -> [B]"""
    return torch.sigmoid(-margins("classification_weight_loss", logits, labels))


classification_weight_loss.per_example = _weight_rows


def classification_weight(forward: Callable[[Params, Any], Tensor],
                          label_fn: Callable[[Any], Tensor] = example_label) -> OutputFn:
    """Return ``Q(params, z) = 1 - p_y = sigmoid(-margin)``, TRAK's weight for the margin.  # -> []

    ``d CE / d margin = -(1 - p_y)``: the factor that turns a change of the margin into a change
    of the cross-entropy loss. Args as :func:`classification_margin`.
    """
    margin = _margin_fn("classification_weight", forward, label_fn)
    return lambda params, example: torch.sigmoid(-margin(params, example))
