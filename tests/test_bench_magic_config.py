"""benchmarks.magic_config: the early-exit grid's margin column and the recorder's timed pass."""

import math

import torch

from benchmarks import magic_config
from benchmarks.magic_exit import stops


def test_closest_return_is_the_smallest_later_norm_over_the_walked_minimum():
    """norms of two targets: target 0 stops at K = 3 (walked min 1.0) and later comes back to
    1.05 (the margin); target 1 never stops (inf); the closest is 1.05, a band change (<= 1.1)."""
    norms = torch.tensor([[2.0, 3.0], [1.0, 2.0], [1.5, 1.0], [1.6, 0.9], [1.05, 0.8]],
                         dtype=torch.float64)
    s = stops(norms, 1.2, 2)
    assert s.tolist() == [4, 5]
    assert math.isclose(magic_config.closest_return(norms, s), 1.05 / 1.0)
    assert magic_config.closest_return(norms, torch.tensor([5, 5])) == math.inf


def test_timed_pass_matches_the_library_full_pass():
    """The recorder's pass (the library's _sweep body, timed) gives what the exit grid reads: W[T-1]
    is metagradient(horizon=None).weights, and through benchmarks.magic_exit its (W, norms) give
    metagradient(horizon="band") and each early exit's scores and walked steps (float64 SGD with
    momentum, 3 epochs of 3 batches, 3 targets). Wrong norms (scaled, shifted or reversed in
    time) change the band or the stops."""
    from torch.func import grad, vmap

    from benchmarks.magic_exit import stops, walked_band
    from dattri_fn.attribute.metagradient import metagradient
    from dattri_fn.training import make_step, sgd, train
    from dattri_fn.training.run import batch_order

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, generator=g,
                                                                              dtype=torch.float64)
    loss = lambda p, ex: (ex[0] @ p["w"] + p["b"] - ex[1]) ** 2
    p0 = {"w": torch.randn(3, generator=g, dtype=torch.float64),
          "b": torch.zeros((), dtype=torch.float64)}
    opt = sgd(0.05, momentum=0.9)
    step = make_step(loss, opt)
    order = batch_order(12, batch_size=4, epochs=3, seed=0)
    traj = train(step, p0, opt.init(p0), (x, y), order, checkpoint_every=1)
    cot = vmap(grad(lambda p, ex: -loss(p, ex)), in_dims=(None, 0))(traj.params, (x[:3], y[:3]))
    W, norms, parts = magic_config.timed_pass(step, traj, (x, y), order, cot, None, step)
    assert W.shape == (len(order), 3, 12) and norms.shape == (len(order), 3)
    assert set(parts) == {"split_take", "vjp_forward", "pullback", "accumulate_norms"}
    full = metagradient(step, traj, (x, y), order, cot)
    torch.testing.assert_close(W[-1], full.weights, rtol=1e-12, atol=1e-14)
    band, _ = walked_band(W, norms, torch.full((3,), len(order)))
    want = metagradient(step, traj, (x, y), order, cot, horizon="band")
    torch.testing.assert_close(band, want.weights, rtol=1e-12, atol=1e-14)
    for rule in ((1.1, 1), (1.1, 2), (1.2, 2)):
        want = metagradient(step, traj, (x, y), order, cot, horizon="band", early_exit=rule)
        s = stops(norms, *rule)
        assert s.tolist() == want.walked.tolist()
        torch.testing.assert_close(walked_band(W, norms, s)[0], want.weights, rtol=1e-12,
                                   atol=1e-14)
