"""MAGIC's horizon="auto": per target, the truncated metagradient at the smallest state cotangent."""

import pytest
import torch
from torch.func import grad, vjp, vmap

from dattri_fn.attribute.magic import _join, _split, magic, metagradient
from dattri_fn.training import adam, batch_order, make_step, sgd, train
from dattri_fn.training.run import take

DT = torch.float64


def problem(seed, *, hidden, lr, momentum, weight_decay, n=10, n_test=4, epochs=3, opt=None,
            init_seed=None, order_seed=None):
    """A float64 tanh MLP (or softmax regression when ``hidden`` is 0) and its SGD run, every
    state kept (checkpoint_every=1) so the reference can start from any step. ``init_seed`` /
    ``order_seed`` (default: from ``seed``) give another run on the same data."""
    g = torch.Generator().manual_seed(seed)
    d, c = 3, 2
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    test = (torch.randn(n_test, d, generator=g, dtype=DT), torch.randint(0, c, (n_test,), generator=g))
    if init_seed is not None:
        g = torch.Generator().manual_seed(init_seed)
    if hidden:
        params = {"W1": 1.5 * torch.randn(hidden, d, generator=g, dtype=DT),
                  "W2": 1.5 * torch.randn(c, hidden, generator=g, dtype=DT)}

        def loss(p, ex):
            z = p["W2"] @ torch.tanh(p["W1"] @ ex[0])
            return torch.nn.functional.cross_entropy(z[None], ex[1][None])
    else:
        params = {"W": 0.3 * torch.randn(c, d, generator=g, dtype=DT)}

        def loss(p, ex):
            return torch.nn.functional.cross_entropy((p["W"] @ ex[0])[None], ex[1][None])
    opt = opt or sgd(lr, momentum=momentum, weight_decay=weight_decay)
    step = make_step(loss, opt)
    order = batch_order(n, batch_size=4, epochs=epochs, seed=seed if order_seed is None else order_seed)
    traj = train(step, params, opt.init(params), (x, y), order, checkpoint_every=1)
    cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(traj.params, test)
    return loss, opt, step, (x, y), test, order, traj, cot


def reference_norms(step, traj, data, order, cot, *, whole_state=False):
    """|thetabar^j_{T-K}| for K = 1..T: one vjp of the composed map s_{T-K} -> theta_T per K,
    the params' part of the state cotangent, independent of metagradient's loop.  # -> [T, k]"""
    T = len(order)
    out = []
    for K in range(1, T + 1):
        floats, how = _split(traj.checkpoints[T - K])

        def to_final(f, how=how, lo=T - K):
            params, opt_state = _join(f, how)
            for t in range(lo, T):
                rows = order[t]
                params, opt_state = step(params, opt_state, take(data, rows),
                                         torch.ones(len(rows), dtype=DT))
            return params

        _, pull = vjp(to_final, floats)
        bars = vmap(pull)(cot)[0]
        bars = bars if whole_state else bars[:len(cot)]  # the params dict's leaves come first
        out.append(torch.sqrt(sum((b.reshape(b.shape[0], -1) ** 2).sum(1) for b in bars)))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["sgd-momentum", "adam"])
