"""Representer Point Selection: a test logit split into one term per training example.

For a model whose logits are ``head(theta, h)`` on penultimate features ``h = feature(theta, z)``
and whose last layer ``W`` is stationary for ``(1/n) sum_i L(logits_i, y_i) + l2 |W|^2``
(logits ``= W h``), the representer theorem gives

    W h_t = sum_i alpha_i <h_i, h_t>,    alpha_i = -1/(2 l2 n) dL(logits_i, y_i)/dlogits_i   # [K]

so train ``i`` contributes ``alpha_i[c] <h_i, h_t>`` to the test logit of class ``c``. With ``c``
the class being explained (the test label by default), a positive value raises that logit,
i.e. supports the prediction of ``c`` and lowers the test loss: a proponent ("excitatory" point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    batch_size,
    batch_slice,
    batch_to,
    check_optional_int,
    check_params,
    check_positive,
    iter_batches,
)
from .._types import Params
from .method import Method, device_of
from .pipeline import TopK, merge_topk
from .trak import (
    check_cached_train,
    check_example_fn,
    example_label,
    first_batch,
    first_example,
)

EXPLAIN = ("label", "prediction")


class RepresenterState(NamedTuple):
    """What :func:`representer`'s ``prepare`` computes from the training set.

    Attributes:
        features: penultimate features ``h_i``.  # [n_train, F]
        alpha: ``alpha_i = -1/(2 l2 n) dL(logits_i, y_i)/dlogits_i``.  # [n_train, K]
        classes: the class each training example's self-score explains (its label or its
            prediction, per ``explain``).  # [n_train] int64
    """

    features: Tensor
    alpha: Tensor
    classes: Tensor


def representer(feature_fn: Callable[[Params, Any], Tensor],
                head_fn: Callable[[Params, Tensor], Tensor],
                loss_on_logits: Callable[[Tensor, Tensor], Tensor], *, l2: float,
                label_fn: Callable[[Any], Tensor] = example_label, explain: str = "label",
                chunk_size: int | None = None) -> Method:
    """Return RPS: ``s_ij = alpha_i[c_j] <h_i, h_j>``.  # -> [n_train, n_test]

    ``h = feature_fn(params, z)``, ``alpha_i = -1/(2 l2 n) dL(head_fn(params, h_i), y_i) /
    dlogits`` with ``n`` the number of training examples given to ``prepare``, and ``c_j`` the
    class being explained for test ``j``: its label (``explain="label"``, the default) or the
    model's prediction ``argmax_c logits_j`` (``explain="prediction"``). Scores are
    ``[n_train, n_test]``; positive = train ``i`` raises test ``j``'s logit ``c_j`` (an
    excitatory point supporting that class), which for the label LOWERS test ``j``'s loss: a
    proponent. For cross-entropy ``alpha_i[y_i] = (1 - p_{y_i}) / (2 l2 n) > 0``, so every
    self-score ``alpha_i[c_i] |h_i|^2`` is positive. ``self_score`` is the diagonal.

    Exact when the head is linear without bias, ``head_fn(params, h) = W h``, and ``W`` is
    stationary for ``(1/n) sum_i L_i + l2 |W|^2``: then ``sum_i s_ij = logits_j[c_j]``. A bias
    fits in by appending a constant 1 to ``h`` (and regularising it like ``W``).

    Args:
        feature_fn: ``(params, example) -> h [F]``, the penultimate features of ONE example.
        head_fn: ``(params, h) -> logits [K]``.
        loss_on_logits: ``(logits [K], y) -> Tensor[]`` (e.g. ``F.cross_entropy`` on 1-d
            logits and a 0-d label).
        l2: ``> 0``, the coefficient of ``|W|^2`` in the training objective (no 1/2).
        label_fn: ``example -> y``; default: the last element of a tuple example or
            ``example["labels"]``.
        explain: ``"label"`` or ``"prediction"``; with ``"prediction"`` test examples need no
            label (e.g. a Batch ``(x,)``, if ``feature_fn`` reads only ``x``).
        chunk_size: examples per vmapped feature call, and train rows per block of scores.

    Returns:
        ``Method(prepare, score, self_score, "representer")``; ``prepare(params, train) ->
        RepresenterState`` caches ``h``, ``alpha`` and classes, so ``score(params, state,
        train, test, *, top_k=None, largest=True)`` and ``self_score(params, state, train)``
        read no training data (``train`` may be None; a Batch or list given must have
        ``n_train`` examples).

    Raises:
        TypeError/ValueError: naming the argument: a bad setting; at call time a bad params
            dict, functions that do not return ``[F]``/``[K]``/scalar, examples the model
            rejects, test features of another size than the state's, or classes out of range.

    References:
        Yeh, Kim, Yen & Ravikumar, "Representer Point Selection for Explaining Deep Neural
        Networks" (NeurIPS 2018), arXiv 1811.09720.

    Example:
        >>> m = representer(lambda p, z: body(p, z[0]), lambda p, h: p["fc.weight"] @ h,
        ...                 F.cross_entropy, l2=1e-3)
        >>> scores = m.score(params, m.prepare(params, train), None, test)  # [n_train, n_test]
    """
    name = "representer"
    for arg, fn in (("feature_fn", feature_fn), ("head_fn", head_fn),
                    ("loss_on_logits", loss_on_logits), ("label_fn", label_fn)):
        if not callable(fn):
            raise TypeError(_msg(name, arg, "a callable", type(fn).__name__))
    l2 = check_positive(name, "l2", l2)
    if explain not in EXPLAIN:
        raise ValueError(_msg(name, "explain", f"one of {EXPLAIN}", repr(explain)))
    check_optional_int(name, "chunk_size", chunk_size)

    def explained(example, logits: Tensor) -> Tensor:
        return (label_fn(example) if explain == "label" else logits.argmax(-1)).long()

    def train_example(params: Params, example):  # -> h [F], dL/dlogits [K], class []
        h = feature_fn(params, example)
        logits = head_fn(params, h)
        dlogits = torch.func.grad(loss_on_logits)(logits, label_fn(example))
        return h, dlogits, explained(example, logits)

    def test_example(params: Params, example):  # -> h [F], class []
        # No loss here, so with explain="prediction" test examples need no label at all.
        h = feature_fn(params, example)
        return h, explained(example, head_fn(params, h))

    def check_first(func: str, arg: str, params: Params, data) -> None:
        """Validate the first example of ``data`` eagerly, once (the public boundary)."""
        batch = first_batch(func, arg, data, device_of(params))
        h = check_example_fn(func, "feature_fn", arg, feature_fn, params, batch, ndim=1)
        logits = check_example_fn(func, "head_fn", arg, lambda p, _: head_fn(p, h), params,
                                  batch, ndim=1)
        if arg == "train":
            y = label_fn(first_example(batch))
            check_example_fn(func, "loss_on_logits", arg, lambda *_: loss_on_logits(logits, y),
                             params, batch, ndim=0)
        if explain == "label":
            y = label_fn(first_example(batch))
            if not isinstance(y, Tensor) or y.is_floating_point():
                raise TypeError(_msg(func, "label_fn", "an integer class label per example for "
                                     "explain='label'", repr(y),
                                     "Use explain='prediction' for soft targets."))

    def rows(func: str, arg: str, params: Params, data) -> tuple[Tensor, ...]:
        """Return the per-example outputs over every batch: ``(h [n, F], dL/dlogits [n, K],
        classes [n])`` for train, ``(h [n, F], classes [n])`` for test."""
        check_first(func, arg, params, data)
        fn = vmap(train_example if arg == "train" else test_example, in_dims=(None, 0))
        parts = []
        for batch in iter_batches(func, arg, data):
            n = batch_size(func, arg, batch)
            batch = batch_to(batch, device_of(params))
            step = n if chunk_size is None else chunk_size
            parts += [fn(params, batch_slice(batch, a, a + step)) for a in range(0, n, step)]
        return tuple(torch.cat(col) for col in zip(*parts, strict=True))

    def prepare(params: Params, train) -> RepresenterState:
        func = f"{name}.prepare"
        params = check_params(func, "params", params)
        h, dlogits, classes = rows(func, "train", params, train)
        return RepresenterState(h, dlogits / (-2.0 * l2 * h.shape[0]), classes)

    def check_state(func: str, state, params: Params, train) -> RepresenterState:
        if not isinstance(state, RepresenterState):
            raise TypeError(_msg(func, "state", "the RepresenterState returned by representer's "
                                 "prepare", type(state).__name__))
        check_cached_train(func, train, state.features.shape[0])
        device = device_of(params)
        return RepresenterState(*(t.to(device) for t in state))

    def score(params: Params, state: RepresenterState, train, test, *,
              top_k: int | None = None, largest: bool = True) -> Tensor | TopK:
        func = f"{name}.score"
        params = check_params(func, "params", params)
        check_optional_int(func, "top_k", top_k)
        H, alpha, _ = check_state(func, state, params, train)
        h_test, c_test = rows(func, "test", params, test)
        (n, F), K = H.shape, alpha.shape[1]
        if h_test.shape[1] != F:
            raise ValueError(_msg(func, "test", f"penultimate features of size F={F} like the "
                                  "state's", f"size {h_test.shape[1]}",
                                  "Prepare the state with the same model."))
        if bool(((c_test < 0) | (c_test >= K)).any()):
            raise ValueError(_msg(func, "test", f"classes in [0, {K})",
                                  f"range [{int(c_test.min())}, {int(c_test.max())}]"))
        step = n if chunk_size is None else chunk_size
        blocks, best = [], None
        for a in range(0, n, step):
            block = (H[a:a + step] @ h_test.T) * alpha[a:a + step, c_test]
            if top_k is None:
                blocks.append(block)
            else:
                best = merge_topk(best, block, a, top_k, largest)
        return torch.cat(blocks) if top_k is None else best

    def self_score(params: Params, state: RepresenterState, train) -> Tensor:
        func = f"{name}.self_score"
        params = check_params(func, "params", params)
        H, alpha, classes = check_state(func, state, params, train)
        return (H * H).sum(-1) * alpha.gather(1, classes[:, None]).squeeze(1)

    return Method(prepare, score, self_score, name)
