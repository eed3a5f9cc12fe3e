"""The capture engine on stock Hugging Face models (default attention, no code changes), float64."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dattri_fn.transforms.capture import bias_grad, check, layer_specs, probe_shapes, tap, weight_grad

transformers = pytest.importorskip("transformers")


def _lm_rows(logits, labels):
    """Per-sequence sum of the shifted next-token cross-entropy (-100 ignored).  # -> [B]"""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           reduction="none")
    return loss.view(labels.shape[0], -1).sum(1)


def _rows(out, labels):
    logits = out.logits
    return _lm_rows(logits, labels) if logits.ndim == 3 else F.cross_entropy(
        logits, labels, reduction="none")


def _models():
    t = transformers
    gpt2 = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2,
                                          n_head=2, bos_token_id=0, eos_token_id=0))
    llama = t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    bert = t.BertForSequenceClassification(t.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3))
    return {"gpt2": (gpt2, {"transformer.wte", "lm_head"}),
            "llama": (llama, set()),
            "bert": (bert, set())}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_stock_models_per_example_gradients(name):
    """GPT-2 (Conv1D, tied embeddings), Llama (rotary, GQA) and BERT with their default attention,
    right padding and -100 labels: captured sum_t g a^T equals per-example autograd, the
    position embeddings read with [1, T] ids shared by the batch included (captured where they
    are broadcast over it); the tied wte/lm_head are named problems."""
    torch.manual_seed(0)
    model, expected_problems = _models()[name]
    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    labels = ids.clone().masked_fill(mask == 0, -100) if name != "bert" else torch.tensor([0, 2, 1])
    inputs = {"input_ids": ids, "attention_mask": mask}
    state = {k: v.detach() for k, v in model.named_parameters()}
    specs = layer_specs(model)
    if name == "gpt2":
        assert {s.kind for s in specs.values()} == {"conv1d", "embedding", "linear"}
    problems = check(tap(model, list(specs)), state, **inputs)
    assert set(problems) == expected_problems
    tapped = tap(model, [n for n in specs if n not in problems])
    _, acts = tapped(state, {n: torch.zeros((), dtype=torch.float64) for n in tapped.layers},
                     **inputs)
    probes = {n: torch.zeros(s, dtype=torch.float64) for n, s in probe_shapes(tapped, acts).items()}

    def total(pr):
        out, acts = tapped(state, pr, **inputs)
        return _rows(out, labels).sum(), acts

    grads, acts = torch.func.grad(total, has_aux=True)(probes)
    params = dict(model.named_parameters())
    for i in range(3):
        model.zero_grad()
        _rows(model(**{k: v[i:i + 1] for k, v in inputs.items()}), labels[i:i + 1]).sum().backward()
        for n, spec in tapped.specs.items():
            got = weight_grad(spec, acts[n][i:i + 1], grads[n][i:i + 1], state[spec.weight].shape)
            torch.testing.assert_close(got[0], params[spec.weight].grad, rtol=1e-9, atol=1e-11)
            if spec.bias is not None:
                torch.testing.assert_close(bias_grad(spec, grads[n][i:i + 1])[0],
                                           params[spec.bias].grad, rtol=1e-9, atol=1e-11)


