"""horizon="band"'s two-pass route (a record over record_limit): the second sweep drops each target
after its own longest band horizon (stop 24, review R1 F3) and gives the same bits as walking every
target through the band's longest horizon."""

import importlib

import pytest
import torch
from test_magic_band import RUNS, run_and_reference

from dattri_fn.attribute.metagradient import band_weights, metagradient

# The module (dattri_fn.attribute re-exports the function under the module's name).
mg = importlib.import_module("dattri_fn.attribute.metagradient")


def counted(monkeypatch, drop):
    """Run metagradient's second sweep with ``drop``; return the list the vmapped batch sizes of
    that sweep are appended to (one entry per step)."""
    sizes = []
    sweep, band_sum = mg._sweep, mg._band_sum

    def second(*args, **kw):
        # Only _band_sum's sweep passes no narrow list when drop is False; count both routes'.
        for out in sweep(*args, **kw):
            sizes.append(out[3].shape[0])
            yield out

    def patched(*args, **kw):
        monkeypatch.setattr(mg, "_sweep", second)
        try:
            return band_sum(*args, drop=drop, **kw)
        finally:
            monkeypatch.setattr(mg, "_sweep", sweep)

    monkeypatch.setattr(mg, "_band_sum", patched)
    return sizes


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("early_exit", [None, (1.1, 1)])
def test_second_sweep_drops_finished_targets_bit_for_bit(monkeypatch, name, chunk_size,
                                                         early_exit):
    """Two-pass band with targets dropped == every target walked to the longest horizon
    (torch.equal, all fields) and == the one-pass record (1e-12); the dropped sweep's vmapped
    batch shrinks step by step (fewer target-steps than k per step), the undropped one stays k."""
    (loss, opt, step, data, test, order, traj, cot), _ = run_and_reference(name)
    T, k = len(order), next(iter(cot.values())).shape[0]
    kw = dict(horizon="band", record_limit=0, chunk_size=chunk_size, early_exit=early_exit)
    sizes_all = counted(monkeypatch, drop=False)
    full = metagradient(step, traj, data, order, cot, **kw)
    monkeypatch.undo()
    sizes = counted(monkeypatch, drop=True)
    out = metagradient(step, traj, data, order, cot, **kw)
    monkeypatch.undo()
    assert torch.equal(out.weights, full.weights)
    assert torch.equal(out.horizon, full.horizon) and torch.equal(out.walked, full.walked)
    for key in full.params:
        assert torch.equal(out.params[key], full.params[key])
    one = metagradient(step, traj, data, order, cot, horizon="band", early_exit=early_exit)
    torch.testing.assert_close(out.weights, one.weights, rtol=0, atol=1e-12)
    assert len(sizes_all) == len(sizes) and set(sizes_all) == {k}
    assert sum(sizes) < k * len(sizes), sizes  # some target left early: not vacuous
    assert sizes == sorted(sizes)[::-1] and sizes[-1] >= 1 and len(sizes) <= T


def test_band_sum_drops_each_target_at_its_reach(monkeypatch):
    """_band_sum's second sweep on a hand-made band (T = 5, k = 2; target 0's weights reach
    horizon 5, target 1's end at horizon 4: a[4, 1] == 0) through a stand-in _sweep that hands
    back fixed cotangents and obeys ``narrow``: target 1 leaves after step t = 1 (its horizon 4),
    so the batch walked is [2, 2, 2, 2, 1], and the sum equals sum_t a[T-t-1] c_t from the full
    cotangents (float64, 1e-12). Calls _band_sum itself, so a wrong reach fails here."""
    norms = torch.tensor([[5.0, 1.0], [2.0, 1.0], [2.1, 3.0], [1.0, 0.5], [1.05, 0.9]],
                         dtype=torch.float64)
    a, _ = band_weights(norms)
    assert bool((a[4:, 1] == 0).all()) and bool((a[:4, 1] > 0).all()) and bool((a[:, 0] > 0).all())
    T, k, n = 5, 2, 7
    g = torch.Generator().manual_seed(0)
    order = [torch.randperm(n, generator=g)[:3] for _ in range(T)]
    full = [torch.randn(k, 3, generator=g, dtype=torch.float64) for _ in range(T)]
    sizes = []

    def sweep(step, trajectory, data, order_, weights, bar, first, chunk_size, vjp_step,
              narrow=None):
        assert first == 0  # the band's longest horizon is T
        live = torch.arange(k)
        for t in range(T - 1, first - 1, -1):
            if narrow is not None and narrow[0] is not None:
                live, narrow[0] = live[narrow[0]], None
            sizes.append(len(live))
            yield t, order_[t], None, full[t][live]

    monkeypatch.setattr(mg, "_sweep", sweep)
    out = mg._band_sum(None, None, None, order, None, None, norms, None, None, None,
                       torch.full((k, n), float("nan"), dtype=torch.float64))
    assert sizes == [2, 2, 2, 2, 1]
    expected = torch.zeros(k, n, dtype=torch.float64)
    for t in range(T):
        expected.index_add_(1, order[t], a[T - t - 1][:, None] * full[t])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
