"""Dropout ensembles: one checkpoint, M dropout masks, the attribution averaged over the masks.

Deng et al. (2024) replace an ensemble of independently trained models by ONE trained model
seen through M dropout masks: member ``m`` is the network with mask ``m`` fixed, and its
gradient features ``g_i^m = grad_theta loss_m(theta, z_i)`` enter the method as if from M
models. For Grad-Dot (and Grad-Cos) this gives

    s_ij = (1/M) sum_m <g_i^m, g_j^m>         (cos: each pair normalised per mask)

The masks come from torch's own dropout (``nn.Dropout`` in train mode, ``F.dropout(...,
training=True)``) under ``vmap(randomness="different")`` over the members and
``randomness="same"`` over examples: every example of member ``m`` sees the same mask. The
global RNG is reset to ``seed`` (inside ``fork_rng``, so the caller's stream is untouched) before
every batch, and the draws do not depend on the batch size, so train and test batches, chunks and
repeated calls all see the same M networks.

:func:`dropout_members` makes the same ensemble of ANY method (influence, TRAK, representer
points...): member ``m`` is the whole method run on the network with mask ``m`` fixed, and the
scores are averaged. Its masks come from a counter hash (:func:`dropout_mask`), not the RNG,
so they survive every transform a method applies (vmaps that refuse random draws, hvps, chunks).

:func:`dropout_members` and its masks live in :mod:`.dropout_masks`; they stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import _msg, check_int, check_params, iter_batches
from .._types import Loss, Params
from ..model import FunctionalModel
from ..tree import ravel_batched
from .dropout_masks import MembersState, dropout_mask, dropout_members  # noqa: F401
from .method import Method, check_checkpoints, device_of
from .pipeline import collect, in_chunks, stream_scores, stream_self


def _is_store(data) -> bool:
    from ..store import FeatureStore, StoreRecording

    return isinstance(data, (FeatureStore, StoreRecording))


def dropout_outputs(fn: Callable[[Params, Any], Any], params: Params, batch, *, n_masks: int,
                    seed: int = 0) -> Any:
    """Return ``fn(params, z)`` under each of ``n_masks`` dropout masks, for every example.

    # -> pytree of [n_masks, B, ...]

    Member ``m`` uses one mask for all examples; the same ``seed`` gives the same masks for any
    batch of examples whose forward draws the same per-example shapes (see the module note).
    """
    leaf = next(iter(params.values()))
    devices = [leaf.device] if leaf.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        per_member = lambda _: vmap(fn, in_dims=(None, 0), randomness="same")(params, batch)
        return vmap(per_member, randomness="different")(torch.arange(n_masks))


def dropout_grads(loss: Loss, params: Params, batch, *, n_masks: int, seed: int = 0) -> Tensor:
    """Return per-example gradients under each dropout mask, raveled.  # -> [n_masks, B, P]"""
    grads = dropout_outputs(torch.func.grad(loss), params, batch, n_masks=n_masks, seed=seed)
    return ravel_batched(grads, batch_dims=2)


