"""Per-token scores split a score exactly over the positions of each training sequence."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn import per_sample_grad
from dattri_fn.attribute.tokens import token_scores
from dattri_fn.model import functional_model
from problems import SeqNet

DT = torch.float64


def _seq(seed, bias, n=4, T=3, dim=3, hidden=5, classes=3):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = SeqNet(dim, hidden, classes, bias).to(DT).eval()
    fm = functional_model(net, F.cross_entropy, params=lambda n: not n.startswith("norm."))
    x = torch.randn(n, T, dim, generator=g, dtype=DT)
    return fm, (x, torch.randint(0, classes, (n,), generator=g))


@given(seed=st.integers(0, 2**16), bias=st.booleans(), n_test=st.integers(1, 3))
def test_token_scores_sum_to_the_example_scores_and_split_per_token(seed, bias, n_test):
    """On the token-level layer: sum_t s_itj = grad_i . p_j (autograd), and s_itj = vec(g_t a_t^T
    [, g_t]) . p_j with g = dloss/dz of that layer's output z (autograd)."""
    fm, batch = _seq(seed, bias)
    fm = functional_model(fm.module, F.cross_entropy, params=lambda n: n.startswith("emb."))
    G = per_sample_grad(fm.loss, fm.params, batch)
    p = torch.randn(n_test, G.shape[1], generator=torch.Generator().manual_seed(seed + 1),
                    dtype=DT)
    S = token_scores(fm, fm.params, batch, p)
    assert S.shape == (4, 3, n_test)
    torch.testing.assert_close(S.sum(1), G @ p.T, rtol=1e-10, atol=1e-12)
    x, y = batch
    net = fm.module
    rest = lambda z, i: F.cross_entropy(net.head(net.norm(torch.tanh(z)).mean(0))[None],
                                        y[i:i + 1])
    for i in range(4):
        z = x[i] @ fm.params["emb.weight"].T + (fm.params["emb.bias"] if bias else 0)
        g = torch.func.grad(rest)(z, i)  # [T, hidden]
        for t in range(3):
            dW = torch.outer(g[t], x[i, t]).reshape(-1)
            want = dW @ p[:, :dW.numel()].T
            if bias:
                want = want + g[t] @ p[:, dW.numel():].T
            torch.testing.assert_close(S[i, t], want, rtol=1e-10, atol=1e-12)


def test_token_scores_refuse_parameters_that_do_not_split():
    """Layers at different numbers of positions (the head after pooling) are named, with the
    LayerNorm (split per token since stop 23) attributed or not; features of another width too."""
    fm, batch = _seq(0, True)
    full = functional_model(fm.module, F.cross_entropy)
    P = sum(v.numel() for v in full.params.values())
    with pytest.raises(ValueError, match=r"token_scores\(model=...\): expected layers applied at "
                                         r"the same number of positions, got 3 and 1"):
        token_scores(full, full.params, batch, torch.zeros(1, P, dtype=DT))
    P = sum(v.numel() for v in fm.params.values())
    with pytest.raises(ValueError, match=r"token_scores\(model=...\): expected layers applied at "
                                         r"the same number of positions, got 3 and 1"):
        token_scores(fm, fm.params, batch, torch.zeros(1, P, dtype=DT))
    with pytest.raises(ValueError, match=r"token_scores\(test_features=...\): expected \[n_test"):
        token_scores(fm, fm.params, batch, torch.zeros(1, 3, dtype=DT))


def test_token_scores_on_stock_gpt2_mlp_blocks():
    """GPT-2 (HF Conv1D, transposed weights, default attention): per-token scores of the MLP
    blocks sum to grad_i . p_j, grad_i by autograd one sequence at a time."""
    transformers = pytest.importorskip("transformers")
    from dattri_fn.losses import causal_lm_loss

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0)).double().eval()
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids}
    fm = functional_model(gpt2, causal_lm_loss, params=lambda n: ".mlp." in n)
    G = torch.stack([torch.cat([v.reshape(-1) for v in torch.func.grad(fm.loss)(
        fm.params, {k: v[i] for k, v in batch.items()}).values()]) for i in range(3)])
    p = torch.randn(2, G.shape[1], generator=torch.Generator().manual_seed(3), dtype=DT)
    S = token_scores(fm, fm.params, batch, p)
    assert S.shape == (3, 6, 2)
    torch.testing.assert_close(S.sum(1), G @ p.T, rtol=1e-9, atol=1e-11)
