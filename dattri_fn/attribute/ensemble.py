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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from .._checks import _msg, check_int, check_optional_int, check_params, iter_batches
from .._types import Loss, Params
from ..model import FunctionalModel
from ..tree import ravel_batched
from .method import Method, check_checkpoints, device_of
from .pipeline import collect, in_chunks, merge_topk, stream_scores, stream_self


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


# -- dropout members for any method -------------------------------------------------------------
# Every method runs its functions under its own vmaps (randomness="error": a draw from torch's
# RNG there raises), hvps, capture engines and chunks, so member m's masks cannot come from the
# RNG. They come from a counter-based hash instead: mask entry e of the c-th dropout call of a
# forward of member m is a pure function of (seed, m, c, e) -- the same on every call, batch,
# chunk, vmap level and device, and one mask for all examples of a member.
_M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer finaliser (xor-shift-multiply), on Python ints or int64 tensors whose
    values are in [0, 2**32): multipliers below 2**31 keep every product under 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def dropout_mask(shape, p: float, *, seed: int, member: int, call: int,
                 device=None) -> Tensor:
    """Return the keep-mask of the ``call``-th dropout of a forward of member ``member``.  # -> bool [*shape]

    Entry ``e`` (row-major) is kept when ``u_e >= p``, ``u_e = h(seed, member, call, e) / 2**32``
    with ``h`` a 32-bit counter hash: keep-probability ``1 - p`` (to 2**-32), independent-looking
    entries, and no RNG state. :func:`dropout_members` applies ``x * mask / (1 - p)`` where the
    member's functions call ``F.dropout(x, p, training=True)`` on an ``x`` of this shape (the
    shape of ONE example under the method's vmaps).
    """
    n = math.prod(shape)
    key_a = _mix((seed * 0x9E3779B1 + 0x632BE5AB) & _M32)
    key_b = _mix((_mix((member * 0x85EBCA77 + key_a) & _M32) ^ (call * 0x27D4EB2F)) & _M32)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    h = _mix(_mix((idx + key_a) & _M32) ^ key_b)
    return (h.to(torch.float64) / 2.0**32 >= p).reshape(tuple(shape))


_REFUSED = ("dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")


class _Masks(TorchFunctionMode):
    """While active, ``F.dropout``/``torch.dropout`` apply member ``member``'s fixed masks.

    One instance per forward (see :func:`_masked`), so the call counter restarts at every
    call of the masked function: the c-th dropout of every forward is the same network.
    """

    def __init__(self, seed: int, member: int, usage: dict, batched: bool = False):
        super().__init__()
        self.seed, self.member, self.usage, self.call = seed, member, usage, 0
        # A module is called on batches (a batch of one per example): dim 0 is the batch
        # and the mask covers the rest, the same flat entries as the per-example [*shape].
        self.batched = batched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout or func is torch.dropout:
            names = ("input", "p", "training" if func is F.dropout else "train", "inplace")
            bound = dict(zip(names, args, strict=False), **kwargs)
            x, p = bound["input"], float(bound.get("p", 0.5))
            training = bound.get("training", bound.get("train", True))
            if not training or p == 0.0:
                return func(*args, **kwargs)  # the identity: nothing random to fix
            self.usage["dropout"] += 1
            shape = x.shape[1:] if self.batched and x.ndim > 0 else x.shape
            keep = dropout_mask(shape, p, seed=self.seed, member=self.member, call=self.call,
                                device=x.device)
            self.call += 1
            if p >= 1.0:
                return x * 0
            out = x * keep.to(x.dtype) / (1 - p)
            return x.copy_(out) if bound.get("inplace") else out
        if getattr(func, "__name__", None) in _REFUSED and getattr(func, "__module__", "") in (
                "torch.nn.functional", "torch"):
            raise ValueError(_msg("dropout_members", "build", "dropout through F.dropout or "
                                  "nn.Dropout (elementwise masks)", f"F.{func.__name__}"))
        if func is F.scaled_dot_product_attention and float(
                kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)) > 0:
            raise ValueError(_msg("dropout_members", "build", "attention without dropout_p "
                                  "(its mask is drawn inside the kernel)", "dropout_p > 0",
                                  "Pass dropout_p=0.0 at attribution time."))
        return func(*args, **kwargs)


def _masked_model(model: FunctionalModel, *, seed: int, member: int,
                  usage: dict) -> FunctionalModel:
    """``model`` with a module whose every forward runs under member ``member``'s masks.

    The module is a shallow copy (the same parameters, buffers and submodules) whose class
    overrides ``forward`` only, so ``functional_call`` and the capture engine (K-FAC, EK-FAC,
    LoGra, factored Grad-Dot) run it as they run the original, with the masks fixed.
    """
    import copy
    import warnings

    from ..model import functional_model

    base = type(model.module)

    def forward(self, *args, **kwargs):
        usage["calls"] += 1
        with _Masks(seed, member, usage, batched=True):
            return base.forward(self, *args, **kwargs)

    module = copy.copy(model.module)
    module.__class__ = type(f"DropoutMember{base.__name__}", (base,), {"forward": forward})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train-mode dropout is the point here
        masked = functional_model(module, model.loss_fn, params=list(model.params),
                                  unpack=model.unpack)
    return masked._replace(params=model.params, fixed=model.fixed)


def _masked(fn, *, seed: int, member: int, usage: dict):
    """``fn`` (a function, or a FunctionalModel: :func:`_masked_model`) run under member
    ``member``'s masks, the dropout counter restarting at every call."""
    if isinstance(fn, FunctionalModel):
        return _masked_model(fn, seed=seed, member=member, usage=usage)
    if not callable(fn):
        raise TypeError(_msg("dropout_members", "build", "a builder that passes callables to "
                             "mask(...)", type(fn).__name__))

    def masked(*args, **kwargs):
        usage["calls"] += 1
        with _Masks(seed, member, usage):
            return fn(*args, **kwargs)

    return masked


