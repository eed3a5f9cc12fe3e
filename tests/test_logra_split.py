"""LoGra's capture passes capped at memory_budget() / 256 measured bytes: a batch over the cap is
taken in slices, the first pass of a plain MLP is capped by its exact row bytes, and the state and
scores equal those of whole batches (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dattri_fn.attribute.logra_rows as logra_rows
from dattri_fn.attribute.capture_rows import merged_passes
from dattri_fn.attribute.logra import logra
from dattri_fn.eval.tasks import classification_loss
from dattri_fn.model import functional_model


def test_merged_passes_split_a_batch_over_the_cap():
    """cap = budget // share // measured = 3 rows: 10 + 2 rows give 3, 3, 3, 3 with split, 10, 2 without."""
    g = torch.Generator().manual_seed(0)
    b = [(torch.randn(10, 2, generator=g), torch.arange(10)), (torch.randn(2, 2, generator=g),
                                                              torch.arange(2))]
    kw = dict(measured=lambda: 10, share=4)
    got = list(merged_passes("f", "train", b, lambda _: 1, 120, split=True, **kw))
    assert [p[0].shape[0] for p in got] == [3, 3, 3, 3]
    assert torch.equal(torch.cat([p[0] for p in got]), torch.cat([b[0][0], b[1][0]]))
    assert torch.equal(torch.cat([p[1] for p in got]), torch.cat([b[0][1], b[1][1]]))
    assert [p[0].shape[0] for p in merged_passes("f", "train", b, lambda _: 1, 120, **kw)] == [10, 2]


def test_a_sliced_batch_leftover_joins_the_next_batch():
    """cap 3, batches of 4 + 4 + 1 rows: runs 3, 3, 3 (leftover rows fill the next run), rows in order."""
    b = [(torch.arange(s, s + k)[:, None], torch.arange(s, s + k)) for s, k in ((0, 4), (4, 4), (8, 1))]
    got = list(merged_passes("f", "train", b, lambda _: 1, 120, measured=lambda: 10, share=4, split=True))
    assert [p[0].shape[0] for p in got] == [3, 3, 3]
    assert torch.equal(torch.cat([p[1] for p in got]), torch.arange(9))
    # a batch of another layout starts its own run (the leftover is not concatenated with it)
    b[1] = (b[1][0].double(), b[1][1])
    got = list(merged_passes("f", "train", b, lambda _: 1, 120, measured=lambda: 10, share=4, split=True))
    assert [p[0].shape[0] for p in got] == [3, 1, 3, 1, 1]


def test_sliced_passes_give_the_state_and_scores_of_whole_batches(monkeypatch):
    """A 64 KiB budget (256-byte passes: 1-2 rows each, the first by the MLP's exact row bytes)
    gives the eigenvalues, scores and self-scores of one pass per batch within 1e-10."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fm = functional_model(m, classification_loss)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g))
            for _ in range(3)]
    test = (torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))

    def run():
        method = logra(fm, proj_dim=2)
        state = method.prepare(fm.params, data)
        return state, method.score(fm.params, state, data, test), method.self_score(fm.params, state, data)

    rows = []
    real = logra_rows.mlp_io
    monkeypatch.setattr(logra_rows, "mlp_io", lambda *a: rows.append(a[5].shape[0]) or real(*a))
    whole = run()
    assert rows[:1] == [27]
    rows.clear()
    monkeypatch.setenv("DATTRI_FN_MEMORY", "64K")
    sliced = run()
    assert max(rows[:-1]) <= 2 and sum(rows[:-1]) == 27
    for ln in whole[0].eigvals:
        assert torch.allclose(sliced[0].eigvals[ln], whole[0].eigvals[ln], rtol=1e-10, atol=0)
    assert torch.allclose(sliced[1], whole[1], rtol=1e-10, atol=1e-12)
    assert torch.allclose(sliced[2], whole[2], rtol=1e-10, atol=1e-12)


def _spy_rows(monkeypatch) -> list:
    rows: list = []
    real = logra_rows.mlp_io
    monkeypatch.setattr(logra_rows, "mlp_io", lambda *a: rows.append(a[5].shape[0]) or real(*a))
    return rows


def _single(seed: int, make):
    torch.manual_seed(seed)
    fm = functional_model(make().double(), classification_loss)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(27, 6, generator=g, dtype=torch.float64)
    return fm, (x, torch.randint(0, 3, (27,), generator=g)), (x[:4], torch.randint(0, 3, (4,), generator=g))


def test_one_batch_is_sliced_like_a_list(monkeypatch):
    """prepare(params, (x, y)) (or [(x, y)]) at a 64 KiB budget: passes of <= 2 rows (was one pass of
    27), the features (1e-12), eigenvalues, scores and self-scores (1e-10) of the one-pass state."""
    fm, batch, test = _single(0, lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)))
    method = logra(fm, proj_dim=2)
    rows = _spy_rows(monkeypatch)
    whole = method.prepare(fm.params, batch)
    assert rows == [27]
    rows.clear()
    monkeypatch.setenv("DATTRI_FN_MEMORY", "64K")
    listed = method.prepare(fm.params, [batch])
    assert max(rows) <= 2 and sum(rows) == 27
    rows.clear()
    sliced = method.prepare(fm.params, batch)
    assert max(rows) <= 2 and sum(rows) == 27
    assert torch.equal(listed.feature_rows(), sliced.feature_rows())
    assert torch.allclose(sliced.feature_rows(), whole.feature_rows(), rtol=1e-12, atol=1e-14)
    for ln in whole.eigvals:
        assert torch.allclose(sliced.eigvals[ln], whole.eigvals[ln], rtol=1e-10, atol=0)
    pairs = [(method.score(fm.params, sliced, None, test), method.score(fm.params, whole, None, test)),
             (method.self_score(fm.params, sliced, None), method.self_score(fm.params, whole, None))]
    for got, ref in pairs:
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_training_mode_dropout_or_batchnorm_is_not_sliced(monkeypatch):
    """A Dropout or BatchNorm in training mode: one Batch is one pass, a list is merged, never sliced."""
    makes = [lambda: nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.0), nn.Linear(5, 3)),
             lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3))]
    # 16 KiB: an upper estimate of 17 rows for the first pass, then a measured cap of 1 row
    monkeypatch.setenv("DATTRI_FN_MEMORY", "16K")
    for seed, make in enumerate(makes):
        with pytest.warns(UserWarning, match="training mode"):
            fm, (x, y), _ = _single(seed, make)
        assert fm.module.training
        rows = _spy_rows(monkeypatch)
        logra(fm, proj_dim=2).prepare(fm.params, (x, y))
        logra(fm, proj_dim=2).prepare(fm.params, [(x[:20], y[:20]), (x[20:], y[20:])])
        assert rows == [27, 20, 7]
        fm.module.eval()
        rows.clear()
        logra(fm, proj_dim=2).prepare(fm.params, (x, y))
        assert max(rows) < 27 and sum(rows) == 27


def test_an_empty_first_batch_is_named():
    """An empty first batch in a list is refused by name, as before the first pass was sized."""
    fm = functional_model(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)), classification_loss)
    data = [(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),
            (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"logra\.prepare\(train=\.\.\.\): expected"):
        logra(fm, proj_dim=1).prepare(fm.params, data)
