"""token_scores on Embedding and LayerNorm parameters (stop 23, issue 14): their gradients split
over positions as a Linear's do, so they are scored per token instead of refused."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import per_sample_grad
from dattri_fn.attribute.tokens import token_scores
from dattri_fn.model import functional_model

DT = torch.float64
V, T, D = 9, 4, 5


class TokenLM(nn.Module):
    """tok (Embedding, padding_idx 0) -> LayerNorm -> tanh(fc) -> head, per token."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=0)
        self.ln, self.fc, self.head = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.ln(self.tok(ids)))))


def lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")


def _setup(seed, params=None):
    torch.manual_seed(seed)
    m = TokenLM().to(DT).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LayerNorm's ones/zeros would hide a swapped weight and bias
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
    fm = functional_model(m, lm_loss, params=params)
    ids = torch.randint(0, V, (3, T), generator=g)
    ids[1, 2] = 0  # the padding row: no gradient
    return fm, (ids, torch.randint(0, 3, (3, T), generator=g))


@pytest.mark.parametrize("seed", [0, 1])
def test_every_parameter_of_a_token_lm_splits_and_sums_to_the_example_score(seed):
    """Embedding (padding_idx), LayerNorm, Linears: sum_t s_itj = grad_i . p_j (vmap(grad), 1e-10)."""
    fm, batch = _setup(seed)
    G = per_sample_grad(fm.loss, fm.params, batch)
    p = torch.randn(2, G.shape[1], generator=torch.Generator().manual_seed(seed + 5), dtype=DT)
    S = token_scores(fm, fm.params, batch, p)
    assert S.shape == (3, T, 2)
    torch.testing.assert_close(S.sum(1), G @ p.T, rtol=1e-10, atol=1e-12)


def test_embedding_and_layer_norm_tokens_are_their_position_terms():
    """s_itj = M_j[id_it] . u_it + (u'_it * xhat_it) . m_jw + u'_it . m_jb, with u = dloss_i/d tok(ids)_t
    and u' = dloss_i/d ln(.)_t by autograd (0 at the padding id)."""
    fm, batch = _setup(2, params=lambda n: n.startswith(("tok.", "ln.")))
    net = fm.module
    ids, y = batch
    P = sum(v.numel() for v in fm.params.values())
    p = torch.randn(2, P, generator=torch.Generator().manual_seed(9), dtype=DT)
    S = token_scores(fm, fm.params, batch, p)
    Mw = p[:, :V * D].reshape(2, V, D)
    mw, mb = p[:, V * D:V * D + D], p[:, V * D + D:]
    for i in range(3):
        e = net.tok(ids[i]).detach()
        xhat = F.layer_norm(e, (D,))
        u = torch.func.grad(lambda z: lm_loss(net.head(torch.tanh(net.fc(net.ln(z)))), y[i]))(e)
        u2 = torch.func.grad(lambda z: lm_loss(net.head(torch.tanh(net.fc(z))), y[i]))(net.ln(e))
        for t in range(T):
            want = (Mw[:, ids[i, t]] @ u[t]) * (ids[i, t] != 0) + (u2[t] * xhat[t]) @ mw.T + mb @ u2[t]
            torch.testing.assert_close(S[i, t], want.detach(), rtol=1e-10, atol=1e-12)


def test_a_bare_parameter_is_still_refused_by_name():
    """A bare nn.Parameter (added position embeddings) has no per-token split the engine sees."""

    class WithPos(TokenLM):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(T, D))

        def forward(self, ids):
            return self.head(torch.tanh(self.fc(self.ln(self.tok(ids) + self.pos))))

    fm = functional_model(WithPos().to(DT).eval(), lm_loss)
    P = sum(v.numel() for v in fm.params.values())
    ids = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"token_scores\(params=...\): expected only weights and "
                                         r"biases of Linear, Conv1D, Conv2d, Embedding or "
                                         r"LayerNorm .*\['pos'\]"):
        token_scores(fm, fm.params, (ids, ids % 3), torch.zeros(1, P, dtype=DT))
