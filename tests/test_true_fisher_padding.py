"""The true Fisher's draws for a causal LM do not depend on padding (review RU2 H1, stop 27):
``causal_lm_loss.sample`` draws at the kept positions only, so EK-FAC with ``fisher="true"`` on
the same sequences padded to different lengths gives the same scores (float64)."""
import warnings

import pytest
import torch

from dattri_fn import functional_model
from dattri_fn.attribute import influence
from dattri_fn.losses import _draw, causal_lm_loss

transformers = pytest.importorskip("transformers")
DT = torch.float64
V = 23
_IDS = torch.randint(1, V, (10, 9), generator=torch.Generator().manual_seed(5))
_LEN = [9, 4, 7, 2, 9, 5, 6, 3, 8, 5]


def _lm(rows, width):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    m, lab = torch.zeros_like(ids), torch.full_like(ids, -100)
    for j, r in enumerate(rows):
        n = _LEN[r]
        ids[j, :n], m[j, :n], lab[j, :n] = _IDS[r, :n], 1, _IDS[r, :n]
    return {"input_ids": ids, "attention_mask": m, "labels": lab}


def test_draws_without_padding_are_the_old_draws():
    logits = torch.randn(3, 6, V, dtype=DT)
    labels = torch.randint(0, V, (3, 6))
    new = causal_lm_loss.sample(logits, labels, torch.Generator().manual_seed(0))
    old = labels.clone()
    old[:, 1:] = _draw(logits[:, :-1], torch.Generator().manual_seed(0))
    assert torch.equal(new, old)


def test_true_fisher_scores_do_not_depend_on_padding():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=24, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(cfg).to(DT).eval()
    lm = functional_model(gpt2, causal_lm_loss, params=lambda n: ".mlp." in n)
    te = _lm([8, 9], 9)
    S = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tr in (_lm(range(8), 9), _lm(range(8), 14)):
            m = influence(lm, solver="ekfac", damping=1e-3, fisher="true", seed=0)
            S.append(m.score(lm.params, m.prepare(lm.params, tr), tr, te))
    assert float((S[1] - S[0]).abs().max() / S[0].abs().max()) < 1e-11
