"""MAGIC's early exit (metagradient(early_exit=(R, W))): a target leaves the reverse pass once its
params-cotangent norm has stayed above R x its running minimum for W steps; the band / K_j are then
taken over the horizons walked. Checked against brute-force norms and truncated metagradients."""

import functools

import pytest
import torch
from test_magic_auto import problem, reference_norms
from test_magic_band import RUNS, brute_band

from dattri_fn.attribute.magic import magic, metagradient


def rule_stops(norms, ratio, patience):
    """S_j: the first K at which norms[K'-1, j] > ratio * min(norms[:K', j]) held for the last
    `patience` K' (T when never), by explicit loops over [T, k] norms.  # -> k ints"""
    T, k = norms.shape
    out = []
    for j in range(k):
        col, run, stop = norms[:, j].tolist(), 0, T
        for K in range(1, T + 1):
            run = run + 1 if col[K - 1] > ratio * min(col[:K]) else 0
            if run >= patience and K < T:
                stop = K
                break
        out.append(stop)
    return out


def comes_back(norms, stops, tol=1.1):
    """Per target: does some norm beyond S_j reach tol x the minimum over 1..S_j?  # -> k bools"""
    return [bool((norms[s:, j] <= tol * norms[:s, j].min()).any()) for j, s in enumerate(stops)]


@functools.cache
def case(name):
    kw = dict(RUNS[name])
    run = problem(kw.pop("seed"), **kw)
    loss, opt, step, data, test, order, traj, cot = run
    return run, reference_norms(step, traj, data, order, cot)


# (run, R, W): each stops some targets early, and in each some target's norm comes back after its
# stop (the brute-force norms of tests/test_magic_band.py's runs: ratios 1.22-2.58 over the minimum).
CASES = [("sgd-momentum", 1.2, 1), ("adamw", 1.1, 1)]


@pytest.mark.parametrize(("name", "ratio", "patience"), CASES)
def test_early_exit_band_is_the_band_over_the_walked_horizons(name, ratio, patience):
    """walked_j = S_j of the rule on brute-force norms; band row j = (1/|b_j|) sum_{K in b_j}
    metagradient(horizon=K)[j], b_j the band of norms[:S_j] (1e-10); equal to the full band's row
    (torch.equal) exactly where no later norm returns within 1.1 x the walked minimum."""
    (loss, opt, step, data, test, order, traj, cot), norms = case(name)
    T = len(order)
    stops = rule_stops(norms, ratio, patience)
    back = comes_back(norms, stops)
    assert min(stops) < T and any(back) and not all(back), (stops, back)
    out = metagradient(step, traj, data, order, cot, horizon="band", early_exit=(ratio, patience))
    full = metagradient(step, traj, data, order, cot, horizon="band")
    assert out.walked.tolist() == stops and full.walked.tolist() == [T] * len(stops)
    for j, s in enumerate(stops):
        band = brute_band(norms[:s, j:j + 1])[0]
        ref = torch.stack([metagradient(step, traj, data, order, cot, horizon=K).weights[j]
                           for K in band]).mean(0)
        torch.testing.assert_close(out.weights[j], ref, rtol=0, atol=1e-10)
        if back[j]:
            assert (out.weights[j] - full.weights[j]).abs().max() > 1e-6
        else:
            assert torch.equal(out.weights[j], full.weights[j])
            assert out.horizon[j] == full.horizon[j]


@pytest.mark.parametrize(("name", "ratio", "patience"), CASES)
def test_early_exit_record_and_two_pass_routes_agree(name, ratio, patience):
    """The one-pass record and the two-pass route (record_limit=0) give the same early-exit band
    (1e-12), the same K_j and walked steps."""
    (loss, opt, step, data, test, order, traj, cot), _ = case(name)
    one = metagradient(step, traj, data, order, cot, horizon="band", early_exit=(ratio, patience))
    two = metagradient(step, traj, data, order, cot, horizon="band", early_exit=(ratio, patience),
                       record_limit=0)
    torch.testing.assert_close(one.weights, two.weights, rtol=0, atol=1e-12)
    assert torch.equal(one.horizon, two.horizon) and torch.equal(one.walked, two.walked)


@pytest.mark.parametrize(("name", "ratio", "patience"), CASES)
def test_early_exit_auto_is_the_argmin_over_the_walked_horizons(name, ratio, patience):
    """auto with early_exit: K_j = argmin over K <= S_j of the norms, row j =
    metagradient(horizon=K_j)[j] (1e-10), and the params cotangent is K_j's."""
    (loss, opt, step, data, test, order, traj, cot), norms = case(name)
    stops = rule_stops(norms, ratio, patience)
    out = metagradient(step, traj, data, order, cot, horizon="auto", early_exit=(ratio, patience))
    assert out.walked.tolist() == stops
    for j, s in enumerate(stops):
        K_j = int(norms[:s, j].argmin()) + 1
        assert int(out.horizon[j]) == K_j
        ref = metagradient(step, traj, data, order, cot, horizon=K_j)
        torch.testing.assert_close(out.weights[j], ref.weights[j], rtol=0, atol=1e-10)
        for key in ref.params:
            torch.testing.assert_close(out.params[key][j], ref.params[key][j], rtol=0, atol=1e-10)


def test_early_exit_that_never_fires_is_the_full_pass_bit_for_bit():
    """A rule no norm satisfies (R = 1e6): every target walks T steps and the band equals the full
    pass's torch.equal, with chunks of 1."""
    (loss, opt, step, data, test, order, traj, cot), _ = case("sgd-momentum")
    full = metagradient(step, traj, data, order, cot, horizon="band", chunk_size=1)
    out = metagradient(step, traj, data, order, cot, horizon="band", chunk_size=1,
                       early_exit=(1e6, 1))
    assert torch.equal(out.weights, full.weights) and out.walked.tolist() == [len(order)] * 4


