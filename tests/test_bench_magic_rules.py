"""benchmarks.magic_rules: its recorded reverse pass and its horizon rules against the library."""

import torch
from test_magic_auto import problem, reference_norms

from benchmarks.magic_rules import apply_rules, record_pass
from dattri_fn.attribute.magic import metagradient


def test_recorded_pass_and_rules_match_the_library():
    """W[K-1] == metagradient(horizon=K).weights and norms[K-1] == |thetabar_{T-K}| (brute force) for
    every K, 1e-10; rule 'exact' == horizon=None, 'auto' == horizon='auto', 'ramp' == mean_K W[K],
    'auto-ramp' == mean_{K <= K_j} W[K] per target."""
    _, _, step, data, _, order, traj, cot = problem(4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    T = len(order)
    W, norms = record_pass(step, traj, data, order, cot)
    assert W.shape == (T, 4, 10) and norms.shape == (T, 4)
    for K in range(1, T + 1):
        ref = metagradient(step, traj, data, order, cot, horizon=K).weights
        torch.testing.assert_close(W[K - 1], ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(norms, reference_norms(step, traj, data, order, cot), rtol=1e-10, atol=0)
    rules, ks = apply_rules(W, norms)
    auto = metagradient(step, traj, data, order, cot, horizon="auto")
    assert torch.equal(ks, auto.horizon) and len(set(ks.tolist())) > 1
    torch.testing.assert_close(rules["auto"], auto.weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(rules["exact"], metagradient(step, traj, data, order, cot).weights,
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(rules["ramp"], sum(W) / T, rtol=0, atol=1e-12)
    for j, K in enumerate(ks.tolist()):
        torch.testing.assert_close(rules["auto-ramp"][j], W[:K, j].mean(0), rtol=0, atol=1e-12)
