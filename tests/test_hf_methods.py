"""Every attributor on stock Hugging Face models (issue 16): the default attention gives the
scores of eager attention, and a right-padded sequence scores as it does unpadded (float64)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from dattri_fn import functional_model  # noqa: E402
from dattri_fn.attribute import grad_dot, influence, logra, tracin, trak  # noqa: E402
from dattri_fn.losses import causal_lm_loss, causal_lm_margin, causal_lm_margin_weight  # noqa: E402


def _config(name: str, attn: str):
    t = transformers
    if name == "gpt2":
        return t.GPT2LMHeadModel, t.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=2,
                                               n_head=2, bos_token_id=0, eos_token_id=0,
                                               attn_implementation=attn)
    if name == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(
            vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
            attn_implementation=attn)
    return t.BertForSequenceClassification, t.BertConfig(
        vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3, attn_implementation=attn)


def _model(name: str, attn: str):
    cls, cfg = _config(name, attn)
    torch.manual_seed(0)
    return cls(cfg).double().eval()


def _cls_loss(out, labels):
    return F.cross_entropy(out.logits, labels)


def _batch(name: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    labels = (torch.randint(0, 3, (5,), generator=g) if name == "bert"
              else ids.masked_fill(mask == 0, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _methods(name: str, model):
    lm = name != "bert"
    loss = causal_lm_loss if lm else _cls_loss
    layers = (lambda n: ".mlp." in n) if lm else (lambda n: "intermediate" in n or "output.dense"
                                                            in n)
    fm = functional_model(model, loss, params=layers)
    out = {"grad_dot": (grad_dot(fm), fm.params, ()),
           "tracin": (tracin(fm, lrs=[0.5]), [fm.params], ()),
           "if_ekfac": (influence(fm, solver="ekfac", damping=0.1), fm.params, None),
           "if_cg": (influence(fm, solver="cg", damping=0.5, max_iter=30), fm.params, None),
           "logra": (logra(fm, proj_dim=4), fm.params, None)}
    if name == "gpt2":  # wte = lm_head: one pooled EK-FAC layer (kfac_tied)
        tied_fm = functional_model(model, loss, params=lambda n: ".mlp." in n or "wte" in n)
        out["if_ekfac_tied"] = (influence(tied_fm, solver="ekfac", damping=0.1), tied_fm.params,
                                None)
    if lm:
        t_fm = functional_model(model, causal_lm_margin, params=layers)
        w_fm = functional_model(model, causal_lm_margin_weight, params=layers)
        out["trak"] = (trak(t_fm, weight_fn=w_fm, proj_dim=8, damping=0.1), t_fm.params, None)
    return out


def _scores(name: str, attn: str) -> dict:
    batch = _batch(name)
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, (m, params, state) in _methods(name, _model(name, attn)).items():
            state = m.prepare(params, batch) if state is None else state
            res[key] = m.score(params, state, batch, batch)
    return res


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_default_attention_scores_equal_eager_attention_scores(name):
    """Grad-Dot, TracIn, EK-FAC (GPT-2: also with the tied wte) and GN-CG influence, LoGra (and
    TRAK for the LMs): the model's default attention (SDPA) gives eager attention's scores to
    1e-8 (1e-5 for Llama, below)."""
    default, eager = _scores(name, "sdpa"), _scores(name, "eager")
    # Llama's eager attention takes its softmax in float32 even for a float64 model (~1e-7).
    rtol = 1e-5 if name == "llama" else 1e-8
    for key in default:
        S, R = default[key], eager[key]
        assert S.shape == (5, 5) and bool(torch.isfinite(S).all()), key
        torch.testing.assert_close(S, R, rtol=rtol, atol=rtol * 1e-2 * float(R.abs().max()),
                                   msg=lambda m, key=key: f"{name} {key}: {m}")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_padded_sequence_scores_as_it_does_unpadded(name):
    """Grad-Dot on a causal LM: the row of a right-padded sequence (mask 0, labels -100) equals
    the row of the same sequence alone without the padding."""
    model = _model(name, "sdpa")
    fm = functional_model(model, causal_lm_loss, params=lambda n: ".mlp." in n)
    batch = _batch(name)
    alone = {"input_ids": batch["input_ids"][1:2, :4], "attention_mask": batch["attention_mask"][1:2, :4],
             "labels": batch["labels"][1:2, :4]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = grad_dot(fm)
        S = m.score(fm.params, (), batch, batch)
        row = m.score(fm.params, (), alone, batch)
    torch.testing.assert_close(S[1], row[0], rtol=1e-9, atol=1e-12 * float(S.abs().max()))
