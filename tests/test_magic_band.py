"""MAGIC's horizon="band": per target, the mean of the truncated metagradients over the near-minimal
horizons, against the brute-force mean of metagradient(horizon=K) over that band."""

import functools
import math

import pytest
import torch
from test_magic_auto import DT, problem, reference_norms

from dattri_fn.attribute.magic import band_weights, magic, metagradient
from dattri_fn.training import adamw, batch_order, train


def brute_band(norms):
    """Per target the band {K >= K_j/2 : norm_K <= 1.1 norm_{K_j}} as a Python list, from
    explicit loops over [T, k] norms (K_j the first minimum).  # -> k lists of K"""
    T, k = norms.shape
    out = []
    for j in range(k):
        col = norms[:, j].tolist()
        K_j = 1 + min(range(T), key=lambda i: (col[i], i))
        out.append([K for K in range(1, T + 1) if 2 * K >= K_j and col[K - 1] <= 1.1 * col[K_j - 1]])
    return out


def brute_force(step, traj, data, order, cot):
    """Row j = (1/|band_j|) sum_{K in band_j} metagradient(horizon=K).weights[j], with the band
    from separate vjps per K.  # -> [k, n], bands"""
    norms = reference_norms(step, traj, data, order, cot)
    bands = brute_band(norms)
    # No norm so near the 10% edge or the minimum that round-off could move it across.
    low = norms.min(0).values
    assert bool(((norms - 1.1 * low).abs() > 1e-8 * low).all())
    assert bool((norms.sort(0).values[1] - low > 1e-8 * low).all())
    by_K = {K: metagradient(step, traj, data, order, cot, horizon=K).weights
            for K in sorted({K for band in bands for K in band})}
    rows = [torch.stack([by_K[K][j] for K in band]).mean(0) for j, band in enumerate(bands)]
    return torch.stack(rows), bands


RUNS = {
    "sgd-momentum": dict(seed=4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0),
    "adamw": dict(seed=1, hidden=5, lr=0.0, momentum=0.0, weight_decay=0.0,
                  opt=adamw(0.2, weight_decay=0.1)),
}


@functools.cache
def run_and_reference(name):
    kw = dict(RUNS[name])
    run = problem(kw.pop("seed"), **kw)
    loss, opt, step, data, test, order, traj, cot = run
    return run, brute_force(step, traj, data, order, cot)


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("record_limit", [2**24, 0])
def test_band_equals_the_brute_force_mean_of_truncated_metagradients(name, record_limit):
    """band's row j == (1/|band_j|) sum_{K in band_j} metagradient(horizon=K).weights[j] (1e-10),
    by the one-pass record and by the two-pass route (record_limit=0); params/horizon are K_j's."""
    (loss, opt, step, data, test, order, traj, cot), (ref, bands) = run_and_reference(name)
    # Not degenerate: some band holds several horizons, some target's band is not just {T}.
    assert max(len(b) for b in bands) > 1 and any(b != [len(order)] for b in bands), bands
    out = metagradient(step, traj, data, order, cot, horizon="band", record_limit=record_limit)
    torch.testing.assert_close(out.weights, ref, rtol=0, atol=1e-10)
    auto = metagradient(step, traj, data, order, cot, horizon="auto")
    assert torch.equal(out.horizon, auto.horizon)
    for key in auto.params:
        assert torch.equal(out.params[key], auto.params[key])
    assert out.weights.abs().max() > 1e-3 and (out.weights - auto.weights).abs().max() > 1e-6