class MembersState(NamedTuple):
    """What :func:`dropout_members`' ``prepare`` returns: one state per member, in order."""

    states: tuple


def dropout_members(build: Callable[[Callable], Method], *, n_masks: int,
                    seed: int = 0) -> Method:
    """Return the dropout ensemble of ANY method: ``s_ij = (1/M) sum_m s^m_ij``.  # -> [n_train, n_test]

    ``s^m`` is the method ``build(mask_m)`` returns, run in full (prepare, curvature, kernels,
    features) with member ``m``'s dropout masks fixed: ``mask_m(fn)`` wraps a function of the
    method (a loss, TRAK's output and weight functions, a representer's ``feature_fn``) so that
    each ``F.dropout(x, p, training=True)`` / ``nn.Dropout`` in train mode inside it multiplies by
    the fixed mask ``dropout_mask(x.shape, p, seed=seed, member=m, call=c) / (1 - p)`` of its
    ``c``-th dropout call (one mask for every example of a member, train and test alike).
    ``self_score`` is the mean of the members' (the diagonal); ``top_k`` ranks the mean.
    Costs ``M`` runs of the method: it is the ensemble of ``M`` sub-networks of ONE trained
    model (no retraining), which is where the saving of the paper lies.

        >>> ens = dropout_members(lambda mask: influence(mask(loss), solver="cg", damping=0.1),
        ...                       n_masks=4, seed=0)
        >>> ens = dropout_members(lambda mask: trak(mask(margin), weight_fn=mask(weight)), n_masks=4)

    Args:
        build: ``mask -> Method``; every function whose dropout should be fixed must pass through
            ``mask``. ``mask(fm)`` of a FunctionalModel returns one whose module runs every
            forward under the masks (a batched call masks all rows alike), so the factored
            paths (capture engine, K-FAC/EK-FAC, LoGra) take dropout members too.
        n_masks: ``M >= 1`` members.
        seed: seed of the masks (same seed, same members, on every call and device).

    Raises:
        ValueError/TypeError: naming the argument: a bad setting; a builder whose methods call
            no function passed through ``mask`` or apply no dropout in them (every member would
            be the same network), dropout other than elementwise ``F.dropout``; a feature store
            as ``train`` (its features are one network's).

    References:
        Deng, Tang, Tian, Wang, Hu & Ma, "Efficient Ensembles Improve Training Data
        Attribution", 2024, arXiv 2405.17293.
    """
    name = "dropout_members"
    if not callable(build):
        raise TypeError(_msg(name, "build", "a function mask -> Method", type(build).__name__))
    n_masks = check_int(name, "n_masks", n_masks)
    seed = check_int(name, "seed", seed, minimum=0)
    usage = {"calls": 0, "dropout": 0}
    members = []
    for m in range(n_masks):
        method = build(lambda fn, m=m: _masked(fn, seed=seed, member=m, usage=usage))
        if not isinstance(method, Method):
            raise TypeError(_msg(name, "build", "a function returning a Method (e.g. influence("
                                 "mask(loss), ...))", type(method).__name__))
        members.append(method)

    def checked(func: str, out):
        """``out`` once the members have run; refuse members that cannot differ."""
        if usage["calls"] and not usage["dropout"]:
            raise ValueError(_msg(name, "build", "masked functions that apply dropout (a module "
                                  "in train() mode, or F.dropout(..., training=True))",
                                  "no dropout call in them"))
        return out

    def refuse_stores(func: str, train) -> None:
        from ..store import FeatureStore, StoreRecording

        if isinstance(train, (FeatureStore, StoreRecording)):
            raise TypeError(_msg(func, "train", "training data (each member has its own "
                                 "features; a store holds one network's)", type(train).__name__))

    def check_state(func: str, state) -> tuple:
        if not isinstance(state, MembersState) or len(state.states) != n_masks:
            raise TypeError(_msg(func, "state", f"the MembersState of its prepare ({n_masks} "
                                 "member states)", type(state).__name__))
        return state.states

    def prepare(params, train) -> MembersState:
        refuse_stores(f"{name}.prepare", train)
        return checked(name, MembersState(tuple(m.prepare(params, train) for m in members)))

    def score(params, state, train, test, *, top_k: int | None = None, largest: bool = True):
        func = f"{name}.score"
        top_k = check_optional_int(func, "top_k", top_k)
        refuse_stores(func, train)
        states = check_state(func, state)
        calls = usage["calls"]
        total = None
        for member, st in zip(members, states, strict=True):
            S = member.score(params, st, train, test)
            total = S.clone() if total is None else total.add_(S)
        if usage["calls"] == calls:
            raise ValueError(_msg(name, "build", "a method whose functions pass through mask(...)",
                                  "none called", "Wrap the loss: build=lambda mask: "
                                  "influence(mask(loss), ...)."))
        total = checked(func, total.div_(n_masks))
        return total if top_k is None else merge_topk(None, total, 0, top_k, largest)

    def self_score(params, state, train) -> Tensor:
        func = f"{name}.self_score"
        refuse_stores(func, train)
        states = check_state(func, state)
        total = None
        for member, st in zip(members, states, strict=True):
            d = member.self_score(params, st, train)
            total = d.clone() if total is None else total.add_(d)
        return checked(func, total.div_(n_masks))

    return Method(prepare, score, self_score, name)
