"""The bundled tasks' functional training runs (see :mod:`dattri_fn.eval.tasks`): the pure step
on the tasks' objective, the Adam and SGD runs MAGIC replays, and the former torch.optim Adam
loop kept as the reference the functional one is tested equal to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..module_call import call_module
from ..transforms.layers import per_example_losses
from .tasks_data import derive_seed


# ------------------------------------------------------------------------------- training
def _objective(model: nn.Module, loss_fn, x: Tensor, y: Tensor, weight_decay: float) -> Tensor:
    reg = sum((p * p).sum() for p in model.parameters())
    return loss_fn(model(x), y) + 0.5 * weight_decay * reg


def task_step(fm, optimizer, weight_decay: float) -> Callable[..., tuple[dict, Any]]:
    """Return the bundled tasks' pure training step ``(params, opt_state, batch, weights) ->
    (params, opt_state)`` on ``J = (1/B) sum_i w_i l_i(theta) + 0.5 wd sum_p |theta_p|^2``.

    The gradient is written so that at ``w = 1`` it is the one ``.backward()`` of
    :func:`_objective` leaves in the model's ``.grad``, bit for bit:

        g = grad_theta [loss_fn(f_theta(x), y) + (1/B) sum_i (w_i - 1) l_i]   (then)
        g <- (g + c theta) + c theta,   c = 0.5 wd   (as float32 products)

    ``loss_fn`` is the task's batch mean (its own reduction order), ``l_i`` the per-example losses;
    the second term is exactly 0 at ``w = 1`` with an exactly-0 gradient, and still gives
    ``dJ/dw_i = l_i / B``. ``d(theta * theta)`` reaches ``theta`` as two products ``c theta``
    that autograd adds one at a time after the data term; ``functional_call`` (whose
    parameters are not the module's leaves) would add them to each other first, a different
    rounding, so the decay gradient is added here by hand. Differentiable in ``params``, the
    optimizer state and ``weights`` (MAGIC).

    Args:
        fm: the task model's FunctionalModel (``functional_model(model, task.loss_fn)``) with
            every parameter selected (the decay runs over all of them).
        optimizer: from :mod:`dattri_fn.training` (:func:`adam_run` for the ``"adam"`` trainer).
        weight_decay: ``wd``.
    """
    from torch.func import grad

    loss_fn, half = fm.loss_fn, 0.5 * weight_decay

    def data_objective(params: dict, batch: tuple, weights: Tensor) -> Tensor:
        *inputs, target = batch
        out = call_module(fm.module, {**fm.fixed, **params}, tuple(inputs), strict=True)
        losses = per_example_losses(loss_fn, out, target)  # [B]
        return loss_fn(out, target) + ((weights.to(losses.dtype) - 1) * losses).sum() / losses.shape[0]

    data_grad = grad(data_objective)

    def step(params: dict, opt_state, batch: tuple, weights: Tensor):
        g = data_grad(params, batch, weights)
        g = {k: (g[k] + p * half) + p * half for k, p in params.items()}
        return optimizer.update(g, opt_state, params)

    return step


def adam_run(n: int, *, epochs: int, lr: float):
    """Return ``(Optimizer, order)`` of the ``"adam"`` trainer on ``n`` examples: full batch,
    ``torch.optim.Adam`` defaults (no decay of its own: :func:`task_step` adds it) and
    ``CosineAnnealingLR(T_max=epochs)``'s learning rates (``cosine_schedule(recursive=True)``)."""
    from ..training import adam, batch_order, cosine_schedule

    order = batch_order(n, epochs=epochs)
    return adam(cosine_schedule(lr, epochs, recursive=True)), order


def _train_adam_torch(model: nn.Module, x: Tensor, y: Tensor, *, seed: int = 0,
                      epochs: int | None = None, loss_fn, weight_decay: float, lr: float,
                      default_epochs: int) -> nn.Module:
    """The former ``"adam"`` trainer: ``torch.optim.Adam`` + ``CosineAnnealingLR``, kept as the
    reference :func:`_train_adam` is tested equal to."""
    del seed
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs or default_epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        opt.zero_grad()
        _objective(model, loss_fn, x, y, weight_decay).backward()
        opt.step()
        sched.step()
    return model.eval()


def order_seed(seed: int) -> int:
    """The data-order seed of the ``"sgd"`` trainer for init seed ``seed`` (MAGIC replays it)."""
    return derive_seed("order", seed)


def sgd_run(n: int, *, seed: int, epochs: int, lr: float, weight_decay: float,
            batch_size: int, momentum: float):
    """Return ``(Optimizer, order)`` of the ``"sgd"`` trainer on ``n`` examples."""
    from ..training import batch_order, cosine_schedule, sgd

    order = batch_order(n, batch_size=batch_size, epochs=epochs, seed=order_seed(seed))
    optimizer = sgd(cosine_schedule(lr, len(order)), momentum=momentum,
                    weight_decay=weight_decay)
    return optimizer, order
