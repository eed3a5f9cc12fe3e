"""The capture engine on stock Hugging Face models (default attention, no code changes), float64."""

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
    return {"gpt2": (gpt2, {"transformer.wte", "lm_head", "transformer.wpe"}),
            "llama": (llama, set()),
            "bert": (bert, {"bert.embeddings.position_embeddings"})}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_stock_models_per_example_gradients(name):
    """GPT-2 (Conv1D, tied embeddings), Llama (rotary, GQA) and BERT with their default attention,
    right padding and -100 labels: captured sum_t g a^T equals per-example autograd; the tied
    wte/lm_head and the broadcast [1, T] position embeddings are named problems."""
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
