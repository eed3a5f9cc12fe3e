"""Dropout ensembles against gradients taken by autograd with the masks made explicit."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dattri_fn.attribute.ensemble import dropout_ensemble, dropout_grads, dropout_outputs
from dattri_fn.model import functional_model
from dattri_fn.tree import ravel

D = torch.float64
P_DROP = 0.4


def _problem(seed, n=6, dim=3, hidden=5):
    g = torch.Generator().manual_seed(seed)
    params = {"W": torch.randn(hidden, dim, generator=g, dtype=D),
              "v": torch.randn(hidden, generator=g, dtype=D)}
    x, y = torch.randn(n, dim, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    return params, (x, y)


def _net(p, x, mask):
    return p["v"] @ (torch.tanh(p["W"] @ x) * mask)


def dropout_loss(p, z):
    x, y = z
    h = F.dropout(torch.tanh(p["W"] @ x), P_DROP, training=True)
    return 0.5 * (p["v"] @ h - y) ** 2


def _masks(params, batch, M, seed):
    """The masks member m applies: dropout of ones drawn exactly as the loss draws them."""
    ones = lambda p, z: F.dropout(torch.ones(p["W"].shape[0], dtype=D), P_DROP, training=True)
    return dropout_outputs(ones, params, batch, n_masks=M, seed=seed)  # [M, B, hidden]


def _explicit_grads(params, batch, mask):
    """[B, P] gradients of 0.5 (v . (tanh(W x) * mask) - y)^2 by autograd, one at a time."""
    flat0, unravel = ravel(params)
    rows = []
    for xi, yi in zip(*batch, strict=True):
        f = flat0.clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(0.5 * (_net(unravel(f), xi, mask) - yi) ** 2, f)
        rows.append(gi)
    return torch.stack(rows)


@settings(max_examples=10)
@given(st.integers(0, 2**16), st.integers(1, 4), st.booleans())
def test_dropout_ensemble_equals_mean_over_explicit_masks(seed, M, normalize):
    """s_ij = (1/M) sum_m <g_i^m, g_j^m> (or cos) with g^m by autograd under mask m; every
    example of a member shares one mask, and train/test/chunks see the same members."""
    params, train = _problem(seed)
    _, test = _problem(seed + 1, n=3)
    masks = _masks(params, train, M, seed)
    assert bool((masks == masks[:, :1]).all())  # one mask per member
    torch.testing.assert_close(_masks(params, test, M, seed), masks[:, :3], rtol=0, atol=0)
    ref = 0
    for m in range(M):
        G = _explicit_grads(params, train, masks[m, 0])
        Gt = _explicit_grads(params, test, masks[m, 0])
        if normalize:
            G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-300)
            Gt = Gt / Gt.norm(dim=1, keepdim=True).clamp_min(1e-300)
        ref = ref + G @ Gt.T / M
    method = dropout_ensemble(dropout_loss, n_masks=M, seed=seed, normalize=normalize,
                              chunk_size=4)
    state = method.prepare(params, train) if M > 1 else ()
    x, y = train
    S = method.score(params, state, [(x[:2], y[:2]), (x[2:], y[2:])], test)
    torch.testing.assert_close(S, ref, rtol=1e-12, atol=1e-12)
    diag = method.self_score(params, state, train)
    torch.testing.assert_close(diag, method.score(params, state, train, train).diagonal(),
                               rtol=1e-12, atol=1e-12)


def test_dropout_module_members_differ_and_are_seeded():
    """nn.Dropout in train mode through functional_model: members differ, a seed repeats them,
    and the caller's global RNG stream is left as it was."""
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 1)).to(D)
    net.train()
    with pytest.warns(UserWarning, match="training mode"):  # intended here: dropout is the point
        fm = functional_model(net, lambda out, y: F.mse_loss(out.squeeze(-1), y))
    _, (x, y) = _problem(3)
    before = torch.random.get_rng_state()
    G = dropout_grads(fm.loss, fm.params, (x, y), n_masks=3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert G.shape == (3, 6, sum(v.numel() for v in fm.params.values()))
    assert not torch.equal(G[0], G[1])
    assert torch.equal(G, dropout_grads(fm.loss, fm.params, (x, y), n_masks=3, seed=7))
    m = dropout_ensemble(fm, n_masks=3, seed=7)
    S = m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x, y))
    torch.testing.assert_close(S, torch.einsum("mip,mjp->ij", G, G) / 3, rtol=1e-12,
                               atol=1e-12)


def test_dropout_errors():
    """No dropout at attribution time (eval mode), bad n_masks or loss: errors naming them."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).to(D).eval()
    fm = functional_model(net, lambda out, y: F.mse_loss(out.squeeze(-1), y))
    _, train = _problem(0)
    with pytest.raises(ValueError, match=r"dropout_ensemble\(loss=...\): expected a loss that "
                                         r"applies dropout"):
        dropout_ensemble(fm, n_masks=2).prepare(fm.params, train)
    with pytest.raises(ValueError, match=r"dropout_ensemble\(n_masks=...\)"):
        dropout_ensemble(fm, n_masks=0)
    with pytest.raises(TypeError, match=r"dropout_ensemble\(target=...\): expected a "
                                        r"per-example function"):
        dropout_ensemble(fm, n_masks=2, target=3)


@settings(max_examples=10)
@given(st.integers(0, 2**16), st.integers(1, 3), st.booleans())
def test_dropout_tracin_is_lr_weighted_sum_over_checkpoints(seed, M, normalize):
    """lrs: sum_c lr_c (1/M) sum_m <g_i^{c,m}, g_j^{c,m}> == sum_c lr_c single-checkpoint scores,
    each of those checked against explicit masks above; explicit for mask 0 of checkpoint 1."""
    p0, train = _problem(seed)
    p1, test = _problem(seed + 1, n=3)
    lrs = [0.3, 0.7]
    m = dropout_ensemble(dropout_loss, n_masks=M, seed=seed, normalize=normalize, lrs=lrs)
    S = m.score([p0, p1], (), train, test)
    one = dropout_ensemble(dropout_loss, n_masks=M, seed=seed, normalize=normalize)
    ref = sum(lr * one.score(p, (), train, test) for lr, p in zip(lrs, [p0, p1], strict=True))
    torch.testing.assert_close(S, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.self_score([p0, p1], (), train),
                               m.score([p0, p1], (), train, train).diagonal(), rtol=1e-12,
                               atol=1e-12)
    if M == 1 and not normalize:
        mask = _masks(p1, train, 1, seed)[0, 0]
        G, Gt = _explicit_grads(p1, train, mask), _explicit_grads(p1, test, mask)
        torch.testing.assert_close(ref - 0.3 * one.score(p0, (), train, test), 0.7 * G @ Gt.T,
                                   rtol=1e-12, atol=1e-12)


def test_dropout_tracin_errors():
    """With lrs, params must be a list of len(lrs) checkpoints; lrs must be positive."""
    p0, train = _problem(0)
    m = dropout_ensemble(dropout_loss, n_masks=2, lrs=[0.1, 0.2])
    with pytest.raises(TypeError, match=r"dropout_ensemble\(params=...\): expected a list of 2 "):
        m.score(p0, (), train, train)
    with pytest.raises(ValueError, match=r"dropout_ensemble\(params=...\): expected 2 checkpoints"):
        m.score([p0], (), train, train)
    with pytest.raises(ValueError, match=r"dropout_ensemble\(lrs=...\): expected learning rates"):
        dropout_ensemble(dropout_loss, n_masks=2, lrs=[0.1, -1.0])
