"""The functional trainer: pure steps equal torch.optim, seeded orders, bit-identical replay."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn.training import (
    adam,
    adamw,
    batch_order,
    cosine_schedule,
    make_step,
    replay,
    sgd,
    take,
    train,
)

DT = torch.float64


def mlp_problem(n=12, d=3, h=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    module = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, c))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))
    module = module.to(DT)
    params = {k: v.detach().clone() for k, v in module.named_parameters()}

    def loss(p, ex):
        xi, yi = ex
        out = torch.func.functional_call(module, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    return module, params, loss, (x, y)


def torch_run(module, make_opt, data, order, steps_sched=None):
    """Train ``module`` in place with a torch.optim optimizer on the same batches."""
    opt = make_opt(module.parameters())
    sched = steps_sched(opt) if steps_sched else None
    x, y = data
    for rows in order:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x[rows]), y[rows]).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach() for k, v in module.named_parameters()}


def assert_params_close(a, b, tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


def test_sgd_momentum_matches_torch_optim():
    """Functional SGD (momentum 0.9, coupled wd) == torch.optim.SGD on the same batches, 1e-12."""
    module, params, loss, data = mlp_problem()
    order = batch_order(12, batch_size=4, epochs=3, seed=5)
    opt = sgd(0.2, momentum=0.9, weight_decay=0.01)
    run = train(make_step(loss, opt), params, opt.init(params), data, order)
    ref = torch_run(module, lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9,
                                                       weight_decay=0.01), data, order)
    assert_params_close(run.params, ref, 1e-12)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_and_adamw_with_cosine_match_torch_optim(decoupled):
    """Functional Adam/AdamW + cosine_schedule == torch.optim.Adam/AdamW + CosineAnnealingLR."""
    module, params, loss, data = mlp_problem(seed=1)
    order = batch_order(12, batch_size=5, epochs=4, seed=2)
    T = len(order)
    factory = adamw if decoupled else adam
    opt = factory(cosine_schedule(0.05, T), weight_decay=0.1)
    run = train(make_step(loss, opt), params, opt.init(params), data, order)
    torch_opt = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = torch_run(module, lambda ps: torch_opt(ps, lr=0.05, weight_decay=0.1), data, order,
                    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T))
    assert_params_close(run.params, ref, 1e-12)


def test_replay_is_bit_identical_to_the_forward_run():
    """replay(checkpoint t, t..T) == the forward run's state at T, bit for bit (torch.equal)."""
    _, params, loss, data = mlp_problem(seed=3)
    order = batch_order(12, batch_size=5, epochs=3, seed=0)
    opt = adam(0.03)
    step = make_step(loss, opt)
    run = train(step, params, opt.init(params), data, order, checkpoint_every=4)
    assert sorted(run.checkpoints) == [0, 4, 8, len(order)]
    for start in (0, 4, 8):
        p, s = replay(step, run.checkpoints[start], data, order, start=start, stop=len(order))
        assert all(torch.equal(p[k], run.params[k]) for k in p)
        assert all(torch.equal(s.mu[k], run.opt_state.mu[k]) and torch.equal(s.nu[k], run.opt_state.nu[k])
                   for k in p)
        assert s.count == run.opt_state.count == len(order)
    p8, _ = replay(step, run.checkpoints[4], data, order, start=4, stop=8)
    assert all(torch.equal(p8[k], run.checkpoints[8][0][k]) for k in p8)


def test_weight_zero_equals_training_without_the_example():
    """Full batch: weights n/(n-1) with w_i = 0 == training on the other n-1 rows, 1e-12."""
    _, params, loss, (x, y) = mlp_problem(seed=4)
    n, i = 12, 7
    opt = sgd(0.3, momentum=0.5, weight_decay=0.02)
    step = make_step(loss, opt)
    w = torch.full((n,), n / (n - 1), dtype=DT)
    w[i] = 0
    run = train(step, params, opt.init(params), (x, y), batch_order(n, epochs=6), weights=w)
    keep = torch.arange(n) != i
    ref = train(step, params, opt.init(params), (x[keep], y[keep]), batch_order(n - 1, epochs=6))
    assert_params_close(run.params, ref.params, 1e-12)