def dropout_ensemble(loss: Loss | FunctionalModel, *, n_masks: int, seed: int = 0,
                     target: Loss | FunctionalModel | None = None, normalize: bool = False,
                     lrs: Sequence[float] | None = None,
                     chunk_size: int | None = None) -> Method:
    """Return the dropout-ensemble Grad-Dot: ``s_ij = (1/M) sum_m <g_i^m, g_j^m>``.  # -> [n_train, n_test]

    ``g^m`` is the gradient of ``loss`` at ONE checkpoint ``params`` under dropout mask ``m``
    (``M = n_masks``, drawn from ``seed``; see the module note). ``normalize=True`` gives the
    dropout-ensemble Grad-Cos, ``(1/M) sum_m cos(g_i^m, g_j^m)`` (a zero gradient scores 0).
    With ``lrs``, ``params`` is a list of C checkpoints and the method is the dropout-ensemble
    TracIn (TracIn-Cos with ``normalize``): ``sum_c lr_c (1/M) sum_m <g_i^{c,m}, g_j^{c,m}>``,
    the same M masks at every checkpoint.
    ``self_score`` is the diagonal. The loss must apply dropout at attribution time (a module in
    ``train()`` mode, or ``F.dropout(..., training=True)``): ``prepare`` refuses a loss whose
    members agree on the first training example.

    Args:
        loss: per-example loss ``loss(params, example) -> Tensor[]`` with dropout inside, or a
            FunctionalModel (its ``loss``; its module in train mode).
        n_masks: the number ``M >= 1`` of dropout masks (ensemble members).
        seed: seed of the masks (same seed, same members, on every call).
        target: test-side function (default ``loss``); it must draw its dropout masks in the
            same order and shapes as ``loss`` (the same forward) so that member ``m`` is the same
            network on both sides.
        normalize: cosine per mask instead of the inner product.
        lrs: None (one checkpoint) or the learning rate in effect at each checkpoint of the
            params list, each > 0.
        chunk_size: examples per vmapped call (bounds memory to ``M x chunk x P``).

    References:
        Deng, Tang, Tian, Wang, Hu & Ma, "Efficient Ensembles Improve Training Data
        Attribution", 2024, arXiv 2405.17293 (dropout ensembles); Gal & Ghahramani 2016,
        arXiv 1506.02142 (dropout as an ensemble).
    """
    name = "dropout_ensemble"
    n_masks = check_int(name, "n_masks", n_masks)
    seed = check_int(name, "seed", seed, minimum=0)
    if chunk_size is not None:
        check_int(name, "chunk_size", chunk_size)
    fns = []
    for arg, fn in (("loss", loss), ("target", loss if target is None else target)):
        if isinstance(fn, FunctionalModel):
            fn = fn.loss
        if not callable(fn):
            raise TypeError(_msg(name, arg, "a per-example function (params, example) -> "
                                 "Tensor[] or a FunctionalModel", type(fn).__name__))
        fns.append(fn)
    train_fn, test_fn = fns
    if lrs is not None:
        from .gradsim import _learning_rates

        lrs = _learning_rates(lrs, name).tolist()
        if any(not lr > 0 for lr in lrs):
            raise ValueError(_msg(name, "lrs", "learning rates > 0", repr(lrs)))

    def checkpoints(params) -> list[Params]:
        """``[params]`` (no ``lrs``) or the validated list of C = len(lrs) checkpoints."""
        if lrs is None:
            return [check_params(name, "params", params)]
        if isinstance(params, dict) or not isinstance(params, Sequence):
            raise TypeError(_msg(name, "params", f"a list of {len(lrs)} checkpoints (one per "
                                 "learning rate)", type(params).__name__))
        if len(params) != len(lrs):
            raise ValueError(_msg(name, "params", f"{len(lrs)} checkpoints (one per learning "
                                  "rate)", f"{len(params)}"))
        check_checkpoints(name, list(params))
        return list(params)

    def features(fn, ckpts: list[Params], weights: list[float] | None = None):
        def rows(batch) -> Tensor:  # [C M, B, P]
            parts = []
            for c, params in enumerate(ckpts):
                G = dropout_grads(fn, params, batch, n_masks=n_masks, seed=seed)
                if normalize:
                    sq = (G * G).sum(-1, keepdim=True)
                    pos = sq > 0
                    G = G * torch.where(pos, sq.where(pos, 1).rsqrt(), 0)
                parts.append(G if weights is None else G * weights[c])
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return in_chunks(rows, chunk_size)

    def train_features(ckpts: list[Params]):
        weights = [1 / n_masks] if lrs is None else [lr / n_masks for lr in lrs]
        return features(train_fn, ckpts, weights)

    def check_first(arg: str, fn, params: Params, batches):
        """``fn(params, example 0)`` eagerly, outside the vmaps: torch's errors on the examples
        and parameter names the loss does not find are reported against ``arg``/``params``.
        ``batches`` is the :func:`iter_batches` view the method then reads: its first batch is
        peeked, not consumed (a loader readable once loses nothing)."""
        from .._checks import batch_size, batch_to, blame_data, blame_keys, peek
        from .boundary import first_example

        batch = peek(batches)
        if batch is None:
            raise ValueError(_msg(name, arg, "at least one batch", "an empty iterable"))
        batch_size(name, arg, batch)
        batch = batch_to(batch, device_of(params))
        with blame_data(name, arg, batch), blame_keys(name, "params", params):
            out = fn(params, first_example(batch))
        if not isinstance(out, Tensor) or out.ndim != 0:
            got = f"shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(_msg(name, "loss" if fn is train_fn else "target",
                                  "a per-example function returning a scalar", got))
        return batch

    def prepare(params, train) -> tuple:
        from .._checks import batch_slice

        params = checkpoints(params)[0]
        first = check_first("train", train_fn, params, iter_batches(name, "train", train))
        if n_masks > 1:
            losses = dropout_outputs(train_fn, params, batch_slice(first, 0, 1), n_masks=n_masks,
                                     seed=seed)
            if bool((losses == losses[:1]).all()):
                raise ValueError(_msg(name, "loss", "a loss that applies dropout (a module in "
                                      "train() mode, or F.dropout(..., training=True))",
                                      f"the same value under all {n_masks} masks"))
        return ()

    def score(params, state, train, test, *, top_k: int | None = None, largest: bool = True):
        ckpts = checkpoints(params)
        test = iter_batches(name, "test", test)
        check_first("test", test_fn, ckpts[0], test)
        if not _is_store(train):
            train = iter_batches(name, "train", train)
            check_first("train", train_fn, ckpts[0], train)
        test_feats = collect(features(test_fn, ckpts), test, device=device_of(ckpts[0]),
                             func=name, arg="test")
        return stream_scores(train_features(ckpts), train, test_feats, top_k=top_k,
                             largest=largest, func=name)

    def self_score(params, state, train) -> Tensor:
        ckpts = checkpoints(params)
        if not _is_store(train):
            train = iter_batches(name, "train", train)
            check_first("train", train_fn, ckpts[0], train)
        return stream_self(train_features(ckpts), features(test_fn, ckpts), train,
                           device=device_of(ckpts[0]), func=name)

    return Method(prepare, score, self_score, name)
