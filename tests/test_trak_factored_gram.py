"""TRAK without projection, dual form: the n x n Gram from the captured factors (a, g)."""

import pytest
import torch
from torch import nn

import dattri_fn.attribute.trak_kernel as trak_kernel
from dattri_fn.attribute.trak import (
    classification_margin,
    classification_margin_loss,
    classification_weight,
    classification_weight_loss,
    trak,
)
from dattri_fn.attribute.trak_kernel import factored_gram, factored_width
from dattri_fn.model import functional_model
from dattri_fn.transforms.layer_grads import layer_plan, per_sample_layer_grads

F64 = torch.float64


def _net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=F64))
    return net.eval()


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _dense_grads(net, params, batch):
    """[n, P] per-example gradients of the margin by one autograd call per example."""
    out = classification_margin(functional_model(net).forward)
    rows = []
    for i in range(batch[0].shape[0]):
        live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(out(live, (batch[0][i], batch[1][i])), list(live.values()))
        rows.append(torch.cat([t.reshape(-1) for t in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factored_gram_equals_dense_rows(seed):
    """factored_gram(blocks) == G G^T of the dense per-example gradients (float64, 1e-12),
    whole or by blocks of rows."""
    net = _net(seed)
    fm = functional_model(net, classification_margin_loss)
    batch = _data(7, seed + 10)
    lg = per_sample_layer_grads(fm, fm.params, batch)
    assert factored_width([lg]) == (5 + 1 + 4) + (4 + 1 + 3) < 39  # a, g per layer; P = 39
    G = _dense_grads(net, fm.params, batch)
    torch.testing.assert_close(factored_gram([lg], rows=3), G @ G.T, rtol=0, atol=1e-12)
    blocks = [lg.rows(0, 2), lg.rows(2, 3), lg.rows(3, 7)]  # by batch, not concatenated
    torch.testing.assert_close(factored_gram(blocks, rows=3), G @ G.T, rtol=0, atol=1e-12)
    assert layer_plan(fm) is not None


@pytest.mark.parametrize("C", [1, 2])
def test_unprojected_dual_from_factors_equals_closed_form(C, monkeypatch):
    """proj_dim=None, n_train < P: the kernel (G_c G_c^T + damping I)^-1 comes from the factored
    Gram, and s = Qbar_i / C sum_c [K_c G_c G_test_c^T]_ij as from dense autograd rows (1e-10);
    self-scores likewise."""
    calls = []
    monkeypatch.setattr(trak_kernel, "factored_gram",
                        lambda lg, **kw: calls.append(1) or factored_gram(lg, **kw))
    net = _net(C)
    margin = functional_model(net, classification_margin_loss)
    weight = functional_model(net, classification_weight_loss)
    g = torch.Generator().manual_seed(C)
    ckpts = [{k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=F64)
              for k, v in margin.params.items()} for _ in range(C)]
    train, test = _data(9, 20 + C), _data(4, 30 + C)
    m = trak(margin, weight_fn=weight, damping=0.05)
    state = m.prepare(ckpts, train)
    assert state.kernel_matrix().shape == (C, 9, 9) and len(calls) == C
    assert state.train_features is None and state.train_factors.num_rows == 9
    q = classification_weight(functional_model(net).forward)
    S, diag, Q = 0, 0, 0
    for c, p in enumerate(ckpts):
        G, Gt = _dense_grads(net, p, train), _dense_grads(net, p, test)
        K = torch.linalg.inv(G @ G.T + 0.05 * torch.eye(9, dtype=F64))
        torch.testing.assert_close(state.kernel_matrix()[c], K, rtol=1e-10, atol=1e-10)
        S = S + K @ G @ Gt.T
        diag = diag + (K @ G @ G.T).diagonal()
        Q = Q + torch.stack([q(p, (train[0][i], train[1][i])) for i in range(9)])
    want = S / C * (Q / C)[:, None]
    got = m.score(ckpts, state, None, test)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    torch.testing.assert_close(m.self_score(ckpts, state, None), diag / C * Q / C,
                               rtol=1e-10, atol=1e-12)
