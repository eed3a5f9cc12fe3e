"""token_scores on padding NaNs and on sequence-first layers (review R6 F1, F2; stop 23).

References: float64 per-example gradients (one backward pass per example) dotted with the test
features; the check inside token_scores compares against the same on its first examples.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import functional_model
from dattri_fn.attribute import tokens
from dattri_fn.attribute.tokens import token_scores

DT = torch.float64
V, D = 9, 4


class UnitNorm(nn.Module):
    """tok (padding_idx 0), unit-normalised, padding masked by where: d loss / d tok(ids) is NaN
    at the padding positions, every parameter's gradient finite."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=0)
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        e = self.tok(x)
        u = torch.where((x != 0)[..., None], e / e.norm(dim=-1, keepdim=True), 0.0)
        return self.head(torch.tanh(self.fc(u)))


class SeqFirst(nn.Module):
    """ids [B, T] run as nn.Transformer's default layout: tok(x.T) -> LayerNorm -> head on
    [T, B, D], transposed back; ``batch_first=True`` is the same model on [B, T, D]."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.tok, self.ln, self.head = nn.Embedding(V, D), nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        if self.batch_first:
            return self.head(torch.tanh(self.ln(self.tok(x))))
        return self.head(torch.tanh(self.ln(self.tok(x.T)))).transpose(0, 1)


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum", ignore_index=-100)


def _fm(cls, params=None, **kw):
    torch.manual_seed(0)
    m = cls(**kw).to(DT).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LayerNorm's ones/zeros would hide a swapped weight and bias
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
        if isinstance(m, UnitNorm):
            m.tok.weight[0] = 0
    return functional_model(m, _loss, params=params)


def _ids(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (B, T), generator=g), torch.randint(0, 3, (B, T), generator=g)


def _rows(fm, batch):
    """Per-example gradients, one plain backward pass per example.  # -> [B, P]"""
    out = []
    for i in range(batch[0].shape[0]):
        live = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
        grads = torch.autograd.grad(fm.loss(live, tuple(t[i] for t in batch)), list(live.values()))
        out.append(torch.cat([x.reshape(-1) for x in grads]))
    return torch.stack(out)


def _features(fm, n=2, seed=5):
    P = sum(v.numel() for v in fm.params.values())
    return torch.randn(n, P, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_a_nan_output_gradient_at_a_padding_id_scores_zero_there():
    """Unit-norm Embedding, padding NaN in d loss / d tok(ids): s_itj finite, 0 at padding, and
    sum_t s_itj = grad_i . p_j (autograd per example, 1e-10)."""
    fm = _fm(UnitNorm)
    x, y = _ids(3, 6, 1)
    x[:, -1], y[:, -1] = 0, -100
    x[1, 2] = 0
    G = _rows(fm, (x, y))
    assert bool(torch.isfinite(G).all())
    p = _features(fm)
    S = token_scores(fm, fm.params, (x, y), p)
    assert bool(torch.isfinite(S).all())
    torch.testing.assert_close(S.sum(1), G @ p.T, rtol=1e-10, atol=1e-12)
    tok_only = functional_model(fm.module, _loss, params=lambda n: n.startswith("tok."))
    S_tok = token_scores(tok_only, tok_only.params, (x, y), _features(tok_only))
    assert bool((S_tok[x == 0] == 0).all()) and bool((S_tok[x != 0] != 0).any())


@pytest.mark.parametrize("prefix", ["head.", "tok.", "ln."])
def test_sequence_first_layers_with_t_equal_to_b_are_refused(prefix):
    """[T, B, D] read as [B, T, D] where T == B == 3 mixes examples (the batch totals still agree):
    refused by the per-example check (sum_t s_itj vs autograd's grad_i . p_j), not returned."""
    fm = _fm(SeqFirst, params=lambda n: n.startswith(prefix))
    batch = _ids(3, 3, 2)
    with pytest.raises(ValueError, match=r"token_scores\(model=...\): expected layers whose "
                                         r"positions are each example's own .* got a difference "
                                         r"of .*sequence-first"):
        token_scores(fm, fm.params, batch, _features(fm))


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_batch_first_layers_with_t_equal_to_b_pass_the_check(B):
    """The same model batch-first at T = 3, B in 1..4 (T == B included): no false refusal, and
    sum_t s_itj = grad_i . p_j (autograd per example, 1e-10)."""
    fm = _fm(SeqFirst, batch_first=True)
    batch = _ids(B, 3, 4)
    p = _features(fm)
    S = token_scores(fm, fm.params, batch, p)
    G = _rows(fm, batch)
    torch.testing.assert_close(S.sum(1), G @ p.T, rtol=1e-10, atol=1e-12)


def test_the_check_compares_the_first_three_examples_alone(monkeypatch):
    """A gap in example 2's summed scores (only there) is refused; one in example 3 (past the
    first min(B, 3)) is not looked at: the check runs 3 one-example gradients, not B."""
    fm = _fm(SeqFirst, batch_first=True)
    batch = _ids(5, 3, 6)
    p = _features(fm)
    real = tokens._check_examples
    for i, refused in ((2, True), (3, False)):
        def shifted(func, model, params, batch, feats, S, i=i):
            S = S.clone()
            S[i, 0] += 1e-3 * S.abs().max()
            return real(func, model, params, batch, feats, S)
        monkeypatch.setattr(tokens, "_check_examples", shifted)
        if refused:
            with pytest.raises(ValueError, match=r"on the first 3 examples"):
                token_scores(fm, fm.params, batch, p)
        else:
            assert token_scores(fm, fm.params, batch, p).shape == (5, 3, 2)
