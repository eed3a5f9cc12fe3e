"""Pure optimizer steps with per-example data weights: ``(params, opt_state, batch, weights)``.

A training step is a pure function

    params', opt_state' = step(params, opt_state, batch, weights)

of the weighted batch objective ``L(theta) = (1/B) sum_i w_i loss(theta, z_i)`` (``w = 1`` is
the ordinary run; ``w_i = 0`` drops example ``i``). Because it is pure, a run can be replayed
bit for bit and differentiated with :func:`torch.func.vjp` with respect to ``theta``, the
optimizer state and ``w`` (see :mod:`dattri_fn.attribute.magic`).

Optimizers follow optax: :class:`Optimizer` ``(init, update, name)``, configured once by a
factory. The updates are written out in the order ``torch.optim`` uses, so a functional run
follows a ``torch.optim`` run of the same model to float round-off; Adam/AdamW go further and
run the same kernels as ``torch.optim``'s single-tensor (CPU default) step on the same operands
(``lerp``, ``addcmul``, ``addcdiv``), so on equal gradients and learning rates they give the
same bits (tested with ``torch.equal``; :func:`cosine_schedule` ``recursive=True`` gives
``CosineAnnealingLR``'s rates bit for bit):

    SGD      g <- g + wd theta;  b <- mu b + g (b = g at the first step);  theta <- theta - lr b
    Adam     g <- g + wd theta;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
             theta <- theta - lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps)
    AdamW    as Adam without the coupled ``wd theta``; first theta <- (1 - lr wd) theta

The step counter ``count`` is a Python int in the state (not a tensor): the learning rate
``lr(count)`` is then a Python float, the same in a forward run, a replay and a reverse pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vmap

from .._checks import _msg, check_int
from .._types import Batch, Loss, Params
from ..model import FunctionalModel, bridged, default_unpack
from ..module_call import call_module, shared_slots
from ..transforms.layers import per_example_losses

Schedule = Callable[[int], float]


class SGDState(NamedTuple):
    """``count`` steps taken; ``momentum`` the heavy-ball buffers (zeros before the first step)."""

    count: int
    momentum: Params


class AdamState(NamedTuple):
    """``count`` steps taken; ``mu``/``nu`` the first and second moment estimates."""

    count: int
    mu: Params
    nu: Params


class Optimizer(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params) -> (params, state)``."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]
    name: str


def _schedule(func: str, lr) -> Schedule:
    if callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(_msg(func, "lr", "a finite float >= 0 or a schedule count -> float",
                              repr(lr)))
    value = float(lr)
    return lambda count: value


def _check_rate(func: str, arg: str, value, *, upper: float | None = None) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and value >= 0 and (upper is None or value < upper))
    if not ok:
        bound = f"a float in [0, {upper:g})" if upper is not None else "a finite float >= 0"
        raise ValueError(_msg(func, arg, bound, repr(value)))
    return float(value)


def cosine_schedule(lr: float, steps: int, *, recursive: bool = False) -> Schedule:
    """Return ``t -> lr (1 + cos(pi t / steps)) / 2``: cosine decay to 0 over ``steps`` steps.

    ``recursive=False``: the closed form. ``recursive=True``: the values
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=steps)`` (``eta_min = 0``) computes in a
    loop, bit for bit: ``lr_0 = lr``, then ``lr_t = (1 + cos(pi t / steps)) / (1 + cos(pi (t-1)
    / steps)) * lr_{t-1}``, and ``lr_{t-1} + lr (1 - cos(pi / steps)) / 2`` where ``(t - 1 -
    steps) % (2 steps) == 0`` (the restart past the minimum). Both agree to float round-off;
    the recursive form lets a functional run follow a ``torch.optim`` run bit for bit.
    """
    lr = _check_rate("cosine_schedule", "lr", lr)
    steps = check_int("cosine_schedule", "steps", steps)
    if not recursive:
        return lambda t: lr * (1.0 + math.cos(math.pi * t / steps)) / 2.0
    values = [lr]

    def schedule(t: int) -> float:
        # Grown on demand; the list only caches a deterministic sequence, so the schedule stays
        # a pure function of t. Every operation and its order are CosineAnnealingLR.get_lr's.
        while len(values) <= t:
            e, prev = len(values), values[-1]
            if (e - 1 - steps) % (2 * steps) == 0:
                values.append(prev + (lr - 0.0) * (1 - math.cos(math.pi / steps)) / 2)
            else:
                values.append((1 + math.cos(math.pi * e / steps))
                              / (1 + math.cos(math.pi * (e - 1) / steps)) * (prev - 0.0) + 0.0)
        return values[t]

    return schedule


def sgd(lr: float | Schedule, *, momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """Return SGD with heavy-ball momentum and coupled weight decay (``torch.optim.SGD``).

    ``g <- g + wd theta``, ``b <- mu b + g`` (``b = g`` at the first step),
    ``theta <- theta - lr(t) b``.

    Args:
        lr: a learning rate or a schedule ``count -> lr`` (``count`` = steps already taken).
        momentum: ``mu`` in ``[0, 1)``.
        weight_decay: ``wd``, the gradient of ``0.5 wd |theta|^2`` added to the loss gradient.
    """
    sched = _schedule("sgd", lr)
    mu = _check_rate("sgd", "momentum", momentum, upper=1.0)
    wd = _check_rate("sgd", "weight_decay", weight_decay)

    def init(params: Params) -> SGDState:
        return SGDState(0, {k: torch.zeros_like(v) for k, v in params.items()})

    def update(grads: Params, state: SGDState, params: Params) -> tuple[Params, SGDState]:
        rate = sched(state.count)
        new_params, buf = {}, {}
        for k, p in params.items():
            g = grads[k] + wd * p if wd else grads[k]
            # torch.optim.SGD seeds the buffer with the first gradient (no (1 - mu) damping).
            b = g if state.count == 0 or not mu else mu * state.momentum[k] + g
            buf[k] = b
            new_params[k] = p - rate * b
        return new_params, SGDState(state.count + 1, buf)

    return Optimizer(init, update, "sgd")


def _sqrt0(v: Tensor) -> Tensor:
    """``sqrt(v)`` with derivative 0 where ``v == 0`` (bit-identical values).

    ``v = 0`` exactly only where every gradient so far was 0 (a weight on a constant-zero input),
    and then it stays 0 under any data weights: its true derivative is 0, while ``sqrt``'s is
    inf, which made a reverse pass through Adam (MAGIC) return NaN (inf * 0).
    """
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1).sqrt(), 0)


def _adam(func: str, lr, betas, eps, weight_decay, decoupled: bool) -> Optimizer:
    sched = _schedule(func, lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(_msg(func, "betas", "a pair (b1, b2)", repr(betas)))
    b1 = _check_rate(func, "betas", betas[0], upper=1.0)
    b2 = _check_rate(func, "betas", betas[1], upper=1.0)
    eps = _check_rate(func, "eps", eps)
    wd = _check_rate(func, "weight_decay", weight_decay)

    def init(params: Params) -> AdamState:
        zeros = lambda: {k: torch.zeros_like(v) for k, v in params.items()}
        return AdamState(0, zeros(), zeros())

    def update(grads: Params, state: AdamState, params: Params) -> tuple[Params, AdamState]:
        rate, t = sched(state.count), state.count + 1
        # torch.optim.Adam's single-tensor step, op for op (lerp, mul + addcmul, sqrt / root,
        # add eps, addcdiv), with its Python-float scalars computed in its order (``** 0.5``,
        # not math.sqrt): the same kernels on the same operands give the same bits.
        step_size = rate / (1 - b1 ** t)
        root_c2 = (1 - b2 ** t) ** 0.5
        new_params, mu, nu = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            if wd and decoupled:
                p = p.mul(1 - rate * wd)
            elif wd:
                g = g.add(p, alpha=wd)
            mu[k] = state.mu[k].lerp(g, 1 - b1)
            nu[k] = torch.addcmul(state.nu[k].mul(b2), g, g, value=1 - b2)
            denom = (_sqrt0(nu[k]) / root_c2).add(eps)
            new_params[k] = torch.addcdiv(p, mu[k], denom, value=-step_size)
        return new_params, AdamState(t, mu, nu)

    return Optimizer(init, update, func)


def adam(lr: float | Schedule, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0) -> Optimizer:
    """Return Adam with coupled weight decay (``torch.optim.Adam``): ``g <- g + wd theta``.

    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``theta <- theta - lr(t)/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps)``.
    """
    return _adam("adam", lr, betas, eps, weight_decay, decoupled=False)


def adamw(lr: float | Schedule, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Optimizer:
    """Return AdamW (``torch.optim.AdamW``): Adam with decoupled decay
    ``theta <- (1 - lr(t) wd) theta`` before the moment step."""
    return _adam("adamw", lr, betas, eps, weight_decay, decoupled=True)


def model_losses(fm: FunctionalModel) -> Callable[[Params, Batch], Tensor]:
    """Return ``(params, batch) -> [B]`` per-example losses of a FunctionalModel in ONE batched
    forward (``vmap`` of ``fm.loss`` runs ``B`` forwards of one row each; on the digits MLP the
    batched form made a training step ~4x faster). Batches are ``(x1, ..., xm, y)`` tuples."""

    slots = shared_slots(fm.module)

    def losses(params: Params, batch: Batch) -> Tensor:
        *inputs, target = batch
        out = call_module(fm.module, {**fm.fixed, **params}, tuple(inputs), strict=True,
                          shared=slots)
        return per_example_losses(fm.loss_fn, out, target)

    return losses


def weighted_loss(loss: Loss | FunctionalModel) -> Callable[[Params, Batch, Tensor], Tensor]:
    """Return ``(params, batch, weights) -> (1/B) sum_i w_i loss(params, z_i)``.  # [B] -> []

    A FunctionalModel with the default tuple layout takes :func:`model_losses`' batched path.
    """
    if isinstance(loss, FunctionalModel) and loss.unpack in (None, default_unpack) \
            and bridged(loss):  # a replaced loss: model_losses would run module with loss_fn
        per_example = model_losses(loss)
    else:
        per_example = vmap(loss.loss if isinstance(loss, FunctionalModel) else loss,
                           in_dims=(None, 0))

    def objective(params: Params, batch: Batch, weights: Tensor) -> Tensor:
        losses = per_example(params, batch)  # [B]
        return (weights.to(losses.dtype) * losses).sum() / losses.shape[0]

    return objective


def make_step(loss: Loss | FunctionalModel, optimizer: Optimizer) -> Callable[..., tuple[Params, Any]]:
    """Return the pure step ``(params, opt_state, batch, weights) -> (params, opt_state)``.

    One ``optimizer.update`` on the gradient of ``(1/B) sum_i w_i loss(params, z_i)``.
    ``weights`` ``[B]`` (ones = the ordinary step) may be differentiated through.
    """
    if not callable(loss) and not isinstance(loss, FunctionalModel):
        raise TypeError(_msg("make_step", "loss", "a per-example function (params, example) -> "
                             "Tensor[] or a FunctionalModel", type(loss).__name__))
    if not isinstance(optimizer, Optimizer):
        raise TypeError(_msg("make_step", "optimizer", "an Optimizer from sgd/adam/adamw",
                             type(optimizer).__name__))
    objective_grad = grad(weighted_loss(loss))

    def step(params: Params, opt_state, batch: Batch, weights: Tensor):
        return optimizer.update(objective_grad(params, batch, weights), opt_state, params)

    return step
