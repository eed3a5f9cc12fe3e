"""LoGra's fast paths (merged capture passes, Kronecker GEMMs, factored Lambda) against the plain ones."""

import sys

import pytest
import torch
from test_logra import _problem

from dattri_fn.attribute.capture_rows import can_merge, capture_row_bytes, merged_passes
from dattri_fn.attribute.logra import logra


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * max(1.0, float(b.abs().max())))


def _states_close(s, r):
    for n in r.eigvals:
        _close(s.eigvals[n], r.eigvals[n])
        for q, qr in zip(s.eigvecs[n], r.eigvecs[n], strict=True):
            _close(q.abs(), qr.abs())  # eigenvectors up to sign
    _close(s.feature_rows(), r.feature_rows())


@pytest.mark.parametrize("kind", ["mlp", "seq"])
@pytest.mark.parametrize("seed", [0, 1])
def test_merged_passes_give_the_state_and_scores_of_batches_as_given(kind, seed):
    """prepare(list of batches) merged into one capture pass = batch_rows=1 (as given), 1e-10."""
    fm, (x, y) = _problem(kind, seed, 9)
    train = [(x[:3], y[:3]), (x[3:5], y[3:5]), (x[5:], y[5:])]
    merged, given = logra(fm, proj_dim=2, damping=0.1), logra(fm, proj_dim=2, damping=0.1, batch_rows=1)
    s, r = merged.prepare(fm.params, train), given.prepare(fm.params, train)
    _states_close(s, r)
    _close(merged.score(fm.params, s, train, (x, y)), given.score(fm.params, r, train, (x, y)))


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_kronecker_and_batched_eigenbases_agree(monkeypatch, kind):
    """vec(Q_G^T M Q_A) = vec(M)(Q_G kron Q_A): the Kronecker GEMM path = the [b, k, k] path, 1e-10."""
    fm, (x, y) = _problem(kind, 3, 8)
    train, test = [(x[:4], y[:4]), (x[4:], y[4:])], (x[:5], y[:5])
    m = logra(fm, proj_dim=(3, 2), cache_features=False)
    s = m.prepare(fm.params, train)
    S = m.score(fm.params, s, train, test)
    monkeypatch.setattr(sys.modules[logra.__module__], "_KRON_MAX", 0)
    s0 = m.prepare(fm.params, train)
    for n in s.eigvals:
        _close(s0.eigvals[n], s.eigvals[n])
    _close(m.score(fm.params, s0, train, test), S)


def test_factored_lambda_equals_the_rotated_features():
    """T = 1: E[(Q_G^T g')^2 ((Q_A^T a')^2)^T] = E[(Q_G^T DW' Q_A)^2] (cache_features=False), 1e-10."""
    fm, (x, y) = _problem("mlp", 5, 10)
    train = [(x[:6], y[:6]), (x[6:], y[6:])]
    s = logra(fm, proj_dim=3).prepare(fm.params, train)
    r = logra(fm, proj_dim=3, cache_features=False).prepare(fm.params, train)
    for n in s.eigvals:
        _close(s.eigvals[n], r.eigvals[n])


def test_merged_passes_respect_the_cap_and_the_layout():
    """Runs of consecutive batches, at most budget // row_bytes rows, one layout per run."""
    b = [(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(2, 2), torch.zeros(2)),
         (torch.zeros(4, 5), torch.zeros(4)), (torch.zeros(1, 5), torch.zeros(1))]
    sizes = [p[0].shape for p in merged_passes("f", "train", b, lambda _: 10, 50)]
    assert sizes == [torch.Size([5, 2]), torch.Size([5, 5])]
    sizes = [p[0].shape for p in merged_passes("f", "train", b, lambda _: 10, 40)]
    assert sizes == [torch.Size([3, 2]), torch.Size([2, 2]), torch.Size([4, 5]), torch.Size([1, 5])]
    assert can_merge(b) and not can_merge(b[0]) and not can_merge(b[:1])
    # 2 features per example, widths (out + in) 4 + 2 and 3 + 4, float64
    w = [torch.zeros(4, 2, dtype=torch.float64), torch.zeros(3, 4)]
    assert capture_row_bytes(b[0], w) == (2 + 1) * (6 + 7) * 8
    with pytest.raises(ValueError, match=r"f\(train=...\): expected finite values"):
        list(merged_passes("f", "train", [b[0], (torch.full((1, 2), float("nan")), torch.zeros(1))],
                           lambda _: 10, 50))