def test_auto_equals_the_brute_force_horizon_per_target(name):
    """auto's column j == metagradient(horizon=K_j) with K_j = argmin_K |thetabar^j_{T-K}| (first
    minimum) from a separate vjp per K; weights and params at 1e-10, K_j exactly. Under Adam the
    whole-state norm (moments included) would pick other K_j: the params-only norm is what runs."""
    if name == "adam":
        loss, opt, step, data, test, order, traj, cot = problem(
            2, hidden=5, lr=0.0, momentum=0.0, weight_decay=0.0, opt=adam(0.2))
        whole = reference_norms(step, traj, data, order, cot, whole_state=True).argmin(0) + 1
    else:
        loss, opt, step, data, test, order, traj, cot = problem(
            4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    T = len(order)
    norms = reference_norms(step, traj, data, order, cot)  # [T, k]
    ks = norms.argmin(0) + 1  # argmin returns the first minimum: ties to the shorter horizon
    # Not a degenerate case: the targets stop at different steps, some strictly inside (1, T).
    assert len(set(ks.tolist())) > 1 and any(1 < K < T for K in ks.tolist()), ks
    ordered = norms.sort(0).values
    assert bool((ordered[1] - ordered[0] > 1e-6 * ordered[0]).all())  # no near-ties to flip
    auto = metagradient(step, traj, data, order, cot, horizon="auto")
    assert torch.equal(auto.horizon, ks)
    if name == "adam":
        assert not torch.equal(whole, ks), whole
    for j, K in enumerate(ks.tolist()):
        ref = metagradient(step, traj, data, order, cot, horizon=K)
        torch.testing.assert_close(auto.weights[j], ref.weights[j], rtol=0, atol=1e-10)
        for name in ref.params:
            torch.testing.assert_close(auto.params[name][j], ref.params[name][j], rtol=0, atol=1e-10)
    assert auto.weights.abs().max() > 1e-3


def test_auto_is_the_exact_metagradient_when_cotangents_shrink():
    """Convex softmax regression, plain SGD with weight decay, lr (lambda_max + wd) < 2: each
    step's vjp (I - lr (H_t + wd I)) contracts, |thetabar_{T-K}| falls in K, so K_j = T and auto ==
    the exact metagradient (1e-12)."""
    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=0, lr=0.2, momentum=0.0, weight_decay=0.05)
    T = len(order)
    norms = reference_norms(step, traj, data, order, cot)
    assert bool((norms[1:] < norms[:-1]).all())  # the premise: shrinking backward
    auto = metagradient(step, traj, data, order, cot, horizon="auto")
    exact = metagradient(step, traj, data, order, cot)
    assert auto.horizon.tolist() == [T] * cot["W"].shape[0] and exact.horizon.tolist() == [T] * 4
    torch.testing.assert_close(auto.weights, exact.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(auto.params["W"], exact.params["W"], rtol=0, atol=1e-12)


def test_magic_auto_is_checkpoint_independent_and_matches_metagradient():
    """magic(horizon="auto").score == metagradient(horizon="auto").weights.T, for checkpoint_every
    1 and 4 bit for bit (the norm is taken at every step, whatever the replay segments)."""
    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    scores = []
    for c in (1, 4):
        method = magic(loss, opt, epochs=3, batch_size=4, seed=4, checkpoint_every=c, horizon="auto")
        scores.append(method.score(traj.checkpoints[0][0], method.prepare(traj.checkpoints[0][0], data),
                                   data, test))
    assert torch.equal(scores[0], scores[1])
    ref = metagradient(step, traj, data, order, cot, horizon="auto").weights.T
    torch.testing.assert_close(scores[0], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", ["best", 0])
def test_horizon_must_be_a_positive_int_or_auto(bad):
    """magic(horizon="best") and horizon=0 are refused naming the argument."""
    loss = lambda p, ex: (p["W"] * ex).sum()
    with pytest.raises((ValueError, TypeError), match=r"magic\(horizon=...\): expected"):
        magic(loss, sgd(0.1), epochs=1, horizon=bad)


def test_magic_defaults_to_auto_and_none_is_the_exact_metagradient():
    """magic() == magic(horizon="auto") bit for bit; horizon=None == metagradient's exact pass
    (1e-12), which differs here (some K_j < T)."""
    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    p0 = traj.checkpoints[0][0]
    default, auto, exact = (magic(loss, opt, epochs=3, batch_size=4, seed=4, **kw)
                            for kw in ({}, {"horizon": "auto"}, {"horizon": None}))
    state = default.prepare(p0, data)
    scores = [m.score(p0, state, data, test) for m in (default, auto, exact)]
    assert torch.equal(scores[0], scores[1])
    ref = metagradient(step, traj, data, order, cot).weights.T
    torch.testing.assert_close(scores[2], ref, rtol=0, atol=1e-12)
    assert (scores[0] - scores[2]).abs().max() > 1e-3


def test_auto_never_hides_a_nan_cotangent_behind_zeros():
    """w_{t+1} = sqrt(w_t^2) + lr mean_i(weight_i x_i) with w = x = 0: the first vjp is 0/0 = NaN,
    no norm is ever finite, so auto keeps the full pass: K = T and NaN where the exact pass has
    NaN (not the zeros of an empty snapshot)."""
    def step(params, opt_state, batch, w):
        return {"w": torch.sqrt(params["w"] ** 2) + 0.1 * (w[:, None] * batch).mean(0)}, opt_state

    data = torch.zeros(3, 2, dtype=DT)
    order = batch_order(3, batch_size=None, epochs=2, seed=0)
    traj = train(step, {"w": torch.zeros(2, dtype=DT)}, (), data, order, checkpoint_every=1)
    cot = {"w": torch.ones(2, 2, dtype=DT)}
    auto = metagradient(step, traj, data, order, cot, horizon="auto")
    exact = metagradient(step, traj, data, order, cot)
    assert auto.horizon.tolist() == [2, 2] and exact.weights.isnan().any()
    assert torch.equal(auto.weights.isnan(), exact.weights.isnan())


def test_ensemble_auto_is_the_mean_of_each_runs_own_auto():
    """magic(horizon="auto") on R = 2 runs: score = (1/R) sum_c metagradient_c(horizon=K^c_j).weights.T
    with K^c_j = argmin_K |thetabar^{c,j}_{T-K}| from run c's own brute-force norms (1e-10); the two
    runs choose different K for some target, so no horizon is shared across members."""
    kw = dict(hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    runs = [problem(4, **kw), problem(4, init_seed=11, order_seed=7, **kw)]
    loss, opt, _, data, test, _, _, _ = runs[0]
    p0s = [run[6].checkpoints[0][0] for run in runs]
    assert not torch.equal(p0s[0]["W1"], p0s[1]["W1"])  # two inits on the same data
    refs, horizons = [], []
    for _, _, step, _, _, order, traj, cot in runs:
        ks = reference_norms(step, traj, data, order, cot).argmin(0) + 1  # [k], first minimum
        horizons.append(ks)
        refs.append(torch.stack([metagradient(step, traj, data, order, cot, horizon=K).weights[j]
                                 for j, K in enumerate(ks.tolist())]))  # [k, n]
    assert not torch.equal(horizons[0], horizons[1]), horizons
    T = len(runs[0][5])
    assert any(1 < K < T for ks in horizons for K in ks.tolist())
    ens = magic(loss, opt, epochs=3, batch_size=4, seed=[4, 7], checkpoint_every=2)
    scores = ens.score(p0s, ens.prepare(p0s, data), data, test)  # [n, k]
    torch.testing.assert_close(scores, ((refs[0] + refs[1]) / 2).T, rtol=0, atol=1e-10)
    # Not the exact ensemble: truncation changed some member's columns.
    exact = magic(loss, opt, epochs=3, batch_size=4, seed=[4, 7], horizon=None)
    assert (scores - exact.score(p0s, exact.prepare(p0s, data), data, test)).abs().max() > 1e-3