@given(n=st.integers(1, 30), bs=st.integers(1, 12), epochs=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_batch_order_is_a_seeded_permutation_per_epoch(n, bs, epochs, seed):
    """Each epoch's batches concatenate to a permutation of range(n); the same seed repeats it."""
    order = batch_order(n, batch_size=bs, epochs=epochs, seed=seed)
    per_epoch = len(order) // epochs
    assert per_epoch == (1 if bs >= n else math.ceil(n / bs))
    for e in range(epochs):
        rows = torch.cat(order[e * per_epoch:(e + 1) * per_epoch])
        assert torch.equal(rows.sort().values, torch.arange(n))
    again = batch_order(n, batch_size=bs, epochs=epochs, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(order, again, strict=True))


def test_take_reads_rows_of_every_leaf():
    """take(data, rows) == (x[rows], y[rows]) for a tuple and {k: v[rows]} for a dict."""
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    rows = torch.tensor([3, 0])
    tx, ty = take((x, y), rows)
    assert torch.equal(tx, x[rows]) and torch.equal(ty, y[rows])
    assert torch.equal(take({"a": x}, rows)["a"], x[rows])


def test_cosine_schedule_values():
    """cosine_schedule(lr, T)(t) = lr (1 + cos(pi t / T)) / 2: lr at 0, lr/2 at T/2, 0 at T."""
    f = cosine_schedule(0.4, 10)
    assert f(0) == pytest.approx(0.4, abs=1e-15)
    assert f(5) == pytest.approx(0.2, abs=1e-15)
    assert f(10) == pytest.approx(0.0, abs=1e-15)


def test_errors_name_the_argument():
    """Bad configuration or data: errors name the function and the argument."""
    _, params, loss, data = mlp_problem()
    opt = sgd(0.1)
    step = make_step(loss, opt)
    order = batch_order(12, batch_size=4)
    with pytest.raises(TypeError, match=r"make_step\(loss=...\): expected a per-example"):
        make_step(3, opt)
    with pytest.raises(TypeError, match=r"make_step\(optimizer=...\): expected an Optimizer"):
        make_step(loss, "sgd")
    with pytest.raises(ValueError, match=r"sgd\(momentum=...\): expected a float in \[0, 1\)"):
        sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"adam\(lr=...\): expected a finite float >= 0"):
        adam(-1.0)
    with pytest.raises(ValueError, match=r"adamw\(betas=...\): expected a pair"):
        adamw(0.1, betas=(0.9,))
    with pytest.raises(ValueError, match=r"train\(weights=...\): expected a tensor of shape \(12,\)"):
        train(step, params, opt.init(params), data, order, weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"train\(order=...\): expected indices in \[0, 12\)"):
        train(step, params, opt.init(params), data, [torch.tensor([0, 12])])
    with pytest.raises(ValueError, match=r"train\(order=...\): expected a non-empty list"):
        train(step, params, opt.init(params), data, [])
    with pytest.raises(ValueError, match=r"replay\(stop=...\): expected at most len\(order\) = 3"):
        replay(step, (params, opt.init(params)), data, order, start=0, stop=4)
    with pytest.raises(ValueError, match=r"batch_order\(n=...\): expected an int >= 1"):
        batch_order(0)



def test_adam_reverse_pass_is_finite_where_a_second_moment_stays_zero():
    """A weight on an all-zero input keeps v = 0: d theta_2 / d w through two Adam steps is finite,
    and such a run still equals torch.optim.Adam (1e-12)."""
    module, params, loss, (x, y) = mlp_problem(seed=6)
    x = x.clone()
    x[:, 0] = 0  # the first column of "0.weight" gets exactly zero gradient
    opt = adam(0.05)
    step = make_step(loss, opt)
    state = step(params, opt.init(params), (x, y), torch.ones(12, dtype=DT))
    assert (state[1].nu["0.weight"][:, 0] == 0).all()

    def second_step(w):
        p, _ = step(*state, (x, y), w)
        return sum(v.sum() for v in p.values())

    assert torch.isfinite(torch.func.grad(second_step)(torch.ones(12, dtype=DT))).all()
    order = batch_order(12, epochs=2)
    run = train(step, params, opt.init(params), (x, y), order)
    ref = torch_run(module, lambda ps: torch.optim.Adam(ps, lr=0.05), (x, y), order)
    assert_params_close(run.params, ref, 1e-12)
