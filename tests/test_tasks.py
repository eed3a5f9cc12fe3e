"""Bundled tasks: they build, train fast and deterministically, beat chance, and targets are
oriented higher = better."""

import hashlib
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn.eval.tasks import (
    TASKS,
    VOCAB,
    accuracy,
    get_task,
    margin_target,
    text_corpus,
    train_model,
)


def test_digits_lr_fast_and_accurate(device):
    """digits-lr (defaults) trains in < 1 s and reaches > 85% test accuracy."""
    task = get_task("digits-lr").to(device)
    train_model(task, seed=0, epochs=2)  # warm-up, not timed
    start = time.perf_counter()
    model = train_model(task, seed=0)
    assert time.perf_counter() - start < 1.0
    assert accuracy(model, task.x_test, task.y_test) > 0.85
    assert task.x_train.dtype == torch.float32 and task.x_train.shape == (1000, 64)
    assert task.x_train.device.type == device.type


@pytest.mark.parametrize("name,n_train,floor", [("digits-mlp", 400, 0.8),
                                                ("digits-cnn", 300, 0.6)])
def test_digits_nets_beat_chance(device, name, n_train, floor):
    """The MLP and CNN reach far above the 10% chance accuracy on held-out digits."""
    task = get_task(name, n_train=n_train, n_test=100).to(device)
    model = train_model(task, seed=1)
    assert accuracy(model, task.x_test, task.y_test) > floor
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5000


def test_text_lm_learns(device):
    """text-lm: trained test loss < untrained and < log(|V|) (uniform); target = -seq loss."""
    task = get_task("text-lm", n_train=64, n_test=16).to(device)
    assert task.meta["corpus_sha256"] == hashlib.sha256(text_corpus().encode()).hexdigest()
    assert torch.equal(task.x_train[:, 1:], task.y_train[:, :-1])  # y is x shifted by one
    assert int(task.x_train.max()) < len(VOCAB) and task.x_train.dtype == torch.int64
    untrained = task.make_model(0).to(device).eval()
    model = train_model(task, seed=0)
    before = task.target(untrained, task.x_test, task.y_test)
    after = task.target(model, task.x_test, task.y_test)
    assert after.shape == (16,) and after.mean() > before.mean()
    assert -after.mean() < math.log(len(VOCAB))
    ce = task.loss_fn(model(task.x_test), task.y_test)
    assert torch.allclose(-after.mean(), ce, atol=1e-5)


def test_margin_target_hand(device):
    """logits [[2,5,1],[0,-1,3]], y=[1,0]: margins 5-2=3 and 0-3=-3 (positive iff correct)."""
    model = torch.nn.Linear(3, 3, bias=False).to(device)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.tensor([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]], device=device)
    out = margin_target(model, x, torch.tensor([1, 0], device=device))
    assert torch.equal(out, torch.tensor([3.0, -3.0], device=device))


def test_loss_fn_is_batch_mean(device):
    """loss_fn(out, y) == mean_i loss_fn(out[i:i+1], y[i:i+1]) for every task."""
    for name in TASKS:
        task = get_task(name, n_train=20, n_test=5).to(device)
        model = task.make_model(0).to(device)
        out = model(task.x_train)
        per = torch.stack([task.loss_fn(out[i:i + 1], task.y_train[i:i + 1])
                           for i in range(20)])
        assert torch.allclose(task.loss_fn(out, task.y_train), per.mean(), atol=1e-6)


def test_deterministic_and_global_rng_untouched(device):
    """Same seed -> identical trained params; building a model leaves the global RNG alone."""
    task = get_task("digits-mlp", n_train=100, n_test=10).to(device)
    state = torch.get_rng_state()
    a = train_model(task, seed=3, epochs=20)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_model(task, seed=3, epochs=20)
    c = train_model(task, seed=4, epochs=20)
    a, b, c = (list(mod.parameters()) for mod in (a, b, c))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b, strict=True))
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a, c, strict=True))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**20), n_train=st.integers(20, 300))
def test_noisy_flips_ten_percent(seed, n_train):
    """noisy=True changes exactly round(0.1 n) labels, each to a different class, same split."""
    clean = get_task("digits-lr", n_train=n_train, n_test=10, seed=seed)
    noisy = get_task("digits-lr", n_train=n_train, n_test=10, seed=seed, noisy=True)
    assert clean.flipped is None and noisy.flipped.dtype == torch.bool
    assert int(noisy.flipped.sum()) == round(0.1 * n_train)
    assert torch.equal(noisy.y_train != clean.y_train, noisy.flipped)
    assert torch.equal(noisy.x_train, clean.x_train) and torch.equal(noisy.y_test, clean.y_test)


