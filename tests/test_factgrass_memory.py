"""FactGraSS's memory: factors or features cached in place pass by pass, passes capped by measured bytes."""

import importlib
import sys

import pytest
import torch
from test_factgrass import _problem

from dattri_fn.attribute.factgrass import factgrass


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons run on one thread (CI runs two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind,cache", [("mlp", "features"), ("mlp", "factors"), ("seq", "features")])
def test_capped_passes_write_the_features_of_one_pass(kind, cache, monkeypatch, one_thread):
    """Passes of 4 rows: phi as one pass's (torch.equal); F, S (1e-10); factors: F and S bitwise."""
    fm, (x, y) = _problem(kind, n=16, seed=5)
    module = sys.modules[factgrass.__module__]
    monkeypatch.setattr(module, "_keep_bytes", lambda: -1 if cache == "factors" else 2**62)
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    m = factgrass(fm, proj_dim=8)
    one = m.prepare(fm.params, train)  # one merged pass of 16 rows
    passes = []
    real = module.merged_passes

    def spy(*args, **kwargs):
        for p in real(*args, **kwargs):
            passes.append(p[0].shape[0])
            yield p

    monkeypatch.setattr(module, "merged_passes", spy)
    monkeypatch.setattr(module, "memory_budget", lambda: 1)  # a pass per batch
    got = m.prepare(fm.params, train)
    assert passes == [4, 4, 4, 4]
    rows = m.prepare.feature_rows(fm.params, got)
    assert torch.equal(rows, m.prepare.feature_rows(fm.params, one)) and rows.shape[0] == 16
    assert (got.train_factors is not None) == (cache == "factors")
    if cache == "features":  # written pass by pass into one [n, d]
        assert got.train_features.is_contiguous()
    for b in one.inverses:
        torch.testing.assert_close(got.inverses[b], one.inverses[b], rtol=1e-10,
                                   atol=1e-10 * float(one.inverses[b].abs().max()))
    S = m.score(fm.params, one, None, (x[:3], y[:3]))
    torch.testing.assert_close(m.score(fm.params, got, None, (x[:3], y[:3])), S, rtol=1e-10,
                               atol=1e-10 * float(S.abs().max()))
    # the Fisher is summed in spans fixed by n, so passes that give the same factors (here: float64,
    # 16 rows; other row counts may round the capture GEMMs otherwise) change no bit of it
    if cache == "factors":
        assert all(torch.equal(got.inverses[b], one.inverses[b]) for b in one.inverses)
        assert torch.equal(m.score(fm.params, got, None, (x[:3], y[:3])), S)


@pytest.mark.parametrize("plain", [True, False], ids=["plain-mlp", "hooked"])
def test_a_pass_measures_its_bytes_and_the_next_runs_follow_them(monkeypatch, plain):
    """Runs hold budget // _PASS_SHARE // measured rows; the first pass: a plain MLP's bytes are known
    before it (the same number the pass then measures), any other model's first pass takes
    ONE_PASS_ROWS (= 8 here) rows."""
    from dattri_fn.attribute import capture_rows

    fm, (x, y) = _problem("mlp", n=40, seed=1)
    if not plain:  # a hook (changing nothing): mlp_chain, so _plain_row_bytes, refuses the model
        fm.module[0].register_forward_hook(lambda mod, args, out: None)
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 40, 4)]
    seen: list = []
    real = capture_rows.merged_passes

    def spy(*args, **kwargs):
        for p in real(*args, **kwargs):
            seen.append((p[0].shape[0], kwargs["measured"]()))
            yield p

    module = importlib.import_module("dattri_fn.attribute.factgrass")  # (the package re-exports
    monkeypatch.setattr(module, "merged_passes", spy)                  # the function by its name)
    monkeypatch.setattr(module, "memory_budget", lambda: 2**22)
    monkeypatch.setattr(capture_rows, "ONE_PASS_ROWS", 8)
    m = factgrass(fm, proj_dim=8)
    state = m.prepare(fm.params, train)
    # per example: x [12] float64 + y int64, and the captured a/g of the layers (12 + 20, 20 + 4)
    measured = 12 * 8 + 8 + (12 + 20 + 20 + 4) * 8
    assert module._PASS_SHARE == 512
    # 2**22 // 512 // 552 = 14 rows a run: 3 batches of 4
    if plain:
        assert seen == [(12, measured)] * 3 + [(4, measured)]
    else:
        assert seen == [(8, None), (12, measured), (12, measured), (8, measured)]
    assert state.cached_rows() == 40
