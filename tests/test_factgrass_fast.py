"""FactGraSS's merged passes, flat-factor sketches and single-product scores against the plain paths."""

import pytest
import torch
from test_factgrass import _problem

from dattri_fn.attribute.factgrass import factgrass


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_merged_passes_give_the_state_and_scores_of_batches_as_given(kind):
    """prepare in merged passes (batch_rows=12) = batches as given: phi, (F + lam)^-1, S at 1e-10."""
    fm, (x, y) = _problem(kind, n=20, seed=3)
    train, test = [(x[:7], y[:7]), (x[7:12], y[7:12]), (x[12:], y[12:])], (x[:4], y[:4])
    merged, given = factgrass(fm, proj_dim=8, batch_rows=12), factgrass(fm, proj_dim=8)
    s, r = merged.prepare(fm.params, train), given.prepare(fm.params, train)
    assert s.blocks == r.blocks and s.plan is not None and s.plan == r.plan
    torch.testing.assert_close(merged.prepare.feature_rows(fm.params, s),
                               given.prepare.feature_rows(fm.params, r), rtol=1e-10, atol=1e-12)
    for b in r.inverses:
        torch.testing.assert_close(s.inverses[b], r.inverses[b], rtol=1e-10,
                                   atol=1e-10 * float(r.inverses[b].abs().max()))
    S = merged.score(fm.params, s, train, test)
    torch.testing.assert_close(S, given.score(fm.params, r, train, test), rtol=1e-10,
                               atol=1e-10 * float(S.abs().max()))
    # the cached scores are one product; top_k streams the same rows
    top = merged.score(fm.params, s, None, test, top_k=3)
    torch.testing.assert_close(top.values, S.topk(3, dim=0).values, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
def test_flat_sketch_equals_the_assembled_layer_grads(bias):
    """Checked flat Linear plan: stage 1 from one capture pass == stage1.layer_grads(LayerGrads), bitwise."""
    from torch import nn

    from dattri_fn.attribute.factgrass import _flat_factored, _flat_sketch
    from dattri_fn.model import functional_model
    from dattri_fn.transforms.kronecker import kronecker_layers, make_kronecker_projector
    from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 9, bias=bias), nn.Tanh(), nn.Linear(9, 3)).double().eval()
    fm = functional_model(net, torch.nn.functional.cross_entropy)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (11,), generator=g)
    plan = check_plan(layer_plan(fm), fm.params, (x, y))
    assert _flat_factored(plan)
    layers, rest = kronecker_layers(plan, fm.params)
    stage1 = make_kronecker_projector(layers, proj_dim=4, kind="mask", seed=2, rest=rest, rest_dim=16)
    stacked = {k: v.detach()[None] for k, v in fm.params.items()}
    want = stage1.layer_grads(layer_grads_stacked(plan, stacked, (x[3:], y[3:])))[0]
    assert torch.equal(_flat_sketch(plan, stage1, fm.params, (x[3:], y[3:])), want)
    # a model with parameters outside the captured layers keeps the assembled path
    seq_fm, _ = _problem("seq", n=4)
    assert not _flat_factored(check_plan(layer_plan(seq_fm), seq_fm.params, _problem("seq", n=4)[1]))
