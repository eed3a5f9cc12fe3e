"""Dropout ensembles against gradients taken by autograd with the masks made explicit."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dattri_fn.attribute.ensemble import (
    dropout_ensemble,
    dropout_grads,
    dropout_mask,
    dropout_members,
    dropout_outputs,
)
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


# -- dropout members of any method --------------------------------------------------------------
P_M = 0.3


def _classifier(seed, n=7, dim=3, hidden=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    params = {"W1": torch.randn(hidden, dim, generator=g, dtype=D),
              "b1": 0.1 * torch.randn(hidden, generator=g, dtype=D),
              "W2": torch.randn(classes, hidden, generator=g, dtype=D)}
    x = torch.randn(n, dim, generator=g, dtype=D)
    return params, (x, torch.randint(0, classes, (n,), generator=g))


def _body(p, x, drop):
    """Two dropout calls per forward (inputs, then hidden units): masks 0 and 1 of a member."""
    return torch.tanh(p["W1"] @ drop(x, 0) + p["b1"]), drop


def _dropped(x, call):  # what the model itself calls: torch's dropout, training on
    return F.dropout(x, P_M, training=True)


def _features(p, z, drop=_dropped):
    h, drop = _body(p, z[0], drop)
    return drop(h, 1)


def _head(p, h):
    return p["W2"] @ h


def _ce(p, z, drop=_dropped):
    return F.cross_entropy(_head(p, _features(p, z, drop))[None], z[1][None])


def _fixed(seed, member, shapes):
    """Member ``member``'s masks made explicit: call c multiplies by dropout_mask / (1 - p)."""
    masks = [dropout_mask(s, P_M, seed=seed, member=member, call=c) for c, s in enumerate(shapes)]
    return lambda x, c: x * masks[c].to(x.dtype) / (1 - P_M)


def _by_hand(build, seed, M, params, train, test, shapes=((3,), (5,))):
    """(1/M) sum_m of the method built on functions with member m's masks fixed by hand."""
    S = d = 0
    for m in range(M):
        method = build(_fixed(seed, m, shapes))
        state = method.prepare(params, train)
        S = S + method.score(params, state, train, test) / M
        d = d + method.self_score(params, state, train) / M
    return S, d


def _influence(drop):
    from dattri_fn.attribute import influence

    return influence(lambda p, z: _ce(p, z, drop), solver="explicit", damping=1.0)


def _margin(p, z, drop=_dropped):
    """TRAK's margin: the label's logit minus the log-sum-exp of the others."""
    logits = _head(p, _features(p, z, drop))
    label = torch.arange(logits.shape[0]) == z[1]
    return (logits * label).sum() - torch.logsumexp(logits.masked_fill(label, -torch.inf), 0)


def _trak(drop):
    from dattri_fn.attribute import trak

    return trak(lambda p, z: _margin(p, z, drop), weight_fn=lambda p, z: _ce(p, z, drop),
                proj_dim=6, damping=0.1)


def _representer(drop):
    from dattri_fn.attribute import representer

    return representer(lambda p, z: _features(p, z, drop), _head,
                       lambda o, y: F.cross_entropy(o[None], y[None]), l2=0.05)


BUILDERS = {"influence": _influence, "trak": _trak, "representer": _representer}


@pytest.mark.parametrize("method", sorted(BUILDERS))
@pytest.mark.parametrize("seed,M", [(0, 1), (3, 3)])
def test_dropout_members_equal_the_mean_over_masks_fixed_by_hand(method, seed, M):
    """s_ij = (1/M) sum_m s^m_ij for influence, TRAK and representer points, s^m the method run
    on the model with member m's two masks fixed by hand; self_score is the mean diagonal, top_k
    ranks the mean, and batching does not change a member."""
    params, train = _classifier(seed)
    _, test = _classifier(seed + 100, n=4)
    build = BUILDERS[method]
    ens = _members(method, M, seed)
    state = ens.prepare(params, train)
    S = ens.score(params, state, train, test)
    S_ref, d_ref = _by_hand(build, seed, M, params, train, test)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ens.self_score(params, state, train), d_ref, rtol=1e-10,
                               atol=1e-12)
    x, y = train
    listed = [(x[:3], y[:3]), (x[3:], y[3:])]
    S_list = ens.score(params, ens.prepare(params, listed), listed, test)
    torch.testing.assert_close(S_list, S, rtol=1e-10, atol=1e-12)
    top = ens.score(params, state, train, test, top_k=2)
    torch.testing.assert_close(top.values, torch.topk(S, 2, dim=0).values, rtol=0, atol=0)


