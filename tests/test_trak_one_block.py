"""TRAK's score from a feature cache of one block: the product directly, as stream_scores gives it."""

import pytest
import torch
from torch import nn

from dattri_fn.attribute.pipeline import stream_scores
from dattri_fn.attribute.trak import classification_margin_loss, classification_weight_loss, trak
from dattri_fn.attribute.trak_state import WeightedRows, cached_chunks, one_block_scores, train_rows
from dattri_fn.attribute.trak_state import test_rows as preconditioned  # not collected as a test
from dattri_fn.model import functional_model

F64 = torch.float64


def _case(dtype=F64):
    gen = torch.Generator().manual_seed(7)
    models = []
    for _ in range(2):
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype).eval()
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=gen, dtype=dtype) / 2
        models.append(m)
    x = torch.randn(40, 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (40,), generator=gen)
    margin = functional_model(models[0], classification_margin_loss)
    weight = functional_model(models[0], classification_weight_loss)
    params = [functional_model(m, classification_margin_loss).params for m in models]
    return margin, weight, params, [(x[:16], y[:16]), (x[16:32], y[16:32])], (x[32:], y[32:])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_one_block_score_equals_streamed_and_closed_form(dtype):
    """score (cache in one block) == stream_scores over the same cached rows bit for bit, and
    == Qbar_i / C sum_c phi_ci^T K_c psi_cj from the state's own features (float64: 1e-12)."""
    margin, weight, params, train, test = _case(dtype)
    method = trak(margin, weight_fn=weight, proj_dim=8, damping=0.1)
    state = method.prepare(params, train)
    S = method.score(params, state, None, test)
    K = state.kernel
    idx, rows = cached_chunks(state, K.device)
    assert len(idx) == 1  # the one-block path is the one taken
    # the test rows phi(z_j) from the same projection: the cache of a prepare on the test set
    test_state = method.prepare(params, [test])
    psi = test_state.train_features.to(K.dtype)
    streamed = stream_scores(lambda i: train_rows(*rows(i)), idx, preconditioned(K, psi), func="f")
    assert torch.equal(S, streamed)
    C = K.shape[0]
    phi = state.train_features.to(F64)
    want = sum(phi[c] @ K[c].to(F64) @ psi[c].to(F64).T for c in range(C))
    want = want * (state.train_weights.to(F64) / C)[:, None]
    tol = 1e-12 if dtype == F64 else 1e-5
    assert float((S.to(F64) - want).abs().max()) <= tol * float(want.abs().max())


def test_one_block_scores_checks_like_stream_scores():
    """one_block_scores refuses non-finite test rows and non-finite scores as stream_scores does,
    and rows of another width by name (stream_scores leaves that to the product's error on TRAK's
    weighted rows); each error names func."""
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(2, 5, 4, generator=gen, dtype=F64)
    rows = WeightedRows(phi, torch.ones(5, dtype=F64))
    good = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    assert torch.equal(one_block_scores("f", rows, good), stream_scores(
        lambda i: rows, [(torch.arange(5),)], good, func="f"))
    bad = good.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^f\(test_features=...\): expected finite features"):
        one_block_scores("f", rows, bad)
    with pytest.raises(ValueError, match=r"^f\(test_features=...\): expected rows like the train"):
        one_block_scores("f", rows, good[..., :3])
    huge = WeightedRows(phi * 1e200, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match=r"^f\(train=...\): expected examples whose per-example"):
        one_block_scores("f", huge, good * 1e200)