def test_grad_dot_on_stock_gpt2_end_to_end():
    """grad_dot(fm) on GPT-2 with its default (sdpa) attention, which vmap cannot run: every
    param from one batched capture pass (the broadcast wpe, the LayerNorms and the tied
    wte/lm_head among them: no warning, no per-example loop), equal to per-example autograd."""
    from dattri_fn import functional_model
    from dattri_fn.attribute import grad_dot

    torch.manual_seed(0)
    gpt2 = _models()["gpt2"][0].double().eval()
    loss = lambda out, labels: _lm_rows(out.logits, labels).sum()
    fm = functional_model(gpt2, loss)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S = grad_dot(fm).score(fm.params, (), batch, batch)
    params = dict(gpt2.named_parameters())
    rows = []
    for i in range(4):
        gpt2.zero_grad()
        out = gpt2(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
        loss(out, batch["labels"][i:i + 1]).backward()
        rows.append(torch.cat([params[k].grad.flatten() for k in fm.params]))
    G = torch.stack(rows)
    torch.testing.assert_close(S, G @ G.T, rtol=1e-9, atol=1e-11)


def test_causal_lm_loss_helpers_and_ekfac_on_gpt2_mlp_blocks():
    """dattri_fn.losses.causal_lm_loss (shift, -100 ignored, per-sequence sum) on a HF output
    equals the hand-written loss, its batched per_example form the per-sequence values; EK-FAC
    on GPT-2's MLP Conv1D blocks (params selected by name) runs on the stock model."""
    from dattri_fn import functional_model
    from dattri_fn.attribute import grad_dot, influence
    from dattri_fn.losses import causal_lm_loss, causal_lm_mean_loss

    torch.manual_seed(0)
    gpt2 = _models()["gpt2"][0].double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = gpt2(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(causal_lm_loss.per_example(out, labels), _lm_rows(out.logits, labels))
    keep = (labels[:, 1:] != -100).sum(1)
    torch.testing.assert_close(causal_lm_mean_loss.per_example(out, labels),
                               _lm_rows(out.logits, labels) / keep)
    with pytest.raises(ValueError, match=r"causal_lm_loss\(labels=...\): expected integer token"):
        causal_lm_loss(out, labels.double())
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fm = functional_model(gpt2, causal_lm_loss, params=lambda n: ".mlp." in n)
    ref = functional_model(gpt2, lambda o, y: _lm_rows(o.logits, y).sum(),
                           params=lambda n: ".mlp." in n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every MLP block captured: no fallback, no vmap
        S = grad_dot(fm).score(fm.params, (), batch, batch)
        S_ref = grad_dot(ref).score(ref.params, (), batch, batch)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12)
    m = influence(fm, solver="ekfac", damping=0.1)
    state = m.prepare(fm.params, batch)
    assert state.factors.transposed == tuple(sorted(state.factors.transposed))
    assert len(state.factors.transposed) == 4
    scores = m.score(fm.params, state, batch, batch)
    assert scores.shape == (4, 4) and torch.isfinite(scores).all()


def test_causal_lm_margin_and_weight_and_trak_on_gpt2():
    """causal_lm_margin = sum over kept tokens of log(p_y / (1 - p_y)), its weight the mean of
    1 - p_y; TRAK on stock GPT-2's MLP blocks with them (capture engine, no fallback) equals
    the dense TRAK formula from per-sequence autograd, float64."""
    from dattri_fn import functional_model
    from dattri_fn.attribute import trak
    from dattri_fn.losses import causal_lm_margin, causal_lm_margin_weight

    torch.manual_seed(0)
    gpt2 = _models()["gpt2"][0].double().eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 50, (5, 6), generator=g)
    labels = ids.clone()
    labels[1, 3:] = -100
    out = gpt2(input_ids=ids)
    p = out.logits[:, :-1].softmax(-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    keep = labels[:, 1:] != -100
    want = (torch.log(p / (1 - p)) * keep).sum(1)
    torch.testing.assert_close(causal_lm_margin.per_example(out, labels), want)
    torch.testing.assert_close(causal_lm_margin_weight.per_example(out, labels),
                               ((1 - p) * keep).sum(1) / keep.sum(1))
    torch.testing.assert_close(causal_lm_margin(out, labels), want.sum())
    batch = {"input_ids": ids, "labels": labels}
    mlp = lambda n: ".mlp." in n
    out_fm = functional_model(gpt2, causal_lm_margin, params=mlp)
    w_fm = functional_model(gpt2, causal_lm_margin_weight, params=mlp)
    m = trak(out_fm, weight_fn=w_fm, proj_dim=16, damping=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no vmap over SDPA (weights: one forward)
        S = m.score(out_fm.params, m.prepare(out_fm.params, batch), batch, batch)
    # the same scores from plain autograd, one sequence at a time
    rows = [{k: v[i] for k, v in batch.items()} for i in range(5)]
    G = torch.stack([torch.cat([t.reshape(-1) for t in torch.func.grad(out_fm.loss)(
        out_fm.params, r).values()]) for r in rows])
    Q = torch.stack([w_fm.loss(w_fm.params, r) for r in rows])
    from dattri_fn.transforms.project import make_projector
    R = make_projector(G.shape[1], proj_dim=16, seed=0, dtype=G.dtype)
    Phi = R(G)
    K = torch.linalg.inv(Phi.T @ Phi + 0.1 * torch.eye(16, dtype=G.dtype))
    torch.testing.assert_close(S, (Phi @ K @ Phi.T) * Q[:, None], rtol=1e-8, atol=1e-10)