def _members(method, M, seed):
    """The ensemble as a user writes it: the model's own functions passed through ``mask``."""
    from dattri_fn.attribute import influence, representer, trak

    build = {
        "influence": lambda mask: influence(mask(_ce), solver="explicit", damping=1.0),
        "trak": lambda mask: trak(mask(_margin), weight_fn=mask(_ce), proj_dim=6, damping=0.1),
        "representer": lambda mask: representer(mask(_features), _head, lambda o, y:
                                                F.cross_entropy(o[None], y[None]), l2=0.05),
    }[method]
    return dropout_members(build, n_masks=M, seed=seed)


def test_dropout_mask_keeps_one_minus_p_and_differs_by_member_and_call():
    """keep-rate of 10^5 entries within 5 sd of 1 - p (sd = sqrt(p(1-p)/n)); masks of other
    members, calls or seeds differ; the same arguments give the same mask on every call."""
    n, p = 100_000, 0.3
    mask = dropout_mask((n,), p, seed=1, member=2, call=0)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert abs(float(mask.double().mean()) - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(mask, dropout_mask((n,), p, seed=1, member=2, call=0))
    for other in ({"seed": 2, "member": 2, "call": 0}, {"seed": 1, "member": 3, "call": 0},
                  {"seed": 1, "member": 2, "call": 1}):
        agree = float((dropout_mask((n,), p, **other) == mask).double().mean())
        # independent masks agree on p^2 + (1-p)^2 = 0.58 of the entries
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    assert torch.equal(dropout_mask((4, 5), p, seed=0, member=0, call=0).flatten(),
                       dropout_mask((20,), p, seed=0, member=0, call=0))


def test_dropout_members_of_a_module_in_train_mode():
    """nn.Dropout in train mode through mask(fm) (its per-example loss): Grad-Dot members differ,
    the ensemble is seeded, the global RNG is untouched, M = 1 equals the by-hand single member."""
    from dattri_fn.attribute import grad_dot

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(P_M), nn.Linear(6, 3)).to(D)
    net.train()
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(net, F.cross_entropy)
    _, (x, y) = _classifier(4)
    before = torch.random.get_rng_state()
    ens = dropout_members(lambda mask: grad_dot(mask(fm)), n_masks=2, seed=5)
    S = ens.score(fm.params, ens.prepare(fm.params, (x, y)), (x, y), (x, y))
    assert torch.equal(torch.random.get_rng_state(), before)
    one = [dropout_members(lambda mask, m=m: grad_dot(mask(fm)), n_masks=m + 1, seed=5)
           for m in range(2)]
    S0 = one[0].score(fm.params, one[0].prepare(fm.params, (x, y)), (x, y), (x, y))
    S1 = 2 * one[1].score(fm.params, one[1].prepare(fm.params, (x, y)), (x, y), (x, y)) - S0
    assert not torch.allclose(S0, S1)
    torch.testing.assert_close(S, (S0 + S1) / 2, rtol=1e-12, atol=1e-12)
    keep = dropout_mask((6,), P_M, seed=5, member=0, call=0).to(D) / (1 - P_M)
    by_hand = lambda p, z: F.cross_entropy((p["3.weight"] @ (torch.tanh(
        p["0.weight"] @ z[0] + p["0.bias"]) * keep) + p["3.bias"])[None], z[1][None])
    torch.testing.assert_close(S0, grad_dot(by_hand).score(fm.params, (), (x, y), (x, y)),
                               rtol=1e-12, atol=1e-12)


