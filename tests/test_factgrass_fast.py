"""FactGraSS's merged capture passes and single-product scores against batches as given."""

import pytest
import torch
from test_factgrass import _problem

from dattri_fn.attribute.factgrass import factgrass


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_merged_passes_give_the_state_and_scores_of_batches_as_given(kind):
    """prepare(list of batches) in one pass = batch_rows=1 (as given): phi, (F + lam)^-1, S at 1e-10."""
    fm, (x, y) = _problem(kind, n=20, seed=3)
    train, test = [(x[:7], y[:7]), (x[7:12], y[7:12]), (x[12:], y[12:])], (x[:4], y[:4])
    merged, given = factgrass(fm, proj_dim=8), factgrass(fm, proj_dim=8, batch_rows=1)
    s, r = merged.prepare(fm.params, train), given.prepare(fm.params, train)
    assert s.blocks == r.blocks and s.plan.checked and r.plan.checked
    torch.testing.assert_close(s.train_features, r.train_features, rtol=1e-10, atol=1e-12)
    for b in r.inverses:
        torch.testing.assert_close(s.inverses[b], r.inverses[b], rtol=1e-10,
                                   atol=1e-10 * float(r.inverses[b].abs().max()))
    S = merged.score(fm.params, s, train, test)
    torch.testing.assert_close(S, given.score(fm.params, r, train, test), rtol=1e-10,
                               atol=1e-10 * float(S.abs().max()))
    # the cached scores are one product; top_k streams the same rows
    top = merged.score(fm.params, s, None, test, top_k=3)
    torch.testing.assert_close(top.values, S.topk(3, dim=0).values, rtol=1e-12, atol=1e-14)
