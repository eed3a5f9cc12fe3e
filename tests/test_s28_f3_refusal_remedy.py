"""Stop 28, engineer F3 (review RF L1): the refusal of a model vmap cannot run, for the methods
that vmap every model (LESS, DVEmb, SOURCE, GradSpec), names the fix for its main trigger, a stock
Hugging Face model given an attention mask (load it with attn_implementation='eager'), and
GradSpec's does not tell DVEmb's user to swap methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_s28_f_vmap import _models, _record, _run

from dattri_fn import functional_model
from dattri_fn.attribute.less import less
from dattri_fn.training import GradSpec, adam, batch_order, finish_record, record_step, start_record

EAGER = r"attn_implementation='eager'"


def test_less_names_the_eager_attention_remedy_and_the_other_methods():
    _, fb = _models()
    with pytest.raises(ValueError, match=r"^less\(loss=\.\.\.\): .*a Hugging Face model given an "
                       rf"attention mask .*runs when loaded with {EAGER}; else rewrite the "
                       r"forward .*grad_dot\(fm\), trak\(fm\)\)\.$"):
        _run(less(fb), _record("adam"))


def test_gradspec_names_the_eager_remedy_and_no_other_method(tmp_path):
    _, fb = _models()
    rec = start_record("sgd", checkpoint_every=1, grads=GradSpec(fb.loss, str(tmp_path), None))
    with pytest.raises(ValueError, match=r"^GradSpec\(loss=\.\.\.\): ") as info:
        record_step(rec, torch.arange(4), lr=0.1, params=fb.params, opt_state=None,
                    batch=(torch.randn(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))
    text = str(info.value)
    assert "GradSpec vmaps loss per example for every model (DVEmb's recorded gradients" in text
    assert EAGER in text and "grad_dot" not in text and "FunctionalModel too" not in text, text


def test_the_eager_remedy_runs_on_a_masked_gpt2():
    """The remedy followed: the same GPT-2 with a padding mask is refused under sdpa and scored
    by less(fm) once built with attn_implementation='eager'."""
    t = pytest.importorskip("transformers")

    def lm_loss(out, labels):
        logits = out.logits[:, :-1].flatten(0, 1)
        return F.cross_entropy(logits, labels[:, 1:].flatten(), reduction="none").sum()

    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(0, 50, (4, 5), generator=g), torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = t.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                              bos_token_id=0, eos_token_id=0, attn_implementation=impl)
        fm = functional_model(t.GPT2LMHeadModel(config).double().eval(), lm_loss,
                              params=lambda n: ".mlp." in n)
        opt = adam(0.05)
        rec = start_record("adam", checkpoint_every=1)
        for rows in batch_order(4, batch_size=2, epochs=1, seed=0):
            rec = record_step(rec, rows, lr=0.1, params=fm.params, opt_state=opt.init(fm.params))
        rec = finish_record(rec, params=fm.params, opt_state=opt.init(fm.params))
        m = less(fm)
        if impl == "sdpa":
            with pytest.raises(ValueError, match=rf"^less\(loss=\.\.\.\): .*{EAGER}"):
                m.score(rec, m.prepare(rec, batch), batch, batch)
        else:
            assert m.score(rec, m.prepare(rec, batch), batch, batch).shape == (4, 4)
