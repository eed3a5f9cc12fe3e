"""benchmarks.magic_rules: its recorded reverse pass and its horizon rules against the library."""

import torch
from test_magic_auto import problem

from benchmarks.magic_rules import apply_rules, record_pass
from dattri_fn.attribute.magic import metagradient


def test_recorded_pass_and_rules_match_the_library():
    """For K = 1, T/2, T: W[K-1] == metagradient(horizon=K).weights and norms[K-1] == the norm of its
    params cotangent d f_j / d theta_{T-K}, 1e-10; rule 'exact' == horizon=None, 'auto' ==
    horizon='auto' (same K_j), 'ramp' == mean_K W[K], 'auto-ramp' == mean_{K <= K_j} W[K]."""
    _, _, step, data, _, order, traj, cot = problem(4, hidden=5, lr=0.6, momentum=0.5, weight_decay=0.0)
    T = len(order)
    W, norms = record_pass(step, traj, data, order, cot)
    assert W.shape == (T, 4, 10) and norms.shape == (T, 4)
    for K in (1, T // 2, T):
        ref = metagradient(step, traj, data, order, cot, horizon=K)
        torch.testing.assert_close(W[K - 1], ref.weights, rtol=0, atol=1e-10)
        size = torch.sqrt(sum((v.reshape(4, -1) ** 2).sum(1) for v in ref.params.values()))
        torch.testing.assert_close(norms[K - 1], size, rtol=1e-10, atol=0)
    rules, ks = apply_rules(W, norms)
    auto = metagradient(step, traj, data, order, cot, horizon="auto")
    assert torch.equal(ks, auto.horizon) and len(set(ks.tolist())) > 1
    torch.testing.assert_close(rules["auto"], auto.weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(rules["exact"], W[-1], rtol=0, atol=0)
    torch.testing.assert_close(rules["ramp"], sum(W) / T, rtol=0, atol=1e-12)
    for j, K in enumerate(ks.tolist()):
        torch.testing.assert_close(rules["auto-ramp"][j], W[:K, j].mean(0), rtol=0, atol=1e-12)