def test_split_depends_on_seed():
    """Different seeds draw different splits; the same seed the same one."""
    a, b = get_task("digits-lr", seed=0), get_task("digits-lr", seed=1)
    assert torch.equal(a.x_train, get_task("digits-lr", seed=0).x_train)
    assert not torch.equal(a.x_train, b.x_train)


def test_get_task_errors():
    """Unknown names list the valid ones; impossible sizes and noisy text-lm are refused."""
    with pytest.raises(ValueError, match=r"get_task\(name=...\): expected one of 'digits-lr'"):
        get_task("mnist")
    with pytest.raises(TypeError, match=r"get_task\(name=...\): expected a str"):
        get_task(3)
    with pytest.raises(ValueError, match=r"get_task\(n_train=...\): expected n_train \+ n_test"):
        get_task("digits-lr", n_train=1797, n_test=1)
    with pytest.raises(ValueError, match=r"get_task\(noisy=...\): expected False for 'text-lm'"):
        get_task("text-lm", noisy=True)
    with pytest.raises(ValueError, match=r"get_task\(n_test=...\): expected an int >= 1"):
        get_task("digits-lr", n_test=0)
    with pytest.raises(ValueError, match=r"get_task\(hparams=...\): expected keys among"):
        get_task("digits-lr", hparams={"lr_decay": 0.1})


def test_hparams_override_changes_training():
    """hparams={"weight_decay": w} retrains with w: larger decay -> smaller parameter norm."""
    small = get_task("digits-lr", n_train=100, n_test=10)
    big = get_task("digits-lr", n_train=100, n_test=10, hparams={"weight_decay": 1.0})
    assert big.hparams["weight_decay"] == 1.0 and small.hparams["weight_decay"] == 1e-3
    norm = [sum(p.square().sum() for p in train_model(t, seed=0).parameters())
            for t in (small, big)]
    assert norm[1] < norm[0]


def test_sgd_trainer_is_the_functional_run_magic_replays():
    """hparams optimizer 'sgd': train_model == train(make_step(fm, sgd_run(...))) bit for bit;
    weighted=True with every row kept == the unweighted run; a 0 weight changes the model."""
    from dattri_fn.eval.tasks import SGD_HPARAMS, sgd_run
    from dattri_fn.model import functional_model
    from dattri_fn.training import make_step, train

    task = get_task("digits-mlp", n_train=70, n_test=5, hparams={**SGD_HPARAMS, "epochs": 2})
    assert task.hparams["batch_size"] == 64 and task.hparams["momentum"] == 0.9
    model = train_model(task, seed=3)
    optimizer, order = sgd_run(70, seed=3, epochs=2, lr=0.05, weight_decay=1e-3,
                               batch_size=64, momentum=0.9)
    assert len(order) == 4 and [len(r) for r in order] == [64, 6, 64, 6]
    fm = functional_model(task.make_model(3), task.loss_fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # train_model's setting: the same reduction order
    try:
        run = train(make_step(fm, optimizer), fm.params, optimizer.init(fm.params),
                    (task.x_train, task.y_train), order)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, run.params[k]) for k, p in model.named_parameters())
    same = train_model(task, seed=3, keep=torch.ones(70, dtype=torch.bool), weighted=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters(), strict=True))
    keep = torch.ones(70, dtype=torch.bool)
    keep[5] = False
    other = train_model(task, seed=3, keep=keep, weighted=True)
    assert not torch.equal(other[0].weight, model[0].weight)


def test_sgd_options_and_weighted_errors():
    """batch_size/momentum are sgd-only keys; weighted=True needs the sgd trainer."""
    with pytest.raises(ValueError, match=r"get_task\(hparams=...\): expected keys among"):
        get_task("digits-mlp", hparams={"batch_size": 32})
    with pytest.raises(ValueError, match=r"get_task\(hparams=...\): expected optimizer among"):
        get_task("digits-mlp", hparams={"optimizer": "rmsprop"})
    task = get_task("digits-lr", n_train=20, n_test=5)
    with pytest.raises(ValueError, match=r"train_model\(weighted=...\): expected a task whose"):
        train_model(task, weighted=True)
