"""One weight read by three or more layers (T5's ``shared`` = encoder and decoder
``embed_tokens`` = ``lm_head``) is named in one sentence listing every user (review RU5 L3: it
read "shared: shares its weight with layer encoder.embed_tokens; encoder.embed_tokens: ...")."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import grad_dot
from dattri_fn.transforms import capture


class _Seq2Seq(nn.Module):
    """T5's tie: ``shared``, ``enc`` and ``dec`` Embeddings and the ``head`` Linear, one weight."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(9, 4)
        self.enc, self.dec = nn.Embedding(9, 4), nn.Embedding(9, 4)
        self.enc.weight = self.dec.weight = self.shared.weight
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, x):  # x [B, 5]: 3 source ids, then 2 target ids
        src, tgt = x[:, :3], x[:, 3:]
        h = torch.tanh(self.mix(self.enc(src).mean(1, keepdim=True) + self.dec(tgt)))
        return self.head(h)


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


WHO = "the layers shared, enc, dec and head (shared or tied)"


def test_the_tie_warning_is_one_sentence_naming_every_user_and_the_scores_are_exact():
    torch.manual_seed(0)
    fm = functional_model(_Seq2Seq().double().eval(), _loss)
    x, y = torch.randint(0, 9, (5, 5)), torch.randint(0, 9, (5, 2))
    batch = (x, y)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = grad_dot(fm)
        S = g.score(fm.params, g.prepare(fm.params, [batch]), [batch], batch)
    texts = [str(x.message) for x in w if "layer_grads" in str(x.message)]
    assert len(texts) == 1 and f"their weight is one tensor read by {WHO}, so no one layer's " \
        "factors give its gradient." in texts[0], texts
    assert "shared:" not in texts[0] and "shares its weight" not in texts[0]

    def row(xx, yy):
        grads = torch.func.grad(fm.loss)(fm.params, (xx, yy))
        return torch.cat([grads[k].reshape(-1) for k in fm.params])
    G = torch.vmap(row)(x, y)
    assert (S - G @ G.T).abs().max() <= 1e-12 * (G @ G.T).abs().max()


def test_a_tie_of_one_kind_names_every_user_with_its_kind():
    """With ties asked for (K-FAC's pooled factors), three Embeddings cannot be told apart: each
    member's problem is the same sentence naming all four with their kinds."""
    m = _Seq2Seq().double().eval()
    tapped = capture.tap(m, ["shared", "enc", "dec", "head", "mix"], tied=True)
    state = dict(m.named_parameters(remove_duplicate=False))
    problems = capture.check(tapped, state, torch.randint(0, 9, (5, 5)))
    assert set(problems) == {"shared", "enc", "dec", "head"} and len(set(problems.values())) == 1
    assert problems["enc"] == (
        "their weight is one tensor read by the layers shared (embedding), enc (embedding), dec "
        "(embedding) and head (linear) (shared or tied), of which a tie is factored only with one "
        "layer of each kind")
