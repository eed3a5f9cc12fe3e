"""Layers take the padding mask of the positions they read, not one of the same width (review RG
of stop 27: M1, L1).

A tiny Hugging Face BART (local config, float64) whose source and target are padded to the SAME
width: the encoder's layers and the cross-attention key/value projections read the source's
positions (``attention_mask``), the decoder's other layers the target's
(``decoder_attention_mask``). Reference: each example alone and unpadded. A batch without
``decoder_attention_mask`` leaves the decoder unmasked, warned at the user's line; a second
sequence's key of the mask's width (``query_ids``) masks nothing, warned.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.operators.kfac import kfac_factors
from dattri_fn.transforms.padding import _cross_role

transformers = pytest.importorskip("transformers")

DT, V, N = torch.float64, 20, 6
SL, TL = [3, 8, 2, 6, 5, 4], [7, 2, 6, 3, 5, 8]  # source / target real lengths
SEL = ("model.decoder.layers.0.fc1", "model.decoder.layers.0.self_attn.q_proj",
       "model.decoder.layers.0.encoder_attn.k_proj", "model.decoder.layers.0.encoder_attn.v_proj",
       "model.encoder.layers.0.fc1")


@pytest.fixture(scope="module")
def bart():
    return _bart()


def _bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=V, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
        max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    m = transformers.BartForConditionalGeneration(cfg).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    src = [torch.randint(3, V, (n,), generator=g) for n in SL]
    tgt = [torch.randint(3, V, (n,), generator=g) for n in TL]
    p = {k: v.detach() for k, v in m.named_parameters() if k.startswith(SEL)}
    return m, src, tgt, p


def _loss(out, y):
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                           reduction="sum")


def _batch(src, tgt, W, decoder_mask=True):
    """Source and target both right-padded to ``W`` (``padding="max_length"`` on both sides)."""
    ids, mask = torch.full((N, W), 1), torch.zeros(N, W, dtype=torch.long)
    dec, dmask, lab = torch.full((N, W), 1), torch.zeros(N, W, dtype=torch.long), \
        torch.full((N, W), -100)
    for j in range(N):
        ids[j, :SL[j]], mask[j, :SL[j]] = src[j], 1
        dec[j, 0], dec[j, 1:TL[j]], dmask[j, :TL[j]], lab[j, :TL[j]] = 2, tgt[j][:-1], 1, tgt[j]
    out = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
           "decoder_attention_mask": dmask, "labels": lab}
    if not decoder_mask:
        del out["decoder_attention_mask"]
    return out


def _alone(src, tgt):
    return [{"input_ids": src[j][None], "labels": tgt[j][None],
             "decoder_input_ids": torch.cat([torch.tensor([2]), tgt[j][:-1]])[None]}
            for j in range(N)]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _padding_warnings(w):
    return [x for x in w if "attention_mask" in str(x.message)]


@pytest.mark.parametrize("W", [10, 14])
def test_same_width_source_and_target_match_examples_alone(bart, W):
    # the decoder's layers took the encoder's mask by width: 0.11 off, silently
    m, src, tgt, p = bart
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = kfac_factors(m, _loss, p, _batch(src, tgt, W))
    assert _padding_warnings(w) == []
    ref = kfac_factors(m, _loss, p, _alone(src, tgt))
    for k in ref.A:
        assert _rel(got.A[k], ref.A[k]) < 1e-12, k
        assert _rel(got.G[k], ref.G[k]) < 1e-12, k


def test_without_decoder_mask_decoder_unmasked_and_warned_at_user_line(bart):
    m, src, tgt, p = bart
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = kfac_factors(m, _loss, p, _batch(src, tgt, 10, decoder_mask=False))
    w = _padding_warnings(w)
    assert len(w) == 1 and w[0].filename == __file__
    text = str(w[0].message)
    assert text.startswith("kfac_factors: the decoder's layers")
    assert "model.decoder.layers.0" in text and "Pass decoder_attention_mask" in text
    ref = kfac_factors(m, _loss, p, _alone(src, tgt))
    for k in ("model.encoder.layers.0.fc1", "model.decoder.layers.0.encoder_attn.k_proj",
              "model.decoder.layers.0.encoder_attn.v_proj"):  # the source's mask still holds
        assert _rel(got.A[k], ref.A[k]) < 1e-12, k
    # the decoder's layers count the target pads: not the encoder's mask, not silently
    assert _rel(got.A["model.decoder.layers.0.fc1"], ref.A["model.decoder.layers.0.fc1"]) > 1e-3


def test_warning_names_the_public_call(bart):
    m, src, tgt, p = bart
    fm = functional_model(m, _loss, params=lambda n: n.startswith(SEL))
    meth = influence(fm, solver="ekfac", damping=1e-3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        meth.prepare(fm.params, [_batch(src, tgt, 10, decoder_mask=False)])
    w = _padding_warnings(w)
    assert len(w) == 1 and w[0].filename == __file__
    assert str(w[0].message).startswith("influence(...).prepare (ekfac_factors): ")
    # source 8 wide, target 10: the cross-attention k reads the source, masked without a word
    b = _batch(src, tgt, 10)
    b = {"input_ids": b["input_ids"][:, :8], "attention_mask": b["attention_mask"][:, :8],
         "decoder_input_ids": b["decoder_input_ids"], "labels": b["labels"]}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        kfac_factors(m, _loss, {"model.decoder.layers.0.encoder_attn.k_proj.weight":
                                p["model.decoder.layers.0.encoder_attn.k_proj.weight"]}, b)
    assert _padding_warnings(w) == []


class _Prepend(torch.nn.Module):
    """A layer reading ``T + 1`` positions (a token prepended): they are not the mask's."""

    def __init__(self):
        super().__init__()
        self.lin1, self.head = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x, attention_mask=None):
        x = torch.cat([torch.ones_like(x[:, :1]), x], 1)
        return self.head(torch.tanh(self.lin1(x)).mean(1))


