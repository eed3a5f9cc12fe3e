"""Dropout ensembles of any method: member m is the whole method run with counter-hash mask m fixed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .._checks import _msg, check_int, check_optional_int
from ..model import FunctionalModel, bridge_of, check_bridged
from .method import Method
from .pipeline import merge_topk

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
                  usage: dict, own_fixed: bool = False) -> FunctionalModel:
    """``model`` with a module whose every forward runs under member ``member``'s masks.

    The module is a shallow copy (the same parameters, buffers and submodules) whose class
    overrides ``forward`` only, so ``functional_call`` and the capture engine (K-FAC, EK-FAC,
    LoGra, factored Grad-Dot) run it as they run the original, with the masks fixed.
    ``own_fixed``: keep the fixed tensors read from the module (``model.fixed`` holds equal
    values in other storage: a deep copy).
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
    # _dropout_fixed: model.check_eval passes this train-mode module (its masks are fixed)
    module.__class__ = type(f"DropoutMember{base.__name__}", (base,),
                            {"forward": forward, "_dropout_fixed": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train-mode dropout is the point here
        masked = functional_model(module, model.loss_fn, params=list(model.params),
                                  unpack=model.unpack)
    return masked._replace(params=model.params, fixed=masked.fixed if own_fixed else model.fixed)


def _copy_of_own(fn: FunctionalModel) -> bool:
    """Whether ``fn`` is a copy of a model (``copy.deepcopy``): functional_model's loss for its
    loss_fn and unpack, another module object, and ``fixed`` equal to that module's own
    unselected parameters and buffers. Its module, rebuilt, is then the model it describes."""
    bound = bridge_of(fn.loss)
    if bound is None or bound.loss_fn is not fn.loss_fn or bound.unpack is not fn.unpack \
            or bound.module is fn.module:
        return False
    own = {n: p for n, p in fn.module.named_parameters() if n not in fn.params}
    own.update(fn.module.named_buffers())
    return own.keys() == fn.fixed.keys() and all(
        (v.shape, v.dtype, v.device) == (fn.fixed[k].shape, fn.fixed[k].dtype, fn.fixed[k].device)
        and torch.equal(v.detach(), fn.fixed[k]) for k, v in own.items())


def _masked(fn, *, seed: int, member: int, usage: dict):
    """``fn`` (a function, or a FunctionalModel: :func:`_masked_model`) run under member
    ``member``'s masks, the dropout counter restarting at every call."""
    if isinstance(fn, FunctionalModel):
        # the masked model is rebuilt from module and loss_fn: a replaced loss (or other fixed
        # tensors) would be dropped silently; a deep copy is rebuilt as it is (review RF L2)
        copied = _copy_of_own(fn)
        if not copied:
            check_bridged("dropout_members", "build", fn, " passed to mask(...)",
                          "; or mask its loss, mask(model.loss)")
        return _masked_model(fn, seed=seed, member=member, usage=usage, own_fixed=copied)
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