def test_ensemble_band_is_the_mean_of_each_members_brute_force_band():
    """magic(horizon="band") on R = 2 runs: score = (1/R) sum_c band_c.T, each member's band from
    its own brute-force norms (1e-10)."""
    kw = dict(hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    runs = [problem(4, **kw), problem(4, init_seed=11, order_seed=7, **kw)]
    loss, opt, _, data, test, _, _, _ = runs[0]
    refs = [brute_force(step, traj, data, order, cot)[0]
            for _, _, step, _, _, order, traj, cot in runs]
    p0s = [run[6].checkpoints[0][0] for run in runs]
    ens = magic(loss, opt, epochs=3, batch_size=4, seed=[4, 7], checkpoint_every=2, horizon="band")
    scores = ens.score(p0s, ens.prepare(p0s, data), data, test)  # [n, k]
    torch.testing.assert_close(scores, ((refs[0] + refs[1]) / 2).T, rtol=0, atol=1e-10)


def test_band_weights_count_each_step_in_the_band_horizons_that_reach_it():
    """a[K-1, j] = |{K' in band_j : K' >= K}| / |band_j| exactly, from a hand-made [T, k] curve;
    a target with no finite norm gets the full pass (band {T}: every step weighs 1)."""
    nan, inf = math.nan, math.inf
    norms = torch.tensor([[5.0, nan, 1.0],
                          [2.0, nan, 1.0],
                          [2.1, inf, 3.0],
                          [1.0, nan, 0.5],
                          [1.05, nan, 0.9]], dtype=DT)  # [T = 5, k = 3]
    a, anchor = band_weights(norms)
    # Target 0: K_0 = 4, band {K >= 2, norm <= 1.1} = {4, 5}. Target 1: never finite, {5}.
    # Target 2: K_2 = 4, band {K >= 2, norm <= 0.55} = {4}.
    assert anchor.tolist() == [4, 5, 4]
    expect = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0],
                           [1.0, 1.0, 1.0], [0.5, 1.0, 0.0]], dtype=DT)
    assert torch.equal(a, expect)


def test_band_is_exact_when_cotangents_shrink():
    """Convex, contracting run (test_magic_auto's premise): K_j = T, the band is the K >= T/2 within
    10% of the last norm, and the band mean equals the brute force at 1e-10."""
    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=0, lr=0.2, momentum=0.0, weight_decay=0.05)
    ref, bands = brute_force(step, traj, data, order, cot)
    out = metagradient(step, traj, data, order, cot, horizon="band")
    torch.testing.assert_close(out.weights, ref, rtol=0, atol=1e-10)
    assert out.horizon.tolist() == [len(order)] * len(bands)


def test_band_keeps_a_nan_run_visible():
    """No finite norm: band = {T}, the exact pass, NaN where it has NaN (test_magic_auto's run)."""
    def step(params, opt_state, batch, w):
        return {"w": torch.sqrt(params["w"] ** 2) + 0.1 * (w[:, None] * batch).mean(0)}, opt_state

    data = torch.zeros(3, 2, dtype=DT)
    order = batch_order(3, batch_size=None, epochs=2, seed=0)
    traj = train(step, {"w": torch.zeros(2, dtype=DT)}, (), data, order, checkpoint_every=1)
    cot = {"w": torch.ones(2, 2, dtype=DT)}
    exact = metagradient(step, traj, data, order, cot)
    for limit in (2**24, 0):
        out = metagradient(step, traj, data, order, cot, horizon="band", record_limit=limit)
        assert out.horizon.tolist() == [2, 2] and out.weights.isnan().any()
        assert torch.equal(out.weights.isnan(), exact.weights.isnan())


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_record_limit_must_be_a_non_negative_int(bad):
    """metagradient(record_limit=-1) is refused naming the argument."""
    loss, opt, step, data, test, order, traj, cot = problem(
        4, hidden=0, lr=0.2, momentum=0.0, weight_decay=0.05)
    with pytest.raises((ValueError, TypeError), match=r"metagradient\(record_limit=...\): expected"):
        metagradient(step, traj, data, order, cot, horizon="band", record_limit=bad)


def test_two_pass_route_walks_back_only_through_the_longest_band_horizon():
    """Counting step calls (checkpoint_every=1: every state kept, no replay; one vjp forward per
    reverse step): the record takes T; record_limit=0 takes T + L, L = the longest horizon in any
    band."""
    (loss, opt, step, data, test, order, traj, cot), (ref, bands) = run_and_reference("sgd-momentum")
    calls = []

    def counted(*args):
        calls.append(1)
        return step(*args)

    T, L = len(order), max(max(b) for b in bands)
    for limit, expect in ((2**24, T), (0, T + L)):
        calls.clear()
        out = metagradient(counted, traj, data, order, cot, horizon="band", record_limit=limit)
        assert len(calls) == expect
        torch.testing.assert_close(out.weights, ref, rtol=0, atol=1e-10)
    assert L < T  # the second pass is shorter than the first
