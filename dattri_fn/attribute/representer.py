"""Representer Point Selection: a test logit split into one term per training example.

For a model whose logits are ``head(theta, h)`` on penultimate features ``h = feature(theta, z)``
and whose last layer ``W`` is stationary for ``(1/n) sum_i L(logits_i, y_i) + l2 |W|^2``
(logits ``= W h``), the representer theorem gives

    W h_t = sum_i alpha_i <h_i, h_t>,    alpha_i = -1/(2 l2 n) dL(logits_i, y_i)/dlogits_i   # [K]

so train ``i`` contributes ``alpha_i[c] <h_i, h_t>`` to the test logit of class ``c``. With ``c``
the class being explained (the test label by default), a positive value raises that logit,
i.e. supports the prediction of ``c`` and lowers the test loss: a proponent ("excitatory" point).

A binary classifier with ONE logit ``s = w^T h`` (BCE-with-logits, ``K = 1``) has classes 0 and
1: class 1's two-class margin is ``s`` and class 0's is ``-s``, so train ``i`` contributes
``(2c - 1) alpha_i <h_i, h_t>`` to the margin of class ``c``, and the predicted class is
``s > 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import (
    _msg,
    all_finite,
    batch_leaves,
    batch_size,
    batch_slice,
    batch_to,
    blame_data,
    blame_keys,
    check_optional_int,
    check_params,
    check_positive,
    iter_batches,
)
from .._types import Params
from ..solve.lbfgs import _lbfgs as _lbfgs
from . import train_print
from .boundary import check_cached_train
from .method import Method, device_of
from .outputs import example_label
from .pipeline import TopK, check_finite_self, merge_topk
from .representer_blocks import _coefficients, _count, _owned, _scale  # noqa: F401
from .representer_examples import example_fns
from .representer_fit import _NEWTON_ENTRIES as _NEWTON_ENTRIES
from .representer_fit import _NEWTON_WORK as _NEWTON_WORK
from .representer_fit import _soft_targets, fit_head


def _is_store(train) -> bool:
    from ..store import FeatureStore, StoreRecording

    return isinstance(train, (FeatureStore, StoreRecording))

EXPLAIN = ("label", "prediction")
REFIT = ("labels", "predictions")


class RepresenterState(NamedTuple):
    """What :func:`representer`'s ``prepare`` computes from the training set.

    Attributes:
        features: penultimate features ``h_i``.  # [n_train, F]
        alpha: ``alpha_i = -1/(2 l2 n) dL(logits_i, y_i)/dlogits_i``.  # [n_train, K]
        classes: the class each training example's self-score explains (its label or its
            prediction, per ``explain``).  # [n_train] int64
        train_print: the print of the training rows, in order
            (:func:`~dattri_fn.attribute.train_print.take`): ``score`` refuses other rows or
            another order. None (a state saved before stop 28): the rows are only counted.
            # [n_train] int64
    """

    features: Tensor
    alpha: Tensor
    classes: Tensor
    train_print: Tensor | None = None


def representer(feature_fn: Callable[[Params, Any], Tensor],
                head_fn: Callable[[Params, Tensor], Tensor],
                loss_on_logits: Callable[[Tensor, Tensor], Tensor], *, l2: float,
                label_fn: Callable[[Any], Tensor] = example_label, explain: str = "label",
                refit: str | None = None, chunk_size: int | None = None) -> Method:
    """Return RPS: ``s_ij = alpha_i[c_j] <h_i, h_j>``.  # -> [n_train, n_test]

    ``h = feature_fn(params, z)``, ``alpha_i = -1/(2 l2 n) dL(head_fn(params, h_i), y_i) /
    dlogits`` with ``n`` the number of training examples given to ``prepare``, and ``c_j`` the
    class being explained for test ``j``: its label (``explain="label"``, the default) or the
    model's prediction ``argmax_c logits_j`` (``explain="prediction"``). A head with ONE
    logit ``s`` (binary, BCE-with-logits) takes labels 0/1 and scores ``(2 c_j - 1) alpha_i[0]
    <h_i, h_j>`` (class 0's margin is ``-s``; the prediction is ``s > 0``): every self-score
    is again positive. Scores are
    ``[n_train, n_test]``; positive = train ``i`` raises test ``j``'s logit ``c_j`` (an
    excitatory point supporting that class), which for the label LOWERS test ``j``'s loss: a
    proponent. For cross-entropy ``alpha_i[y_i] = (1 - p_{y_i}) / (2 l2 n) > 0``, so every
    self-score ``alpha_i[c_i] |h_i|^2`` is positive. ``self_score`` is the diagonal.

    Exact when the head is linear without bias, ``head_fn(params, h) = W h``, and ``W`` is
    stationary for ``(1/n) sum_i L_i + l2 |W|^2``: then ``sum_i s_ij = logits_j[c_j]``. A bias
    fits in by appending a constant 1 to ``h`` (and regularising it like ``W``). A trained
    network's head is rarely stationary for that objective (weight decay on every layer, early
    stopping): ``refit`` first fits the head to it (:func:`fit_head`), as Yeh et al. do.

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
        refit: None (``alpha`` from the head in ``params``), ``"labels"`` (``prepare`` first
            fits the head to the training labels) or ``"predictions"`` (to the model's own
            predicted probabilities ``softmax(head_fn(params, h_i))``, Yeh et al.'s choice;
            ``loss_on_logits`` must take ``[K]`` probability targets, as ``F.cross_entropy``
            does; for one logit the targets are ``sigmoid(s_i)``, 0-d per example like a
            label). ``alpha`` then comes from the fitted head and those targets; test features
            and predicted classes still come from ``params``. LDS on the bundled digits tasks:
            0.38 / 0.24 / 0.56 with ``"predictions"`` against 0.36 / 0.18 / 0.53 as given
            (mlp / cnn / lr).
        chunk_size: examples per vmapped feature call, and train rows per block of scores.
            Memory: ``prepare`` writes a list of batches into preallocated rows and fits the
            head in float64 blocks (no float64 copy of the features); ``score`` without
            ``top_k`` on a Batch or a list of them writes the ``[n_train, n_test]`` output
            a column block at a time, embedding at most a quarter of the test set per call
            (the test features are never held whole) -- its peak is the state, the output
            and ~1/4 of the test features.

    Returns:
        ``Method(prepare, score, self_score, "representer")``; ``prepare(params, train) ->
        RepresenterState`` caches ``h``, ``alpha`` and classes, so ``score(params, state,
        train, test, *, top_k=None, largest=True)`` and ``self_score(params, state, train)``
        read no training data (``train`` may be None; a Batch or list given must have
        ``n_train`` examples). ``train`` may also be a feature store (:mod:`dattri_fn.store`):
        ``score`` given ``record_store(...)`` of the prepared training set writes the rows
        ``[h_i | alpha_i]`` (from the state, aligned with the data's batches, which are only
        hashed) under the state's hash and scores from them; given the opened store it scores
        from its rows, refusing a store written under another state; ``self_score`` records
        ``s_ii`` to ``<store>/self`` and reads it back the same way.

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
    if refit is not None and refit not in REFIT:
        raise ValueError(_msg(name, "refit", f"None or one of {REFIT}", repr(refit)))
    check_optional_int(name, "chunk_size", chunk_size)

    explained, train_example, test_example, check_first = example_fns(
        feature_fn, head_fn, loss_on_logits, label_fn, explain, refit)

    def rows(func: str, arg: str, params: Params, data, *, sink=None,
             most: int | None = None) -> tuple[Tensor, ...] | None:
        """Return the per-example outputs over every batch: ``(h [n, F], dL/dlogits [n, K]
        (with refit: the logits), classes [n], labels [n, ...])`` for train, ``(h [n, F],
        classes [n])`` for test. A list of batches (its row count known) is written into
        preallocated columns, so its rows are never held twice; the train side's columns
        are the state's own (never a view of the data or the params). With ``sink``, each
        vmapped chunk (at most ``most`` rows) is handed to it instead, and None returned."""
        batches = iter_batches(func, arg, data)
        check_first(func, arg, params, batches)
        fn = vmap(train_example if arg == "train" else test_example, in_dims=(None, 0))
        total = None
        if isinstance(batches, (list, tuple)):  # a NaN example named by its index in the data
            total = 0
            for b in batches:
                total += batch_size(func, arg, b, first=total)
        parts, cols, at, sources, seen = [], None, 0, [], 0
        for batch in batches:
            n = batch_size(func, arg, batch, first=seen)
            seen += n
            batch = batch_to(batch, device_of(params))
            step = n if chunk_size is None else chunk_size
            step = step if most is None else min(step, most)
            with blame_data(func, arg, batch), blame_keys(func, "params", params):
                for a in range(0, n, step):
                    # RPS never differentiates its rows: a feature_fn running a backbone whose
                    # parameters require grad must not leave its graph in the state (RU3 M2)
                    with torch.no_grad():
                        part = fn(params, batch_slice(batch, a, a + step))
                    if sink is not None:
                        sink(part)
                        del part
                        continue
                    if total is None or part[0].shape[0] == total:  # unknown count, or all rows
                        parts.append(part)
                        sources = [*batch_leaves(batch), *params.values()]
                        continue
                    if cols is None:
                        cols = tuple(t.new_empty((total, *t.shape[1:])) for t in part)
                    for col, t in zip(cols, part, strict=True):
                        col[at:at + t.shape[0]] = t
                    at += part[0].shape[0]
                    del part  # before the next chunk's rows are formed
        if cols is not None or sink is not None:
            return cols
        if len(parts) == 1:
            return parts[0] if arg == "test" else tuple(_owned(t, sources) for t in parts[0])
        return tuple(torch.cat(col) for col in zip(*parts, strict=True))

    def prepare(params: Params, train) -> RepresenterState:
        func = f"{name}.prepare"
        params = check_params(func, "params", params)
        printed = train_print.take(func, train)
        h, dlogits, classes, labels = rows(func, "train", params, train)
        if refit is not None:
            targets = labels if refit == "labels" else _soft_targets(dlogits).detach()
            del labels, dlogits  # dropped before the fit's temporaries are formed
            fitted = fit_head(head_fn, loss_on_logits, params, h, targets, l2=l2)
            grad_logits = vmap(torch.func.grad(loss_on_logits))
            dlogits = grad_logits(vmap(head_fn, in_dims=(None, 0))(fitted, h), targets)
        alpha = dlogits.div_(-2.0 * l2 * h.shape[0])
        for what, t in (("penultimate features", h), ("output gradients (alpha)", alpha)):
            if t.is_floating_point() and not all_finite(t):  # else a NaN state, refused later
                i = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0, 0])
                raise ValueError(_msg(func, "train", "examples whose features and output "
                                      "gradients are finite", f"NaN or inf in the {what} of "
                                      f"example {i}", "A training example (or the fitted head) "
                                      "overflows; check the data's scale."))
        return RepresenterState(h, alpha, classes, printed)

    def check_state(func: str, state, params: Params, train) -> RepresenterState:
        if not isinstance(state, RepresenterState):
            raise TypeError(_msg(func, "state", "the RepresenterState returned by representer's "
                                 "prepare", type(state).__name__))
        H, alpha, classes = state.features, state.alpha, state.classes
        for arg, t, ndim in (("features", H, 2), ("alpha", alpha, 2), ("classes", classes, 1)):
            if not isinstance(t, Tensor) or t.ndim != ndim or t.shape[0] != H.shape[0] \
                    or t.is_floating_point() != (arg != "classes") \
                    or (t.is_floating_point() and not all_finite(t)):
                got = (f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, Tensor)
                       else type(t).__name__)
                raise ValueError(_msg(func, "state", f"a RepresenterState of finite floating "
                                      f"features [n, F], alpha [n, K] and integer classes [n] "
                                      f"(n = {H.shape[0] if isinstance(H, Tensor) and H.ndim else '?'})",
                                      f"{arg} {got}", "Use the state prepare returned."))
        check_cached_train(func, train, H.shape[0], rows=state.train_print)
        device = device_of(params)
        return RepresenterState(H.to(device), alpha.to(device), classes.to(device),
                                state.train_print)

    def stored(func: str, state: RepresenterState, train, n: int, row_fn) -> Tensor | None:
        """The train side through a feature store (None when ``train`` is not one): a
        recording's rows ``row_fn(lo, hi)`` come from the state, aligned with its data's
        batches and bound to the state's hash; an opened store must carry that hash."""
        from ..store import (
            FeatureStore,
            StoreRecording,
            build_store,
            check_store_state,
            state_hash,
        )

        if isinstance(train, FeatureStore):
            check_store_state(func, train, state)
            return train
        if not isinstance(train, StoreRecording):
            return None

        def served(batch, at):  # the state's rows of this batch; the data is only hashed
            b = batch_size(func, "train", batch)
            if at + b > n:
                raise ValueError(_msg(func, "train", f"the {n} training examples the state was "
                                      "prepared on", "more rows", "Record the training set "
                                      "prepare was given, in its order."))
            return row_fn(at, at + b)

        store = build_store(train.path, served, train.data, params=None, config=train.config,
                            shard_rows=train.shard_rows, block_rows=train.block_rows, func=func,
                            _params_hash=train.params_hash, _with_offset=True,
                            _state_hash=state_hash(state, func=func))
        if store.n_rows != n:
            raise ValueError(_msg(func, "train", f"the {n} training examples the state was "
                                  "prepared on", f"{store.n_rows} examples", "Record the training "
                                  "set prepare was given, in its order."))
        return store

    def score(params: Params, state: RepresenterState, train, test, *,
              top_k: int | None = None, largest: bool = True) -> Tensor | TopK:
        func = f"{name}.score"
        params = check_params(func, "params", params)
        check_optional_int(func, "top_k", top_k)
        store_rows = None
        if _is_store(train):
            H, alpha, _ = check_state(func, state, params, None)[:3]
            width = H.shape[1] + alpha.shape[1]
            # stored rows [h_i | alpha_i]: s_ij = alpha_i[c_j] <h_i, h_j> needs nothing else
            store_rows = stored(func, state, train, H.shape[0],
                                lambda lo, hi: torch.cat([H[lo:hi], alpha[lo:hi]], 1))
            if store_rows.manifest.get("row_shape") != [width]:
                raise ValueError(_msg(func, "train", f"a store of rows [h | alpha] of width "
                                      f"{width}", f"{store_rows.manifest.get('row_shape')}",
                                      "It was built by another method."))
        else:
            H, alpha, _ = check_state(func, state, params, train)[:3]
        (n, F), K = H.shape, max(2, alpha.shape[1])  # one logit: classes 0 and 1

        def check_test(h_test: Tensor, c_test: Tensor) -> None:
            if h_test.shape[1] != F:
                raise ValueError(_msg(func, "test", f"penultimate features of size F={F} like "
                                      "the state's", f"size {h_test.shape[1]}",
                                      "Prepare the state with the same model."))
            if bool(((c_test < 0) | (c_test >= K)).any()):
                raise ValueError(_msg(func, "test", f"classes in [0, {K})",
                                      f"range [{int(c_test.min())}, {int(c_test.max())}]"))

        step = n if chunk_size is None else chunk_size
        m = _count(func, test)
        if top_k is None and store_rows is None and m:
            # Columns of the scores as the test rows come, a quarter of them at a time: the
            # test features are never held whole, no [n, m] temporary beside the output.
            out, at = H.new_empty(n, m), [0]

            def columns(part) -> None:
                h_c, c_c = part
                check_test(h_c, c_c)
                cols = out[:, at[0]:at[0] + h_c.shape[0]]
                for a in range(0, n, step):
                    torch.mm(H[a:a + step], h_c.T, out=cols[a:a + step])
                _scale(cols, alpha, c_c, n * m // 32)
                at[0] += h_c.shape[0]

            rows(func, "test", params, test, sink=columns, most=-(-m // 4))
            return out
        h_test, c_test = rows(func, "test", params, test)
        check_test(h_test, c_test)
        if store_rows is None:
            parts = ((a, H[a:a + step], alpha[a:a + step]) for a in range(0, n, step))
        else:
            def parts_of(store):
                a = 0
                for blk in store.blocks(h_test.device):
                    yield a, blk[:, :F], blk[:, F:]
                    a += blk.shape[0]

            parts = parts_of(store_rows)
        blocks, best = [], None
        for a, Hb, alpha_b in parts:
            block = Hb @ h_test.T
            _scale(block, alpha_b, c_test, block.numel() // 16)
            if top_k is None:
                blocks.append(block)
            else:
                best = merge_topk(best, block, a, top_k, largest)
            del block
        if top_k is not None:
            return best
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def self_score(params: Params, state: RepresenterState, train) -> Tensor:
        func = f"{name}.self_score"
        params = check_params(func, "params", params)
        store = _is_store(train)
        H, alpha, classes = check_state(func, state, params, None if store else train)[:3]
        K = max(2, alpha.shape[1])
        if bool(((classes < 0) | (classes >= K)).any()):
            raise ValueError(_msg(func, "train", f"classes in [0, {K})",
                                  f"range [{int(classes.min())}, {int(classes.max())}]"))
        if alpha.shape[1] == 1:
            diag = (H * H).sum(-1) * alpha[:, 0] * (2 * classes - 1).to(alpha.dtype)
        else:
            diag = (H * H).sum(-1) * alpha.gather(1, classes[:, None]).squeeze(1)
        # finite features whose |h_i|^2 overflows (h ~ 1e20 in float32) give an inf self-score
        diag = check_finite_self(func, diag, fix="A training example's penultimate features "
                                 "overflow; check the data's scale.")
        if not store:
            return diag
        from ..store import FeatureStore, record_self, self_scores

        if isinstance(train, FeatureStore):
            return self_scores(func, train, state=state).to(diag.device)
        n = H.shape[0]

        def served(batch, at):  # the state's self-scores of this batch's rows
            b = batch_size(func, "train", batch)
            if at + b > n:
                raise ValueError(_msg(func, "train", f"the {n} training examples the state was "
                                      "prepared on", "more rows", "Record the training set "
                                      "prepare was given, in its order."))
            return diag[at:at + b]

        out = record_self(func, train, served, state=state, with_offset=True)
        if out.shape[0] != n:
            raise ValueError(_msg(func, "train", f"the {n} training examples the state was "
                                  "prepared on", f"{out.shape[0]} examples", "Record the training "
                                  "set prepare was given, in its order."))
        return out.to(diag.device)

    return Method(prepare, score, self_score, name)
