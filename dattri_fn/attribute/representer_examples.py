"""Representer points' per-example functions: the class each example explains, a training
example's ``(h, dL/dlogits, class, label)``, a test example's ``(h, class)``, and the eager
check of the first example (:func:`example_fns`).

Moved out of :func:`.representer.representer`'s closure (stop 25, no behaviour change): the
same closures, built by one factory from the settings they read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import _msg, batch_size, batch_to, blame_keys, peek
from .._types import Params
from .boundary import check_example_fn, first_example
from .method import device_of
from .representer_fit import _soft_targets


def example_fns(feature_fn: Callable[[Params, Any], Tensor],
                head_fn: Callable[[Params, Tensor], Tensor],
                loss_on_logits: Callable[[Tensor, Tensor], Tensor],
                label_fn: Callable[[Any], Tensor], explain: str, refit: str | None):
    """Return ``(explained, train_example, test_example, check_first)`` for these settings
    (validated by :func:`.representer.representer`)."""

    def explained(example, logits: Tensor) -> Tensor:
        if explain == "label":
            return label_fn(example).long()
        return (logits[..., 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)

    def train_example(params: Params, example):  # -> h [F], dL/dlogits [K], class [], label
        h = feature_fn(params, example)
        logits = head_fn(params, h)
        y = label_fn(example)
        # with refit, alpha comes from the fitted head: the logits (its targets) replace dL/dz
        out = logits if refit is not None else torch.func.grad(loss_on_logits)(logits, y)
        return h, out, explained(example, logits), y

    def test_example(params: Params, example):  # -> h [F], class []
        # No loss here, so with explain="prediction" test examples need no label at all.
        h = feature_fn(params, example)
        return h, explained(example, head_fn(params, h))

    def check_first(func: str, arg: str, params: Params, batches) -> None:
        """Validate the first example eagerly, once (the public boundary). ``batches`` is the
        one :func:`iter_batches` view the rows are then read from: its first batch is peeked,
        not consumed, so a loader that can be read once loses nothing."""
        batch = peek(batches)
        if batch is None:
            raise ValueError(_msg(func, arg, "at least one batch", "an empty iterable"))
        batch_size(func, arg, batch, first=0)
        with blame_keys(func, "params", params):
            check_first_example(func, arg, params, batch_to(batch, device_of(params)))

    def check_first_example(func: str, arg: str, params: Params, batch) -> None:
        h = check_example_fn(func, "feature_fn", arg, feature_fn, params, batch, ndim=1)
        logits = check_example_fn(func, "head_fn", arg, lambda p, _: head_fn(p, h), params,
                                  batch, ndim=1)
        if arg == "train":
            y = label_fn(first_example(batch))
            if refit == "predictions":  # the fit's targets are probabilities, not labels
                y = _soft_targets(logits.detach())
            check_example_fn(func, "loss_on_logits", arg, lambda *_: loss_on_logits(logits, y),
                             params, batch, ndim=0)
        if explain == "label":
            y = label_fn(first_example(batch))
            if not isinstance(y, Tensor) or y.is_floating_point():
                raise TypeError(_msg(func, "label_fn", "an integer class label per example for "
                                     "explain='label'", repr(y),
                                     "Use explain='prediction' for soft targets."))

    return explained, train_example, test_example, check_first
