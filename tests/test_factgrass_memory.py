"""FactGraSS's memory: features written in place pass by pass, merged passes capped by measured bytes."""

import importlib

import pytest
import torch
from test_factgrass import _problem

from dattri_fn.attribute.factgrass import factgrass


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_capped_passes_write_the_features_of_one_pass(kind, monkeypatch):
    """Passes of 4 rows written into one [n, d] buffer: phi as one pass's (torch.equal); F, S (1e-10)."""
    fm, (x, y) = _problem(kind, n=16, seed=5)
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    m = factgrass(fm, proj_dim=8)
    one = m.prepare(fm.params, train)  # one merged pass of 16 rows
    monkeypatch.setattr("dattri_fn.attribute.capture_rows.ONE_PASS_ROWS", 4)
    monkeypatch.setattr("dattri_fn.attribute.capture_rows.PASS_SHARE", 2**40)
    got = m.prepare(fm.params, train)
    assert torch.equal(got.train_features, one.train_features)
    assert got.train_features.is_contiguous() and got.train_features.shape[0] == 16
    for b in one.inverses:
        torch.testing.assert_close(got.inverses[b], one.inverses[b], rtol=1e-10,
                                   atol=1e-10 * float(one.inverses[b].abs().max()))
    S = m.score(fm.params, one, None, (x[:3], y[:3]))
    torch.testing.assert_close(m.score(fm.params, got, None, (x[:3], y[:3])), S, rtol=1e-10,
                               atol=1e-10 * float(S.abs().max()))


def test_a_pass_measures_its_bytes_and_the_next_runs_follow_them(monkeypatch):
    """After the first pass (ONE_PASS_ROWS = 8 rows), runs hold budget // PASS_SHARE // measured rows."""
    from dattri_fn.attribute import capture_rows

    fm, (x, y) = _problem("mlp", n=40, seed=1)
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 40, 4)]
    seen: list = []
    real = capture_rows.merged_passes

    def spy(*args, **kwargs):
        for p in real(*args, **kwargs):
            seen.append((p[0].shape[0], kwargs["measured"]()))
            yield p

    module = importlib.import_module("dattri_fn.attribute.factgrass")  # (the package re-exports
    monkeypatch.setattr(module, "merged_passes", spy)                  # the function by its name)
    monkeypatch.setattr(module, "memory_budget", lambda: 2**20)
    monkeypatch.setattr(capture_rows, "ONE_PASS_ROWS", 8)
    m = factgrass(fm, proj_dim=8)
    state = m.prepare(fm.params, train)
    # per example: x [12] float64 + y int64, and the captured a/g of the layers (12 + 20, 20 + 4)
    measured = 12 * 8 + 8 + (12 + 20 + 20 + 4) * 8
    # 2**20 // 64 // 552 = 29 rows a run: 7 batches of 4
    assert seen == [(8, None), (28, measured), (4, measured)]
    assert state.train_features.shape[0] == 40
