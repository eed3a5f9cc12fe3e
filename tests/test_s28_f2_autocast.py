"""Grad-Dot's plan check under bf16 autocast of a float32 model (review RU5 M4): the tolerance
comes from autocast's dtype (bf16 rounding is no mismatch), a real mismatch still goes dense,
and the warning points at the user's line, naming the tolerance and its source."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import grad_dot
from dattri_fn.transforms.layer_grads_gap import tolerance

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def _layer_grads_warnings(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if "layer_grads" in str(x.message)]


def test_tolerance_takes_autocast_dtype():
    assert tolerance(torch.float32, "cpu")[1] == "float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tol, source = tolerance(torch.float32, "cpu")
    assert source == "autocast to bfloat16" and tol == 10 * torch.finfo(torch.bfloat16).eps
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 rows are not autocast
        assert tolerance(torch.float64, "cuda")[1] == "float64"


def test_grad_dot_under_bf16_autocast_keeps_the_factored_path():
    """The review's case: bf16 rounding (about 4e-3 of the scale) read as a mismatch made the
    whole model dense; now no warning, and the scores are those of the float32 model to bf16
    accuracy."""
    from dattri_fn.losses import causal_lm_loss

    fm = functional_model(_llama(), causal_lm_loss, params=lambda n: "proj" in n)
    torch.manual_seed(1)
    ids = torch.randint(1, 48, (10, 9))
    tr, te = {"input_ids": ids[:8], "labels": ids[:8]}, {"input_ids": ids[8:], "labels": ids[8:]}

    def run():
        g = grad_dot(fm)
        return g.score(fm.params, g.prepare(fm.params, tr), tr, te)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        S, w = _layer_grads_warnings(run)
    assert w == [], [str(x.message) for x in w]
    want = run().float()
    assert (S.float() - want).abs().max() <= 0.05 * want.abs().max()


class _Mixer(nn.Module):
    """Examples mixed in the batch (``h - h.mean(0)``): no per-example factors can hold."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h - h.mean(0))


def test_a_real_mismatch_under_autocast_still_goes_dense_and_warns_at_the_users_line():
    """Examples mixed in the batch are still a mismatch under autocast (its tolerance, 10 eps of
    bf16, is far below the gap); the warnings of prepare and score point here (were sys:1)."""
    torch.manual_seed(0)
    fm = functional_model(_Mixer().eval(), F.cross_entropy)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as w, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        grad_dot(fm).prepare(fm.params, [(x, y)])
        grad_dot(fm).score(fm.params, (), [(x, y)], (x, y))
    w = [x for x in w if "layer_grads" in str(x.message)]
    assert len(w) == 2 and {x.filename for x in w} == {__file__}, [(x.filename, x.lineno) for x in w]
    text = str(w[0].message)
    assert "do not match vmap" in text and "from autocast to bfloat16's rounding" in text
