"""The bundled tasks' "adam" trainer on the functional trainer: bit-identical to the former
``torch.optim.Adam`` + ``CosineAnnealingLR`` loop, with per-example weights that MAGIC can
differentiate."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, jacrev

from dattri_fn.eval import tasks as tasks_mod
from dattri_fn.eval.tasks import adam_run, get_task, task_step, train_model
from dattri_fn.model import functional_model
from dattri_fn.training import adam, adamw, cosine_schedule, sgd, train

ADAM_TASKS = [name for name in tasks_mod.TASKS if tasks_mod._HPARAMS[name]["optimizer"] == "adam"]


def torch_trained(task, seed: int, epochs: int | None, keep=None):
    """The former trainer (``_train_adam_torch``) under train_model's one-thread setting."""
    hp = task.hparams
    x, y = (task.x_train, task.y_train) if keep is None else (task.x_train[keep], task.y_train[keep])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tasks_mod._train_adam_torch(task.make_model(seed), x, y, epochs=epochs,
                                           loss_fn=task.loss_fn, weight_decay=hp["weight_decay"],
                                           lr=hp["lr"], default_epochs=hp["epochs"])
    finally:
        torch.set_num_threads(threads)


def assert_same_model(a, b):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max |diff| {float((p - q).abs().max()):.3g}"


def test_every_adam_task_is_listed():
    """The bit-identity tests below cover every bundled task trained by Adam."""
    assert ADAM_TASKS == ["digits-mlp", "digits-cnn", "text-lm"]


@pytest.mark.parametrize("name", ADAM_TASKS)
def test_adam_trainer_is_torch_optim_bit_for_bit(name):
    """train_model (functional Adam run) == torch.optim.Adam + CosineAnnealingLR, torch.equal,
    on the full training set and on a subset (4 epochs)."""
    task = get_task(name)
    assert_same_model(train_model(task, seed=1, epochs=4), torch_trained(task, 1, 4))
    keep = torch.arange(0, task.n_train, 3)
    assert_same_model(train_model(task, seed=2, keep=keep, epochs=3), torch_trained(task, 2, 3, keep))


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAM_TASKS)
def test_adam_trainer_is_torch_optim_bit_for_bit_at_the_default_epochs(name):
    """The same at the task's default epochs (300 / 100 / 80): no drift, torch.equal."""
    task = get_task(name)
    assert_same_model(train_model(task, seed=0), torch_trained(task, 0, None))


