"""A layer plan of LayerNorms alone (review R4 F1's pre-existing case, stop 22).

GPT-2 with only its LayerNorms attributed: the plan has no Kronecker-form layer, only norms, whose
rows come from one capture pass. Before, such a model had no plan: Grad-Dot crashed on the SDPA
GPT-2 (vmap cannot run its mask helper), FactGraSS refused it and TRAK refused the Kronecker
projection. Every consumer now gives the dense float64 ``vmap(grad)`` reference of the eager twin.
"""
import pytest
import torch
from test_layer_plan_ties_only import DT, _batch, _gpt2, _projected_rows, _silent

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.losses import causal_lm_loss
from dattri_fn.transforms.kronecker import kronecker_layers, make_kronecker_projector
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan
from dattri_fn.transforms.project import make_projector

pytest.importorskip("transformers")

NORMS = ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
         "transformer.h.1.ln_2", "transformer.ln_f"]


def _norms_only(attn: str = "eager"):
    return functional_model(_gpt2(attn), causal_lm_loss, params=lambda n: ".ln_" in n)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_plan_of_norms_alone_gives_the_vmap_grad_rows_and_grad_dot(attn):
    """plan.layers == {}, the 5 LayerNorms in plan.norms, nothing autodiff; rows and Grad-Dot ==
    the eager model's vmap(grad) (1e-10 relative), no warning (no per-example loop)."""
    fm, eager = _norms_only(attn), _norms_only()
    plan = layer_plan(fm)
    assert plan is not None and plan.layers == {} and list(plan.norms) == NORMS
    assert plan.autodiff == () and plan.rest == tuple(fm.params)
    rows = lambda b: per_sample_grad(eager.loss, eager.params, b)
    batch = _batch(1)
    stacked = {k: v[None] for k, v in fm.params.items()}
    checked = _silent(lambda: check_plan(plan, stacked, batch))
    assert not checked.dense and not checked.loop
    got = layer_grads_stacked(checked, stacked, batch).to_dense()[0]
    want = rows(batch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    train, test = [_batch(1), _batch(2, 3)], _batch(3, 3)
    S = _silent(lambda: grad_dot(fm).score(fm.params, (), train, test))
    want = torch.cat([rows(b) for b in train]) @ rows(test).T
    torch.testing.assert_close(S, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_factgrass_and_the_kronecker_projection_take_the_norm_rows_as_their_rest():
    """No Kronecker layer: FactGraSS = the rest block's mask + count-sketch of the vmap(grad) rows,
    Fisher-preconditioned; KroneckerProjector.layer_grads == project_rest of those rows (1e-10)."""
    fm = _norms_only()
    plan = layer_plan(fm)
    layers, rest = kronecker_layers(plan, fm.params)
    assert layers == {} and [k for k, _ in rest] == list(fm.params)
    proj = make_kronecker_projector(layers, proj_dim=3, seed=5, rest=rest, rest_dim=7, dtype=DT)
    batch = _batch(4)
    stacked = {k: v[None] for k, v in fm.params.items()}
    got = proj.layer_grads(layer_grads_stacked(check_plan(plan, stacked, batch), stacked, batch))
    torch.testing.assert_close(got[0], torch.cat(_projected_rows(fm, proj, batch), -1),
                               rtol=1e-10, atol=1e-10)
    train, test = [_batch(1), _batch(2, 3)], _batch(3, 3)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    S = _silent(lambda: m.score(fm.params, m.prepare(fm.params, train), train, test))
    stage1 = make_kronecker_projector(layers, proj_dim=5, kind="mask", seed=2, rest=rest,
                                      rest_dim=25, dtype=DT)
    R = make_projector(25, proj_dim=16, kind="sjlt", seed=3).matrix(DT)
    phi = lambda b: _projected_rows(fm, stage1, b)[0] @ R  # one block: the rest  # [b, 16]
    ps = torch.cat([phi(b) for b in train])
    Fb = ps.T @ ps / ps.shape[0]
    want = ps @ torch.linalg.solve(Fb + 0.1 * Fb.diagonal().mean() * torch.eye(16, dtype=DT),
                                   phi(test).T)
    torch.testing.assert_close(S, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