def test_magic_passes_early_exit_to_each_run():
    """magic(horizon="band", early_exit=...) on one run: score = metagradient(...).weights.T (1e-12)."""
    (loss, opt, step, data, test, order, traj, cot), _ = case("sgd-momentum")
    kw = dict(RUNS["sgd-momentum"])
    seed = kw.pop("seed")
    method = magic(loss, opt, epochs=3, batch_size=4, seed=seed, horizon="band", early_exit=(1.2, 1),
                   checkpoint_every=1)
    params0 = traj.checkpoints[0][0]
    state = method.prepare(params0, data)
    ref = metagradient(step, state.runs[0], data, state.orders[0], cot, horizon="band",
                       early_exit=(1.2, 1))
    torch.testing.assert_close(method.score(params0, state, data, test), ref.weights.T,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize(("early_exit", "horizon", "match"), [
    ((1.0, 4), "band", r"early_exit=...\): expected None or a pair \(ratio >= 1.1, steps >= 1\), "
                       r"got \(1.0, 4\)"),
    ((1.5, 0), "band", r"expected None or a pair \(ratio >= 1.1, steps >= 1\)"),
    ((1.5, 2.0), "auto", r"expected None or a pair \(ratio >= 1.1"),
    ("fast", "auto", r"expected None or .*, got 'fast'"),
    ((1.5, 4), None, r"expected None unless horizon is 'auto' or 'band', got \(1.5, 4\) with "
                     r"horizon=None"),
    ((1.5, 4), 3, r"horizon=3"),
])
def test_early_exit_is_checked(early_exit, horizon, match):
    """Bad early_exit values, or one without an adaptive horizon, raise ValueError naming it."""
    (loss, opt, step, data, test, order, traj, cot), _ = case("sgd-momentum")
    with pytest.raises(ValueError, match=match):
        metagradient(step, traj, data, order, cot, horizon=horizon, early_exit=early_exit)


def test_benchmark_rule_stops_where_the_library_does():
    """benchmarks.magic_exit.stops (the grid's rule on recorded norms) == metagradient's walked,
    for every case above and a never-firing rule."""
    from benchmarks.magic_exit import stops

    for name, ratio, patience in [*CASES, ("sgd-momentum", 1.5, 2), ("adamw", 1e6, 1)]:
        (loss, opt, step, data, test, order, traj, cot), norms = case(name)
        out = metagradient(step, traj, data, order, cot, horizon="band", early_exit=(ratio, patience))
        assert torch.equal(stops(norms, ratio, patience), out.walked), name


@functools.cache
def bundled_cnn():
    """A short run of the bundled digits-cnn under SGD_HPARAMS (float32, 128 examples, 20
    epochs: T = 40 steps, 6 test margins) with its full-pass band and its params-cotangent norms
    in metagradient's own order of operations."""
    from torch.func import grad, vmap

    from dattri_fn.attribute.metagradient import _row_norms, _split, _sweep
    from dattri_fn.attribute.trak import classification_margin_loss
    from dattri_fn.eval.tasks import SGD_HPARAMS, get_task, sgd_run
    from dattri_fn.model import functional_model
    from dattri_fn.training import make_step, train

    task = get_task("digits-cnn", n_train=128, n_test=6, seed=0, hparams=dict(SGD_HPARAMS, epochs=20))
    hp = task.hparams
    fm = functional_model(task.make_model(0), task.loss_fn)
    opt, order = sgd_run(task.n_train, seed=0, epochs=hp["epochs"], lr=hp["lr"], weight_decay=0.0,
                         batch_size=hp["batch_size"], momentum=hp["momentum"])
    step = make_step(fm, opt)
    data, test = (task.x_train, task.y_train), (task.x_test, task.y_test)
    traj = train(step, fm.params, opt.init(fm.params), data, order, checkpoint_every=1)
    target = functional_model(task.make_model(0), classification_margin_loss).loss
    cot = vmap(grad(target), in_dims=(None, 0))(traj.params, test)
    k, T = len(task.y_test), len(order)
    bar0 = [cot[n] for n in fm.params] + [torch.zeros(k, *x.shape)
                                          for x in _split(traj.checkpoints[T][1])[0]]
    norms = torch.stack([_row_norms(bar[:len(fm.params)], k) for _, _, bar, _ in
                         _sweep(step, traj, data, order, torch.ones(task.n_train), bar0, 0, None, step)])
    full = metagradient(step, traj, data, order, cot, horizon="band")
    return (step, traj, data, order, cot), norms, full


@pytest.mark.slow
@pytest.mark.parametrize(("ratio", "patience"), [(1.2, 8), (1.1, 1)])
def test_bundled_cnn_rows_equal_the_full_pass_exactly_where_no_norm_comes_back(ratio, patience):
    """digits-cnn (float32, narrowed vmap batches): walked = the rule's S_j on the run's own norms;
    row j torch.equal to the full band's iff no norm beyond S_j is within 1.1x the walked minimum
    ((1.1, 1) stops some targets before a norm comes back, (1.2, 8) none)."""
    run, norms, full = bundled_cnn()
    from benchmarks.magic_exit import stops

    out = metagradient(*run, horizon="band", early_exit=(ratio, patience))
    S = stops(norms, ratio, patience)
    assert torch.equal(out.walked, S) and int(S.min()) < norms.shape[0]
    back = comes_back(norms, S.tolist())
    assert any(back) == (ratio == 1.1), back
    for j, b in enumerate(back):
        assert torch.equal(out.weights[j], full.weights[j]) is not b, j
