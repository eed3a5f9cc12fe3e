"""A layer plan whose only Kronecker-form layers share one tied weight (review R2 F4, stop 22).

GPT-2 with ``params`` = ``wte`` alone: the weight is read by the ``wte`` Embedding and the
``lm_head`` Linear, so both are tie members and ``plan.layers`` is empty. The plan still exists
(its tie rows go to the dense block from one capture pass), and every consumer gives the dense
float64 ``vmap(grad)`` reference: the rows, Grad-Dot, FactGraSS's sketch, TRAK, and the
Kronecker projection (whose rest block is the whole gradient here).
"""
import warnings

import pytest
import torch
from test_factgrass import _mask

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.attribute.trak import trak
from dattri_fn.losses import causal_lm_loss, causal_lm_margin, causal_lm_margin_weight
from dattri_fn.transforms.kronecker import _factor_seed, kronecker_layers, make_kronecker_projector
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan
from dattri_fn.transforms.project import make_projector

transformers = pytest.importorskip("transformers")

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
WTE = "transformer.wte.weight"


def _gpt2():
    """The tiny GPT-2 of tests/test_hf_methods.py (V = 40, D = 8, two blocks), float64."""
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _batch(seed: int, n: int = 4):
    """n sequences of 6 tokens, the second right-padded after 4."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _wte_only(loss=causal_lm_loss, model=None):
    return functional_model(model if model is not None else _gpt2(), loss,
                            params=lambda n: "wte" in n)


def _silent(fn):
    """fn() with no warning raised (a fallback to vmap(grad) would warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def test_a_plan_of_tie_members_alone_exists_and_gives_the_vmap_grad_rows():
    """plan.layers == {}, ties == {wte: (wte, lm_head)}; checked (not dense) rows == vmap(grad) rows."""
    fm = _wte_only()
    assert list(fm.params) == [WTE]
    plan = layer_plan(fm)
    assert plan is not None and plan.layers == {} and plan.rest == (WTE,) and plan.autodiff == ()
    assert plan.ties == {WTE: ("transformer.wte", "lm_head")}
    batch = _batch(1)
    stacked = {k: v[None] for k, v in fm.params.items()}
    checked = _silent(lambda: check_plan(plan, stacked, batch))
    assert checked.checked and not checked.dense and not checked.loop
    got = layer_grads_stacked(checked, stacked, batch).to_dense()[0]
    torch.testing.assert_close(got, per_sample_grad(fm.loss, fm.params, batch), **TOL)


def test_grad_dot_equals_the_dense_reference():
    """Grad-Dot s_ij = <G_i, G_j> with G the vmap(grad) rows of wte (1e-10), no warning."""
    fm = _wte_only()
    train, test = [_batch(1), _batch(2, 3)], _batch(3, 3)
    S = _silent(lambda: grad_dot(fm).score(fm.params, (), train, test))
    Gs = torch.cat([per_sample_grad(fm.loss, fm.params, b) for b in train])
    torch.testing.assert_close(S, Gs @ per_sample_grad(fm.loss, fm.params, test).T, **TOL)


def test_factgrass_equals_the_brute_force_sketch_of_the_rest_block():
    """phi = (G M_rest) R (25 of 320 coords masked, count-sketch to 16); s = phi (F + lam I)^-1 phi^T."""
    fm = _wte_only()
    train, test = [_batch(1), _batch(2, 3)], _batch(3, 3)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    state = _silent(lambda: m.prepare(fm.params, train))
    S = m.score(fm.params, state, train, test)
    assert state.plan is not None and not state.plan.dense

    def phi(batch):
        G = per_sample_grad(fm.loss, fm.params, batch)  # [b, 320]
        masked = G @ _mask(G.shape[1], 25, _factor_seed(2, 0, 2))
        return masked @ make_projector(25, proj_dim=16, kind="sjlt", seed=3).matrix(DT)

    ps = torch.cat([phi(b) for b in train])
    Fb = ps.T @ ps / ps.shape[0]
    A = Fb + 0.1 * Fb.diagonal().mean() * torch.eye(16, dtype=DT)
    ref = ps @ torch.linalg.solve(A, phi(test).T)
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.parametrize("setting", [dict(), dict(proj_dim=6)])
def test_trak_equals_trak_on_vmap_grad_rows(setting):
    """TRAK through the ties-only plan == TRAK of the same loss as a plain function (vmap(grad), 1e-9)."""
    model = _gpt2()
    out, w = _wte_only(causal_lm_margin, model), _wte_only(causal_lm_margin_weight, model)
    train, test = [_batch(1), _batch(2, 3)], _batch(3, 3)
    m = trak(out, weight_fn=w, damping=0.1, seed=2, **setting)
    plain = trak(out.loss, weight_fn=w.loss, damping=0.1, seed=2, **setting)
    state = _silent(lambda: m.prepare(out.params, train))
    assert state.plan is not None and not state.plan.dense
    want = plain.score(out.params, plain.prepare(out.params, train), train, test)
    torch.testing.assert_close(m.score(out.params, state, train, test), want, rtol=1e-9, atol=1e-10)


def test_the_kronecker_projection_projects_the_tied_rows_as_its_rest():
    """No Kronecker layer: KroneckerProjector.layer_grads(plan rows) == project_rest(vmap(grad) rows)."""
    fm = _wte_only()
    plan = layer_plan(fm)
    layers, rest = kronecker_layers(plan, fm.params)
    assert layers == {} and rest == ((WTE, 320),)
    proj = make_kronecker_projector(layers, proj_dim=3, seed=5, rest=rest, rest_dim=7, dtype=DT)
    batch = _batch(4)
    stacked = {k: v[None] for k, v in fm.params.items()}
    got = proj.layer_grads(layer_grads_stacked(check_plan(plan, stacked, batch), stacked, batch))
    want = proj.project_rest(per_sample_grad(fm.loss, fm.params, batch))
    assert got.shape[-1] == 7
    torch.testing.assert_close(got[0], want, **TOL)
