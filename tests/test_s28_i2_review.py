"""Review RI (stop 28) of engineer I's Hugging Face hardening: the left-padding check keeps
``fm.unpack`` (MED-1) and its heuristic (LOW-1), the index-dtype text (MED-3, in
test_s28_i_hf), a user's reentrant checkpoint (MED-4). HF models are tiny local configs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn._blame import refuse_reentrant_checkpoint
from dattri_fn.attribute import influence
from dattri_fn.model import default_unpack
from dattri_fn.operators.gauss_newton import gauss_newton
from dattri_fn.training import make_step, sgd
from dattri_fn.transforms.padding import absolute_positions

DT = torch.float64


class _Tiny(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.tok = nn.Linear(8, 16)
        setattr(self, name, nn.Embedding(4, 16))
        self.name, self.head = name, nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x) + getattr(self, self.name).weight.sum(0)))


def _run(name):
    torch.manual_seed(1)
    x = torch.randn(40, 8, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    fm = functional_model(_Tiny(name).to(DT).eval(), F.cross_entropy,
                          params=lambda n: not n.startswith(name))
    meth = influence(fm, solver="explicit", curvature="hessian", damping=0.01)
    s = meth.score(fm.params, meth.prepare(fm.params, (x, y)), (x, y), (x[:5], y[:5]))
    step, opt = make_step(fm, sgd(0.1)), sgd(0.1)
    p2, _ = step(fm.params, opt.init(fm.params), (x, y), torch.ones(40, dtype=DT))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        op = gauss_newton(fm)(fm.params, [(x, y)])
    v = torch.linspace(-1, 1, sum(t.numel() for t in fm.params.values()), dtype=DT)
    return fm, s, p2, (type(op).__name__, op @ v), [str(w.message) for w in rec]


def test_position_embeddings_model_keeps_unpack_and_its_fast_paths():
    # RI MED-1: a5e1dec's LeftPadCheck replaced unpack: the fast paths turned off (influence
    # 1.2e-13 off, make_step 6.9e-18 off, gauss_newton warned "a custom unpack")
    fm, s, p2, gv, warned = _run("position_embeddings")
    _, s0, p20, gv0, warned0 = _run("pos")
    assert fm.unpack is default_unpack
    assert torch.equal(s, s0)
    assert all(torch.equal(p2[k], p20[k]) for k in p2)
    assert gv[0] == gv0[0] == "FactoredOperator" and torch.equal(gv[1], gv0[1])
    assert warned == warned0 and not any("custom unpack" in w for w in warned)


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(vocab_size=40, max_position_embeddings=16, hidden_size=8, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=12)
    if kind == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(**small, pad_token_id=1))
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**small))
    if kind == "gpt2":
        return transformers.GPT2Model(transformers.GPT2Config(vocab_size=40, n_positions=16,
                                                              n_embd=8, n_layer=1, n_head=2))
    if kind == "bart":
        return transformers.BartModel(transformers.BartConfig(
            vocab_size=40, max_position_embeddings=16, d_model=8, encoder_layers=1,
            decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=12, decoder_ffn_dim=12))
    if kind == "opt":
        return transformers.OPTModel(transformers.OPTConfig(
            vocab_size=40, max_position_embeddings=16, hidden_size=8, num_hidden_layers=1,
            num_attention_heads=2, ffn_dim=12, word_embed_proj_dim=8))
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=40, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


@pytest.mark.parametrize("kind,moved", [("gpt2", True), ("bert", True), ("bart", True),
                                        ("roberta", False), ("opt", False), ("llama", False)])
def test_absolute_positions_follows_what_left_padding_moves(kind, moved):
    # RI LOW-1: RoBERTa counts positions from input_ids' non-pad tokens (padding_idx), OPT from
    # the mask; BART's learned table is numbered from the first column
    assert absolute_positions(_hf(kind)) is moved


class _Reentrant(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.body, self.head, self.reentrant = nn.Linear(4, 4), nn.Linear(4, 2), reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant)
        return self.head(h)


def test_reentrant_checkpoint_without_grad_inputs_named():
    # RI MED-4: torch only warns and the body gets no gradient (scores 55% off); mutation:
    # the context a pass-through -> no error
    x = torch.randn(3, 4)
    m = _Reentrant(True).eval()
    with pytest.raises(ValueError, match=r"^functional_model\(module=\.\.\.\): expected a module "
                       r"whose layers all reach the gradient.*use_reentrant=False"):
        with refuse_reentrant_checkpoint(m):
            m(x)
    ok = _Reentrant(False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with refuse_reentrant_checkpoint(ok):
            ok(x)  # non-reentrant: exact, runs
    assert refuse_reentrant_checkpoint(ok) is refuse_reentrant_checkpoint(ok)  # checked once
    with torch.no_grad():  # a forward-only pass loses no gradient: not refused
        assert refuse_reentrant_checkpoint(_Reentrant(True)) is refuse_reentrant_checkpoint(ok)


def test_left_padding_decided_by_the_first_padded_batch():
    # an unpadded batch (or a one-row probe) says nothing of the side; the check waits for a
    # padded one (mutation: a mask of ones decides -> no warning)
    from test_s28_i_hf import _Absolute, _batch, _lm_loss

    from dattri_fn.attribute import grad_dot

    fm = functional_model(_Absolute().to(DT), _lm_loss)
    full = _batch([0, 5], "left")  # both rows of length 7: a mask of ones
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_dot(fm).score(fm.params, (), full, full)
    with pytest.warns(UserWarning, match="left-padded"):
        grad_dot(fm).score(fm.params, (), _batch([0, 1, 2, 3], "left"), full)


def test_left_pad_hook_goes_after_16_library_forwards_without_padding():
    # a model fed tuples never shows a mask: the hook (10 us a forward) does not stay
    from dattri_fn.attribute import grad_dot
    from dattri_fn.transforms.padding import _LOOKS

    m = _Tiny("position_embeddings").to(DT).eval()
    fm = functional_model(m, F.cross_entropy)
    assert len(m._forward_pre_hooks) == 1
    x, y = torch.randn(4, 8, dtype=DT), torch.randint(0, 3, (4,))
    for _ in range(_LOOKS):
        grad_dot(fm).score(fm.params, (), (x, y), (x, y))
    assert not m._forward_pre_hooks



def test_call_module_names_both_traps():
    # with I2_to_lead.patch (module_call._call): the vmap paths that do not run fm.loss (influence
    # cg's per-example rows) name the hook; grad_dot names a user's reentrant checkpoint
    # (mutations: require_grads_error / refuse_reentrant_checkpoint out of _call -> raw error / no error)
    from test_s28_i_hf import _batch, _llama, _lm_loss

    from dattri_fn.attribute import grad_dot

    m = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.gradient_checkpointing_enable()
    fm = functional_model(m.eval(), _lm_loss)
    meth = influence(fm, solver="cg", damping=0.1)
    with pytest.raises(ValueError, match=r"^functional_model\(module=\.\.\.\): .*input-require-grads"):
        tr = _batch([0, 1, 2, 3])
        meth.score(fm.params, meth.prepare(fm.params, tr), tr, _batch([4, 5]))
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 2, (6,))
    fr = functional_model(_Reentrant(True).to(DT).eval(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"^functional_model\(module=\.\.\.\): expected a module "
                       r"whose layers all reach the gradient \(here under grad_dot"):
        grad_dot(fr).score(fr.params, (), (x, y), (x, y))
