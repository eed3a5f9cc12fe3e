"""Run a pure step over a seeded data order, keep every k-th state, and replay any segment.

    order = batch_order(n, batch_size=32, epochs=10, seed=0)      # T index tensors
    run   = train(step, params, optimizer.init(params), data, order, checkpoint_every=8)
    state = replay(step, run.checkpoints[8], data, order, start=8, stop=16)   # == state at 16

A state is the pair ``(params, opt_state)``. Step ``t`` reads the rows ``order[t]`` of ``data``
and their ``weights``. On the CPU with a fixed thread count the same ops run in the same order,
so a replay from a checkpoint reproduces the forward run bit for bit (tested with
``torch.equal``); :func:`train` and :func:`replay` share one loop for that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .._checks import _msg, batch_size, check_int, check_optional_int
from .._types import Batch, Params

State = tuple  # (params, opt_state)


class Trajectory(NamedTuple):
    """A training run: the final ``params``/``opt_state`` and ``checkpoints {t: (params,
    opt_state)}`` holding the state BEFORE step ``t`` for ``t = 0, k, 2k, ... < T`` (and ``T``)."""

    params: Params
    opt_state: Any
    checkpoints: dict[int, State]


def batch_order(n: int, *, batch_size: int | None = None, epochs: int = 1,
                seed: int = 0) -> list[Tensor]:
    """Return the rows each step reads: per epoch a fresh permutation cut into batches.

    Epoch ``e`` uses ``torch.randperm(n)`` from ``torch.Generator().manual_seed(seed)`` drawn
    ``e``-th; the last batch of an epoch holds the remainder. ``batch_size=None`` (or ``>= n``):
    full batch, ``arange(n)`` every step, no permutation.  # -> epochs * ceil(n/B) x [<=B] int64
    """
    n = check_int("batch_order", "n", n)
    bs = check_optional_int("batch_order", "batch_size", batch_size)
    epochs = check_int("batch_order", "epochs", epochs)
    seed = check_int("batch_order", "seed", seed, minimum=0)
    if bs is None or bs >= n:
        return [torch.arange(n) for _ in range(epochs)]
    g = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(epochs):
        order.extend(torch.randperm(n, generator=g).split(bs))
    return order


def take(data: Batch, rows: Tensor) -> Batch:
    """Return the rows ``rows`` of every tensor of ``data`` (leading dimension).  # [n,...] -> [B,...]"""
    return tree_map(lambda t: t[rows.to(t.device)] if isinstance(t, Tensor) else t, data)


def check_run(func: str, data: Batch, order: Sequence[Tensor], weights: Tensor | None):
    """Validate ``data``/``order``/``weights`` once; return ``(n, weights [n])``."""
    n = batch_size(func, "data", data)
    if not isinstance(order, Sequence) or not order:
        raise ValueError(_msg(func, "order", "a non-empty list of index tensors (batch_order)",
                              type(order).__name__))
    for t, rows in enumerate(order):
        if not isinstance(rows, Tensor) or rows.ndim != 1 or rows.is_floating_point():
            raise ValueError(_msg(func, f"order[{t}]", "a 1-d integer index tensor",
                                  repr(getattr(rows, "shape", type(rows).__name__))))
    lo, hi = min(int(r.min()) for r in order), max(int(r.max()) for r in order)
    if lo < 0 or hi >= n:
        raise ValueError(_msg(func, "order", f"indices in [0, {n})", f"min {lo}, max {hi}"))
    leaf = next(t for t in torch.utils._pytree.tree_leaves(data) if isinstance(t, Tensor))
    if weights is None:
        return n, torch.ones(n, device=leaf.device)
    if not isinstance(weights, Tensor) or weights.shape != (n,):
        raise ValueError(_msg(func, "weights", f"a tensor of shape ({n},)",
                              repr(getattr(weights, "shape", type(weights).__name__))))
    return n, weights


def run_steps(step: Callable, state: State, data: Batch, order: Sequence[Tensor],
              weights: Tensor, start: int, stop: int, *, every: int | None = None,
              keep: dict | None = None) -> State:
    """Apply steps ``start..stop-1`` to ``state``; store the state before each step ``t`` with
    ``t % every == 0`` in ``keep``. The one loop both :func:`train` and :func:`replay` run."""
    params, opt_state = state
    for t in range(start, stop):
        if keep is not None and every is not None and t % every == 0:
            keep[t] = (params, opt_state)
        rows = order[t]
        params, opt_state = step(params, opt_state, take(data, rows), weights[rows.to(weights.device)])
    return params, opt_state


def train(step: Callable, params: Params, opt_state, data: Batch, order: Sequence[Tensor], *,
          weights: Tensor | None = None, checkpoint_every: int | None = None) -> Trajectory:
    """Return the :class:`Trajectory` of ``T = len(order)`` steps from ``(params, opt_state)``.

    Step ``t``: ``(params, opt_state) <- step(params, opt_state, data[order[t]],
    weights[order[t]])``. Memory: the current state plus ``ceil(T / k)`` checkpoints for
    ``checkpoint_every = k`` (None: only the initial and final states).

    Args:
        step: a pure step (:func:`~dattri_fn.training.make_step`).
        params, opt_state: the initial state (``optimizer.init(params)``).
        data: a Batch of all ``n`` training examples.
        order: the rows of each step (:func:`batch_order`).
        weights: ``[n]`` per-example weights in the loss (default ones: the ordinary run).
        checkpoint_every: ``k``; keep the state before every ``k``-th step.
    """
    _, weights = check_run("train", data, order, weights)
    every = check_optional_int("train", "checkpoint_every", checkpoint_every)
    T = len(order)
    keep: dict[int, State] = {0: (params, opt_state)}
    with torch.no_grad():
        params, opt_state = run_steps(step, (params, opt_state), data, order, weights, 0, T,
                                      every=every, keep=keep)
    keep[T] = (params, opt_state)
    return Trajectory(params, opt_state, keep)


def replay(step: Callable, state: State, data: Batch, order: Sequence[Tensor], *, start: int,
           stop: int, weights: Tensor | None = None) -> State:
    """Return the state after steps ``start..stop-1`` from ``state`` (the state before
    ``start``), the same loop as :func:`train`: bit-identical to the forward run on the CPU."""
    _, weights = check_run("replay", data, order, weights)
    start = check_int("replay", "start", start, minimum=0)
    stop = check_int("replay", "stop", stop, minimum=start)
    if stop > len(order):
        raise ValueError(_msg("replay", "stop", f"at most len(order) = {len(order)}", repr(stop)))
    with torch.no_grad():
        return run_steps(step, state, data, order, weights, start, stop)