def test_width_mismatch_warning_at_user_line_with_remedy():
    torch.manual_seed(0)
    model = _Prepend().to(DT).eval()
    p = {k: v.detach() for k, v in model.named_parameters()}
    b = {"x": torch.randn(2, 3, 4, dtype=DT), "attention_mask": torch.tensor([[1, 1, 0]] * 2),
         "labels": torch.tensor([0, 2])}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        kfac_factors(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), p, b)
    w = _padding_warnings(w)
    assert len(w) == 1 and w[0].filename == __file__
    text = str(w[0].message)
    assert text.startswith("kfac_factors: layer 'lin1' reads 4 positions")
    assert "Leave it out of params" in text


class _TwoSeq(torch.nn.Module):
    """A ``[B, T, D]`` model whose batch also carries another sequence's ids of the same width."""

    def __init__(self):
        super().__init__()
        self.lin1, self.head = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x, attention_mask=None, query_ids=None):
        return self.head(torch.tanh(self.lin1(x)).mean(1))


def test_second_sequence_of_the_mask_width_masks_nothing():
    torch.manual_seed(0)
    model = _TwoSeq().to(DT).eval()
    p = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 6, 4, dtype=DT)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 2 + [0] * 4])
    y = torch.tensor([0, 1, 2, 1])

    def loss(out, t):
        return F.cross_entropy(out, t, reduction="sum")

    plain = kfac_factors(model, loss, p, {"x": x, "labels": y})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = kfac_factors(model, loss, p, {"x": x, "attention_mask": mask, "labels": y,
                                            "query_ids": torch.zeros(4, 6, dtype=torch.long)})
    w = _padding_warnings(w)
    assert len(w) == 1 and "'query_ids'" in str(w[0].message) and w[0].filename == __file__
    assert torch.equal(got.A["lin1"], plain.A["lin1"])
    # a model input under its own name ("x") is no second sequence: masked, no warning
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        masked = kfac_factors(model, loss, p, {"x": x, "attention_mask": mask, "labels": y})
    assert _padding_warnings(w) == [] and not torch.equal(masked.A["lin1"], plain.A["lin1"])


def test_cross_attention_roles():
    assert _cross_role("model.decoder.layers.0.encoder_attn.k_proj") == "kv"
    assert _cross_role("decoder.block.0.layer.1.EncDecAttention.v") == "kv"
    assert _cross_role("decoder.layer.0.crossattention.self.key") == "kv"
    assert _cross_role("model.decoder.layers.0.encoder_attn.q_proj") == "q"
    assert _cross_role("decoder.layer.0.crossattention.output.dense") == "q"
    assert _cross_role("model.decoder.layers.0.encoder_attn.gate") == "?"
    assert _cross_role("model.decoder.layers.0.self_attn.k_proj") is None


def test_logra_same_width_never_silently_takes_the_encoder_mask(bart):
    # without the module, logra's Positions saw decoder keys of the mask's width and masked
    # nothing (warned, 8.7e-2 off); with it, each layer takes its own mask: exact
    from dattri_fn.attribute import logra
    m, src, tgt, p = bart
    fm = functional_model(m, _loss, params=lambda n: n.startswith(SEL))
    test = _alone(src, tgt)[:2]

    def run(train):
        meth = logra(fm, proj_dim=2)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            st = meth.prepare(fm.params, train)
        return meth.score(fm.params, st, train, test), _padding_warnings(w)

    ref, _ = run(_alone(src, tgt))
    got, w = run([_batch(src, tgt, 10)])
    assert w == [] and _rel(got, ref) < 1e-12
