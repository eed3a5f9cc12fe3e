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

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute.factgrass import factgrass
from dattri_fn.attribute.gradsim import grad_dot
from dattri_fn.attribute.trak import trak
from dattri_fn.losses import causal_lm_loss, causal_lm_margin, causal_lm_margin_weight
from dattri_fn.transforms.kronecker import kronecker_layers, make_kronecker_projector
from dattri_fn.transforms.layer_grads import check_plan, layer_grads_stacked, layer_plan
from dattri_fn.transforms.project import make_projector

transformers = pytest.importorskip("transformers")

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
WTE = "transformer.wte.weight"


def _gpt2(attn: str = "eager"):
    """The tiny GPT-2 of tests/test_hf_methods.py (V = 40, D = 8, two blocks), float64."""
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=attn)
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


def _projected_rows(fm, proj, batch):
    """The vmap(grad) rows projected block by block as ``kronecker_layers`` lays them out: each
    Kronecker layer's dense ``[out, in(+1)]`` gradient by ``project_dense``, the rest by
    ``project_rest`` (a tie's rows are wherever the layout puts them).  # [b, d]"""
    ref = per_sample_grad(fm.loss, fm.params, batch)
    cols, off = {}, 0
    for k, v in fm.params.items():
        cols[k], off = ref[:, off:off + v.numel()], off + v.numel()
    out = []
    for n, lay in proj.layers.items():
        W = [] if lay.weight is None else [
            cols[lay.weight].unflatten(-1, (lay.inp, lay.out)).mT if lay.kind == "embedding"
            else cols[lay.weight].unflatten(-1, (lay.out, lay.inp))]
        if lay.bias is not None:  # a bias-only block is its [out, 1] column
            W.append(cols[lay.bias][..., None])
        out.append(proj.project_dense(n, torch.cat(W, -1)))
    if proj.rest:
        out.append(proj.project_rest(torch.cat([cols[k] for k, _ in proj.rest], -1)))
    return out


def test_grad_dot_with_default_attention_needs_no_vmap():
    """sdpa GPT-2 with a padding mask (vmap cannot run it): Grad-Dot == eager vmap(grad) rows' (1e-9)."""
    fm = _wte_only(model=_gpt2("sdpa"))
    assert layer_plan(fm).autodiff == ()  # every row from the capture pass
    train, test = [_batch(1), _batch(2, 3)], _batch(3, 3)
    S = _silent(lambda: grad_dot(fm).score(fm.params, (), train, test))
    eager = _wte_only()
    rows = lambda b: per_sample_grad(eager.loss, eager.params, b)
    want = torch.cat([rows(b) for b in train]) @ rows(test).T
    torch.testing.assert_close(S, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_factgrass_equals_the_dense_rows_sketched():
    """phi_b = (block b's masks on the vmap(grad) rows) R_b; s = sum_b phi_b (F_b + lam_b I)^-1 phi_b^T."""
    fm = _wte_only()
    train, test = [_batch(1), _batch(2, 3)], _batch(3, 3)
    m = factgrass(fm, proj_dim=16, mask_dim=5, seed=2)
    state = _silent(lambda: m.prepare(fm.params, train))
    S = m.score(fm.params, state, train, test)
    assert state.plan is not None and not state.plan.dense
    layers, rest = kronecker_layers(layer_plan(fm), fm.params)
    stage1 = make_kronecker_projector(layers, proj_dim=5, kind="mask", seed=2, rest=rest,
                                      rest_dim=25, dtype=DT)

    def phi(batch):  # [b, d_b] per block
        return [S1 if S1.shape[1] <= 16 else
                S1 @ make_projector(S1.shape[1], proj_dim=16, kind="sjlt", seed=3 + i).matrix(DT)
                for i, S1 in enumerate(_projected_rows(fm, stage1, batch))]

    ref, train_blocks = 0, [torch.cat(p) for p in zip(*[phi(b) for b in train], strict=True)]
    for ps, pq in zip(train_blocks, phi(test), strict=True):
        Fb = ps.T @ ps / ps.shape[0]
        A = Fb + 0.1 * Fb.diagonal().mean() * torch.eye(ps.shape[1], dtype=DT)
        ref = ref + ps @ torch.linalg.solve(A, pq.T)
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


def test_the_kronecker_projection_reads_the_tied_rows_from_the_dense_block():
    """KroneckerProjector.layer_grads(plan rows) == the vmap(grad) rows projected per block (1e-10)."""
    fm = _wte_only()
    plan = layer_plan(fm)
    layers, rest = kronecker_layers(plan, fm.params)
    proj = make_kronecker_projector(layers, proj_dim=3, seed=5, rest=rest, rest_dim=7, dtype=DT)
    batch = _batch(4)
    stacked = {k: v[None] for k, v in fm.params.items()}
    got = proj.layer_grads(layer_grads_stacked(check_plan(plan, stacked, batch), stacked, batch))
    torch.testing.assert_close(got[0], torch.cat(_projected_rows(fm, proj, batch), -1), **TOL)


@pytest.mark.parametrize("params", [None, ["bert.embeddings", "cls"]])
def test_a_tied_decoders_own_bias_comes_from_the_capture_pass(params):
    """BERT-MLM (decoder weight = word embeddings, decoder bias = cls.predictions.bias), a padding
    mask (vmap cannot run it): db_i = sum_t g_it, no loop, no warning; Grad-Dot == per-sequence
    autograd (1e-10 relative)."""
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(cfg).double().eval()

    def loss(out, labels):
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(),
                                                 reduction="sum")

    batch = _batch(5)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 2] = batch["input_ids"][:, 2]
    batch["labels"] = labels
    fm = functional_model(bert, loss, params=params, unpack=lambda b: (
        (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]))
    plan = layer_plan(fm)
    assert plan.tie_biases == {"cls.predictions.bias": "cls.predictions.decoder"}
    assert plan.autodiff == ()
    S = _silent(lambda: grad_dot(fm).score(fm.params, (), batch, batch))
    named, rows = dict(bert.named_parameters()), []
    for i in range(4):
        bert.zero_grad()
        loss(bert(input_ids=batch["input_ids"][i:i + 1],
                  attention_mask=batch["attention_mask"][i:i + 1]), labels[i:i + 1]).backward()
        rows.append(torch.cat([named[k].grad.flatten() for k in fm.params]))
    R = torch.stack(rows)
    want = R @ R.T
    torch.testing.assert_close(S, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