@pytest.mark.parametrize("steps", [1, 2, 7, 80, 300])
def test_recursive_cosine_schedule_is_cosine_annealing_lr_bit_for_bit(steps):
    """cosine_schedule(recursive=True)(t) == CosineAnnealingLR's lr after t scheduler steps
    (==, through the minimum and the restart), and the closed form to 1e-15 relative."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    ours, closed = cosine_schedule(0.3, steps, recursive=True), cosine_schedule(0.3, steps)
    for t in range(2 * steps + 3):
        assert ours(t) == opt.param_groups[0]["lr"], t
        assert math.isclose(ours(t), closed(t), rel_tol=1e-12, abs_tol=1e-15)
        opt.step()
        sched.step()
    assert ours(steps) == pytest.approx(0.0, abs=1e-15) and ours(0) == 0.3


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), decoupled=st.booleans(),
       wd=st.sampled_from([0.0, 1e-3, 0.1]), eps=st.sampled_from([1e-8, 1e-3]))
def test_adam_update_is_torch_optim_bit_for_bit(seed, decoupled, wd, eps):
    """adam/adamw(lr_t).update == torch.optim.Adam/AdamW.step on the same float32 gradients,
    torch.equal over 6 steps with a changing lr (a zero-gradient entry included)."""
    g = torch.Generator().manual_seed(seed)
    p0 = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in p0.items()} for _ in range(6)]
    for gr in grads:
        gr["b"][0] = 0.0
    lrs = [0.1 / (1 + t) for t in range(6)]
    opt = (adamw if decoupled else adam)(lambda t: lrs[t], weight_decay=wd, eps=eps)
    params, state = p0, opt.init(p0)
    ref = {k: v.clone().requires_grad_() for k, v in p0.items()}
    torch_opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        list(ref.values()), lr=lrs[0], weight_decay=wd, eps=eps)
    for t, gr in enumerate(grads):
        params, state = opt.update(gr, state, params)
        torch_opt.param_groups[0]["lr"] = lrs[t]
        for k, v in ref.items():
            v.grad = gr[k].clone()
        torch_opt.step()
        assert all(torch.equal(params[k], ref[k].detach()) for k in p0), t


def mlp64(seed: int = 0):
    """The digits-mlp task with a float64 copy of its model."""
    task = get_task("digits-mlp", n_train=40, n_test=4)
    model = task.make_model(seed).double()
    return task, model, task.x_train.double(), task.y_train


def reference_gradient(model, loss_fn, wd: float):
    """grad_theta [(1/B) sum_i w_i l_i(theta) + 0.5 wd |theta|^2], per-example losses by a loop."""

    def objective(params, x, y, w):
        rows = [loss_fn(functional_call(model, params, (x[i:i + 1],)), y[i:i + 1])
                for i in range(x.shape[0])]
        return (w * torch.stack(rows)).sum() / x.shape[0] + 0.5 * wd * sum(
            (p * p).sum() for p in params.values())

    return grad(objective)


def test_task_step_gradient_is_the_weighted_objective():
    """task_step with sgd(lr=1): theta - theta' == grad[(1/B) sum w_i l_i + 0.5 wd |theta|^2]
    for random weights, float64, 1e-12; and d(theta')/dw == -d(that gradient)/dw, 1e-10."""
    task, model, x, y = mlp64()
    wd = 0.01
    fm = functional_model(model, task.loss_fn)
    step = task_step(fm, sgd(1.0), wd)
    opt_state = sgd(1.0).init(fm.params)
    x, y = x[:8], y[:8]
    w = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    new, _ = step(fm.params, opt_state, (x, y), w)
    ref = reference_gradient(model, task.loss_fn, wd)(fm.params, x, y, w)
    for k, p in fm.params.items():
        torch.testing.assert_close(p - new[k], ref[k], rtol=1e-12, atol=1e-12)
    ours = jacrev(lambda w_: step(fm.params, opt_state, (x, y), w_)[0])(w)
    theirs = jacrev(lambda w_: reference_gradient(model, task.loss_fn, wd)(fm.params, x, y, w_))(w)
    for k in fm.params:
        torch.testing.assert_close(ours[k], -theirs[k], rtol=1e-10, atol=1e-12)


def test_weighted_adam_task_with_every_row_kept_is_the_ordinary_run():
    """train_model(weighted=True) on an Adam task: all rows kept == the unweighted run
    (torch.equal); one row weighted 0 changes the model; weighting rows 0 is the functional
    run with those weights."""
    task = get_task("digits-mlp", n_train=60, n_test=5)
    model = train_model(task, seed=4, epochs=5)
    same = train_model(task, seed=4, keep=torch.ones(60, dtype=torch.bool), epochs=5, weighted=True)
    assert_same_model(model, same)
    keep = torch.ones(60, dtype=torch.bool)
    keep[[3, 17]] = False
    other = train_model(task, seed=4, keep=keep, epochs=5, weighted=True)
    assert not torch.equal(other[0].weight, model[0].weight)
    hp = task.hparams
    optimizer, order = adam_run(60, epochs=5, lr=hp["lr"])
    fm = functional_model(task.make_model(4), task.loss_fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(task_step(fm, optimizer, hp["weight_decay"]), fm.params,
                    optimizer.init(fm.params), (task.x_train, task.y_train), order,
                    weights=keep.float())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, run.params[k]) for k, p in other.named_parameters())
