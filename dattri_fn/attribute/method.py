"""The shape every attribution method shares, and checkpoint stacking for ensembles.

A method is an optax-style NamedTuple of pure functions, with its configuration bound by the
factory that built it (``grad_dot(loss, proj_dim=512)``, ``influence(loss, solver="cg")``...):

    state  = method.prepare(params, train)                 # curvature, kernels, factorisations
    scores = method.score(params, state, train, test)      # [n_train, n_test]
    diag   = method.self_score(params, state, train)       # [n_train], == diag of the above

``params`` is one params dict or, for ensemble methods, a list of them (checkpoints or
independently trained models, all with the same keys and shapes). ``train`` and ``test`` are one
Batch or a re-iterable of Batches. Scores: positive = up-weighting train ``i`` lowers test ``j``'s
loss (a proponent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import check_params
from .._types import Batch, Loss, Params
from ..transforms.grad import Refuse, per_sample_grad_unchecked
from ..tree import ravel_batched


class Method(NamedTuple):
    """``prepare(params, train) -> state``; ``score(params, state, train, test, *, top_k=None)``;
    ``self_score(params, state, train)``; ``name`` for tables and errors."""

    prepare: Callable[..., Any]
    score: Callable[..., Any]
    self_score: Callable[..., Tensor]
    name: str


def check_checkpoints(func: str, checkpoints: Params | Sequence[Params]) -> list[Params]:
    """Return the checkpoints as a list of validated params dicts (one dict: a list of one).

    Raises a ValueError naming the first checkpoint whose keys or shapes differ from the first.
    """
    if isinstance(checkpoints, dict):
        checkpoints = [checkpoints]
    if not isinstance(checkpoints, Sequence) or not checkpoints:
        raise TypeError(f"{func}(params=...): expected a params dict or a non-empty list of them, "
                        f"got {type(checkpoints).__name__}.")
    first = check_params(func, "params[0]", checkpoints[0])
    out = [first]
    for c, ckpt in enumerate(checkpoints[1:], start=1):
        ckpt = check_params(func, f"params[{c}]", ckpt)
        if list(ckpt) != list(first):
            raise ValueError(f"{func}(params[{c}]=...): expected the keys of params[0] "
                             f"{list(first)}, got {list(ckpt)}.")
        bad = [k for k in first if ckpt[k].shape != first[k].shape]
        if bad:
            raise ValueError(f"{func}(params[{c}]=...): expected the shapes of params[0], "
                             f"mismatch at {bad}.")
        out.append(ckpt)
    return out


def stack_checkpoints(func: str, checkpoints: Params | Sequence[Params]) -> Params:
    """Return ``{name: [C, *shape]}`` from one params dict (C = 1) or a list of them, validated
    by :func:`check_checkpoints`."""
    checkpoints = check_checkpoints(func, checkpoints)
    return {k: torch.stack([c[k].detach() for c in checkpoints]) for k in checkpoints[0]}


def loss_and_plan(func: str, arg: str, fn):
    """Return ``(per-example loss, LayerPlan or None)`` for a function or a FunctionalModel.

    A FunctionalModel's Linear layers get a plan (:func:`~dattri_fn.transforms.layer_grads.layer_plan`):
    their per-example gradients then come from one batched backward instead of ``vmap(grad)``.
    """
    from ..model import FunctionalModel, check_eval
    from ..transforms.layer_grads import layer_plan

    if isinstance(fn, FunctionalModel):
        check_eval(func, arg, fn)  # train-mode Dropout: random gradients (review RU M3)
        if fn.loss_fn is None:
            raise ValueError(f"{func}({arg}=...): expected a FunctionalModel built with a "
                             f"loss_fn, got loss_fn=None.")
        return fn.loss, layer_plan(fn)
    if not callable(fn):
        raise TypeError(f"{func}({arg}=...): expected a per-example function (params, example) "
                        f"-> Tensor[] or a FunctionalModel, got {type(fn).__name__}.")
    check_eval(func, arg, fn)  # fm.loss of a checkpointing module (review RU5 M1)
    return fn, None


def num_checkpoints(stacked: Params) -> int:
    return next(iter(stacked.values())).shape[0]


def device_of(params: Params) -> torch.device:
    return next(iter(params.values())).device


def stacked_per_sample_grad(loss: Loss, stacked: Params, batch: Batch, *,
                            chunk_size: int | None = None,
                            refuse: Refuse | tuple | None = None) -> Tensor:
    """Return per-sample gradients at every checkpoint, vmapped over C.  # -> [C, B, P]

    ``refuse``: the :class:`~dattri_fn.transforms.grad.Refuse` ``(method, argument)`` named if
    vmap cannot run the model (:func:`~dattri_fn.transforms.grad.per_sample_grad_unchecked`)."""
    per_ckpt = lambda p: per_sample_grad_unchecked(loss, p, batch, chunk_size=chunk_size,
                                                   refuse=refuse)
    if num_checkpoints(stacked) == 1:
        # One checkpoint: skip the outer vmap level (it doubled Grad-Dot's time on digits-mlp).
        one = per_ckpt({k: v[0] for k, v in stacked.items()})
        return ravel_batched(one).unsqueeze(0)
    return ravel_batched(vmap(per_ckpt)(stacked), batch_dims=2)


class Attributor:
    """dattri-style verbs over a pure :class:`Method`, for users migrating from dattri.

    ``cache(train)`` = ``prepare``; ``attribute(train, test)`` = ``score``;
    ``self_attribute(train)`` = ``self_score``. The only state is the ``state`` it caches, which
    is also returned, so the pure pair stays one call away (``attributor.method``).
    """

    def __init__(self, method: Method, params):
        if not isinstance(method, Method):
            raise TypeError(f"Attributor(method=...): expected a Method from a factory such as "
                            f"influence(...) or trak(...), got {type(method).__name__}.")
        self.method, self.params, self.state = method, params, None

    def cache(self, train):
        """Run ``prepare`` once and keep its state.  # -> state"""
        self.state = self.method.prepare(self.params, train)
        return self.state

    def _state(self, train):
        return self.state if self.state is not None else self.cache(train)

    def attribute(self, train, test, *, top_k: int | None = None):
        """Return ``[n_train, n_test]`` scores (or a TopK); caches on first use."""
        return self.method.score(self.params, self._state(train), train, test, top_k=top_k)

    def self_attribute(self, train) -> Tensor:
        """Return the ``[n_train]`` self-influence (the diagonal)."""
        return self.method.self_score(self.params, self._state(train), train)