def test_dropout_members_errors(tmp_path):
    """Refused by name: no function through mask, no dropout applied (eval mode), channel
    dropout, a store as train, another state, bad settings."""
    from dattri_fn.attribute import grad_dot
    from dattri_fn.store import record_store

    params, train = _classifier(0)
    with pytest.raises(ValueError, match=r"dropout_members\(build=...\): expected a method whose "
                                         r"functions pass through mask"):
        ens = dropout_members(lambda mask: grad_dot(lambda p, z: _ce(p, z, lambda x, c: x)),
                              n_masks=2)
        ens.score(params, ens.prepare(params, train), train, train)
    no_drop = lambda p, z: F.cross_entropy(_head(p, torch.tanh(p["W1"] @ F.dropout(
        z[0], 0.5, training=False) + p["b1"]))[None], z[1][None])
    with pytest.raises(ValueError, match=r"dropout_members\(build=...\): expected masked "
                                         r"functions that apply dropout"):
        ens = dropout_members(lambda mask: grad_dot(mask(no_drop)), n_masks=2)
        ens.score(params, ens.prepare(params, train), train, train)
    channel = lambda p, z: _head(p, F.dropout1d(z[0][None], 0.5, training=True)[0] @ p["W1"].T
                                 ).sum()
    with pytest.raises(ValueError, match=r"dropout_members\(build=...\): expected dropout "
                                         r"through F.dropout"):
        ens = dropout_members(lambda mask: grad_dot(mask(channel)), n_masks=2)
        ens.score(params, ens.prepare(params, train), train, train)
    ens = dropout_members(lambda mask: grad_dot(mask(_ce)), n_masks=2)
    state = ens.prepare(params, train)
    with pytest.raises(TypeError, match=r"dropout_members.score\(train=...\): expected training "
                                        r"data"):
        ens.score(params, state, record_store(tmp_path, train, params=params), train)
    with pytest.raises(TypeError, match=r"dropout_members.score\(state=...\): expected the "
                                        r"MembersState"):
        ens.score(params, (), train, train)
    with pytest.raises(ValueError, match=r"dropout_members\(n_masks=...\)"):
        dropout_members(lambda mask: grad_dot(mask(_ce)), n_masks=0)
    with pytest.raises(TypeError, match=r"dropout_members\(build=...\): expected a function "
                                        r"returning a Method"):
        dropout_members(lambda mask: 3, n_masks=1)


class _FixedMask(nn.Module):
    """Dropout with member m's mask made explicit: x * mask / (1 - p) on every row."""

    def __init__(self, keep):
        super().__init__()
        self.register_buffer("scale", keep.to(D) / (1 - P_M))

    def forward(self, x):
        return x * self.scale


def _dropout_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(P_M), nn.Linear(6, 3)).to(D).train()


def _by_hand_model(net, seed, member):
    """The network of member ``member``: its Dropout replaced by the fixed mask, same weights."""
    keep = dropout_mask((6,), P_M, seed=seed, member=member, call=0)
    fixed = nn.Sequential(net[0], net[1], _FixedMask(keep), net[3]).eval()
    return functional_model(fixed, F.cross_entropy)


@pytest.mark.parametrize("method", ["grad_dot", "if_kfac", "if_ekfac", "logra"])
def test_dropout_members_of_a_functional_model_take_the_factored_paths(method):
    """mask(fm) runs the module under the masks, so K-FAC/EK-FAC influence, LoGra and factored
    Grad-Dot (capture engine, batched forwards) equal the mean of the method on the networks
    with each member's mask fixed by hand (1e-10), and Grad-Dot equals its plain-loss members."""
    from dattri_fn.attribute import grad_dot, influence, logra

    build = {"grad_dot": lambda m: grad_dot(m),
             "if_kfac": lambda m: influence(m, solver="kfac", damping=0.1),
             "if_ekfac": lambda m: influence(m, solver="ekfac", damping=0.1),
             "logra": lambda m: logra(m, proj_dim=2, damping=0.1)}[method]
    net = _dropout_net()
    with pytest.warns(UserWarning, match="training mode"):
        fm = functional_model(net, F.cross_entropy)
    _, (x, y) = _classifier(2, n=8)
    train, test = [(x[:5], y[:5]), (x[5:], y[5:])], (x[:3], y[:3])
    seed, M = 4, 2
    ens = dropout_members(lambda mask: build(mask(fm)), n_masks=M, seed=seed)
    S = ens.score(fm.params, ens.prepare(fm.params, train), train, test)
    ref = 0
    for m in range(M):
        one = _by_hand_model(net, seed, m)
        meth = build(one)
        ref = ref + meth.score(one.params, meth.prepare(one.params, train), train, test) / M
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-12)
    if method == "grad_dot":
        plain = dropout_members(lambda mask: grad_dot(mask(fm.loss)), n_masks=M, seed=seed)
        state = plain.prepare(fm.params, train)
        torch.testing.assert_close(plain.score(fm.params, state, train, test), S, rtol=1e-10,
                                   atol=1e-12)
