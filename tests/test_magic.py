"""MAGIC: metagradients against finite differences of retraining, closed forms, and checkpointing."""

import pytest
import torch
from torch.func import grad, vmap

from dattri_fn.attribute.magic import MagicState, magic, metagradient
from dattri_fn.training import adam, adamw, batch_order, make_step, sgd, train

DT = torch.float64


def tiny_mlp(n=10, d=3, h=4, c=2, n_test=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    params = {"W1": 0.5 * torch.randn(h, d, generator=g, dtype=DT),
              "b1": 0.1 * torch.randn(h, generator=g, dtype=DT),
              "W2": 0.5 * torch.randn(c, h, generator=g, dtype=DT),
              "b2": 0.1 * torch.randn(c, generator=g, dtype=DT)}
    test = (torch.randn(n_test, d, generator=g, dtype=DT), torch.randint(0, c, (n_test,), generator=g))

    def loss(p, ex):
        xi, yi = ex
        z = p["W2"] @ torch.tanh(p["W1"] @ xi + p["b1"]) + p["b2"]
        return torch.nn.functional.cross_entropy(z[None], yi[None])

    return params, loss, (x, y), test


def retrained_targets(loss, opt, params, data, order, weights, test):
    """-loss of each test point after training with per-example ``weights``.  # -> [n_test]"""
    run = train(make_step(loss, opt), params, opt.init(params), data, order, weights=weights)
    return -vmap(loss, in_dims=(None, 0))(run.params, test)


def finite_differences(loss, opt, params, data, order, test, eps=1e-5):
    """Central differences (f(1 + eps e_i) - f(1 - eps e_i)) / 2 eps.  # -> [n_train, n_test]"""
    n = data[0].shape[0]
    rows = []
    for i in range(n):
        e = torch.zeros(n, dtype=DT)
        e[i] = eps
        up = retrained_targets(loss, opt, params, data, order, 1 + e, test)
        down = retrained_targets(loss, opt, params, data, order, 1 - e, test)
        rows.append((up - down) / (2 * eps))
    return torch.stack(rows)


@pytest.mark.parametrize("name,opt", [
    ("sgd", sgd(0.3, momentum=0.9, weight_decay=0.01)),
    # eps = 1e-3 keeps Adam's m / (sqrt(v) + eps) smooth at the FD step's scale: with 1e-8 a
    # coordinate whose v is ~1e-15 makes the central difference itself inaccurate.
    ("adam", adam(0.05, eps=1e-3, weight_decay=0.01)),
    ("adamw", adamw(0.05, eps=1e-3, weight_decay=0.1)),
])
def test_metagradient_equals_finite_differences_of_retraining(name, opt):
    """tau_ij = d(-loss_j(theta_T(w)))/dw_i equals central differences of 12 retrained steps."""
    params, loss, data, test = tiny_mlp(seed={"sgd": 0, "adam": 1, "adamw": 2}[name])
    method = magic(loss, opt, epochs=3, batch_size=4, seed=1, checkpoint_every=2, horizon=None)
    state = method.prepare(params, data)
    scores = method.score(params, state, data, test)
    fd = finite_differences(loss, opt, params, data, state.orders[0], test)
    assert scores.shape == (10, 3)
    torch.testing.assert_close(scores, fd, rtol=0, atol=1e-8)
    assert scores.abs().max() > 1e-2  # not vacuous


def test_checkpointed_reverse_equals_full_memory():
    """Checkpointing every c in {1, 2, 5, T} steps gives the same metagradient (torch.equal)."""
    params, loss, data, test = tiny_mlp(seed=3)
    opt = sgd(0.2, momentum=0.8, weight_decay=0.01)
    out = []
    for every in (1, 2, 5, 9):
        method = magic(loss, opt, epochs=3, batch_size=4, seed=0, checkpoint_every=every,
                       horizon=None)
        state = method.prepare(params, data)
        assert len(state.runs[0].checkpoints) == -(-9 // every) + 1
        out.append(method.score(params, state, data, test))
    assert all(torch.equal(out[0], o) for o in out[1:])


def test_ridge_gd_to_convergence_matches_implicit_function_and_exact_loo():
    """Ridge, GD to convergence: tau_i = x_t^T H^-1 x_i r_i / n; LOO change = -tau_i / (1 - h_i).

    theta*(w) minimises (1/n) sum_i w_i l_i + (lam/2)|theta|^2 with l_i = (x_i.theta - y_i)^2 / 2,
    H = X^T X / n + lam I. Target f = x_t.theta (linear); removing i (w_i = 0) is a rank-one
    change of H, so Sherman-Morrison gives the exact leave-one-out shift with h_i = x_i^T H^-1 x_i / n.
    """
    g = torch.Generator().manual_seed(0)
    n, d, lam = 8, 3, 0.1
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    x_t = torch.randn(1, d, generator=g, dtype=DT)
    loss = lambda p, ex: 0.5 * (ex[0] @ p["w"] - ex[1]) ** 2
    H = X.T @ X / n + lam * torch.eye(d, dtype=DT)
    lr = 1.0 / float(torch.linalg.eigvalsh(H).max())
    params = {"w": torch.zeros(d, dtype=DT)}
    method = magic(loss, sgd(lr, weight_decay=lam), epochs=250,
                   target=lambda p, ex: ex[0] @ p["w"])
    state = method.prepare(params, (X, y))
    tau = method.score(params, state, (X, y), (x_t, torch.zeros(1, dtype=DT)))[:, 0]
    theta = torch.linalg.solve(H, X.T @ y / n)
    r = X @ theta - y
    Hinv = torch.linalg.inv(H)
    expected = -(x_t @ Hinv @ (X * r[:, None]).T).reshape(-1) / n
    torch.testing.assert_close(tau, expected, rtol=0, atol=1e-10)
    for i in range(n):
        keep = torch.arange(n) != i
        H_i = X[keep].T @ X[keep] / n + lam * torch.eye(d, dtype=DT)
        theta_i = torch.linalg.solve(H_i, X[keep].T @ y[keep] / n)
        h_i = X[i] @ Hinv @ X[i] / n
        loo = (x_t @ theta_i - x_t @ theta).squeeze()
        torch.testing.assert_close(loo, -tau[i] / (1 - h_i), rtol=0, atol=1e-10)


def test_self_score_topk_and_ensemble():
    """self_score == diag(score(train, train)); top_k == topk of the dense scores; a list of
    initial params averages the runs' scores."""
    params, loss, data, test = tiny_mlp(seed=4)
    opt = sgd(0.2, momentum=0.9)
    method = magic(loss, opt, epochs=2, batch_size=5, seed=0, self_chunk=3)
    state = method.prepare(params, data)
    full = method.score(params, state, data, data)
    torch.testing.assert_close(method.self_score(params, state, data), full.diagonal(),
                               rtol=0, atol=1e-12)
    dense = method.score(params, state, data, test)
    top = method.score(params, state, data, test, top_k=4)
    assert torch.equal(top.values, dense.topk(4, dim=0).values)
    other = {k: v.flip(0) for k, v in params.items()}
    both = method.prepare([params, other], data)
    assert torch.equal(both.orders[0][0], state.orders[0][0])
    s_other = method.score(other, MagicState(both.runs[1:], both.orders[1:]), data, test)
    torch.testing.assert_close(method.score([params, other], both, data, test),
                               (dense + s_other) / 2, rtol=0, atol=1e-12)


def test_metagradient_of_initial_params_matches_finite_differences():
    """MetaGradient.params = d(-loss_t(theta_T))/d theta_0: a directional central difference."""
    params, loss, data, test = tiny_mlp(seed=5)
    opt = sgd(0.2, momentum=0.9, weight_decay=0.01)
    step = make_step(loss, opt)
    order = batch_order(10, batch_size=4, epochs=2, seed=0)
    run = train(step, params, opt.init(params), data, order, checkpoint_every=3)
    f = lambda p: -loss(p, (test[0][0], test[1][0]))
    cot = {k: v[None] for k, v in grad(f)(run.params).items()}
    mg = metagradient(step, run, data, order, cot)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(x.shape, generator=g, dtype=DT) for k, x in params.items()}
    eps = 1e-5
    final = lambda s: f(train(step, {k: params[k] + s * v[k] for k in params},
                              opt.init(params), data, order).params)
    fd = (final(eps) - final(-eps)) / (2 * eps)
    ad = sum((mg.params[k][0] * v[k]).sum() for k in v)
    torch.testing.assert_close(ad, fd, rtol=0, atol=1e-8)


def test_errors_name_the_argument():
    """Wrong kinds and shapes: errors name magic/metagradient and the argument."""
    params, loss, data, test = tiny_mlp()
    opt = sgd(0.1)
    with pytest.raises(TypeError, match=r"magic\(loss=...\): expected a per-example"):
        magic(3, opt, epochs=1)
    with pytest.raises(ValueError, match=r"magic\(epochs=...\): expected an int >= 1"):
        magic(loss, opt, epochs=0)
    with pytest.raises(TypeError, match=r"magic\(target=...\): expected a function"):
        magic(loss, opt, epochs=1, target="margin")
    method = magic(loss, opt, epochs=1)
    with pytest.raises(TypeError, match=r"magic.prepare\(params=...\): expected a params dict"):
        method.prepare("params", data)
    with pytest.raises(TypeError, match=r"magic.score\(state=...\): expected the MagicState"):
        method.score(params, None, data, test)
    step = make_step(loss, opt)
    order = batch_order(10)
    run = train(step, params, opt.init(params), data, order)
    with pytest.raises(ValueError, match=r"metagradient\(cotangent=...\): expected the keys"):
        metagradient(step, run, data, order, {"W1": params["W1"][None]})


def test_magic_through_the_tasks_adam_step_equals_finite_differences():
    """magic(step=task_step(...)) on a float64 digits MLP, 4 full-batch Adam steps with decay:
    tau_ij == central differences of retraining with w_i = 1 +- eps (3 rows) (the weighted objective
    (1/B) sum w_i l_i + 0.5 wd |theta|^2), 1e-7."""
    from dattri_fn.eval.tasks import get_task, task_step
    from dattri_fn.model import functional_model
    from dattri_fn.training import cosine_schedule

    task = get_task("digits-mlp", n_train=10, n_test=3)
    model = task.make_model(0).double()
    fm = functional_model(model, task.loss_fn)
    data = (task.x_train.double(), task.y_train)
    test = (task.x_test.double(), task.y_test)
    opt = adam(cosine_schedule(0.05, 4, recursive=True), eps=1e-3)
    step = task_step(fm, opt, 0.01)
    method = magic(fm, opt, epochs=4, step=step, checkpoint_every=3, horizon=None)
    state = method.prepare(fm.params, data)
    scores = method.score(fm.params, state, data, test)
    order = state.orders[0]
    assert len(order) == 4 and all(torch.equal(r, torch.arange(10)) for r in order)

    def targets(w):
        run = train(step, fm.params, opt.init(fm.params), data, order, weights=w)
        return -vmap(fm.loss, in_dims=(None, 0))(run.params, test)

    rows = [0, 3, 7]

    def central(eps):
        e = eps * torch.eye(10, dtype=DT)
        return torch.stack([(targets(1 + e[i]) - targets(1 - e[i])) / (2 * eps) for i in rows])

    # Richardson: (4 D(eps/2) - D(eps)) / 3 cancels the central difference's eps^2 term, which
    # is ~4e-7 here (Adam's first step m / (sqrt(v) + eps) bends sharply in w).
    fd = (4 * central(5e-6) - central(1e-5)) / 3
    torch.testing.assert_close(scores[rows], fd, rtol=0, atol=1e-8)
    assert scores.abs().max() > 1e-3  # not vacuous


def test_magic_step_must_be_callable():
    """magic(step=3) is refused naming the argument."""
    params, loss, data, test = tiny_mlp()
    with pytest.raises(TypeError, match=r"magic\(step=...\): expected a pure step"):
        magic(loss, sgd(0.1), epochs=1, step=3)


def test_horizon_truncates_the_reverse_pass_to_the_last_steps():
    """horizon=K: tau^(K) = sum over steps t >= T-K of the weight cotangents; K >= T == the full
    metagradient (torch.equal); K = 1 touches only the last batch's rows; the sum over horizons
    is checkpoint-independent (c = 1 vs 4, torch.equal) and == the benchmark's snapshot, 1e-12."""
    from benchmarks.magic_horizon import horizon_metagradients

    params, loss, data, test = tiny_mlp(seed=6)
    opt = sgd(0.2, momentum=0.9, weight_decay=0.01)
    full = magic(loss, opt, epochs=3, batch_size=4, seed=2, horizon=None)
    state = full.prepare(params, data)
    exact = full.score(params, state, data, test)
    T = len(state.orders[0])
    assert torch.equal(magic(loss, opt, epochs=3, batch_size=4, seed=2, horizon=T + 5)
                       .score(params, state, data, test), exact)
    one = magic(loss, opt, epochs=3, batch_size=4, seed=2, horizon=1).score(params, state, data, test)
    last = torch.zeros(10, dtype=torch.bool)
    last[state.orders[0][-1]] = True
    assert torch.all(one[~last] == 0) and one[last].abs().max() > 0
    five = [magic(loss, opt, epochs=3, batch_size=4, seed=2, horizon=5, checkpoint_every=c)
            for c in (1, 4)]
    s1, s4 = (m.score(params, m.prepare(params, data), data, test) for m in five)
    assert torch.equal(s1, s4) and not torch.allclose(s1, exact)
    cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(state.runs[0].params, test)
    snaps, _ = horizon_metagradients(make_step(loss, opt), state.runs[0], data, state.orders[0],
                                     cot, every_steps=5)
    torch.testing.assert_close(s1, snaps[5].T, rtol=0, atol=1e-12)
