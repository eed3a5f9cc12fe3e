"""Grad-Dot, Grad-Cos and TracIn against loops of torch.autograd.grad dot products."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dattri_fn.attribute import grad_cos, grad_dot, tracin
from dattri_fn.attribute.gradsim import tracin_cos
from problems import PROBLEMS, dense_per_sample_grads

problem_names = st.sampled_from(sorted(PROBLEMS))


def _split(batch, cuts):
    x, y = batch
    edges = [0, *cuts, x.shape[0]]
    return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _perturbed(params, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


@given(problem_names, st.integers(2, 9), st.integers(1, 5), st.integers(0, 2**16))
def test_grad_dot_equals_autograd_loop(name, n_train, n_test, seed):
    """grad_dot scores[i, j] == <autograd g_i, autograd g_j> exactly (no silent projection)."""
    params, loss, train = PROBLEMS[name](n=n_train, seed=seed)
    _, _, test = PROBLEMS[name](n=n_test, seed=seed + 1)
    m = grad_dot(loss)
    S = m.score(params, m.prepare(params, train), train, test)
    ref = dense_per_sample_grads(params, loss, train) @ dense_per_sample_grads(params, loss, test).T
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)


@given(problem_names, st.integers(1, 3), st.integers(0, 2**16))
def test_tracin_equals_weighted_sum_over_checkpoints(name, C, seed):
    """tracin == sum_c lr_c G_train(theta_c) G_test(theta_c)^T, with vmap over checkpoints."""
    params, loss, train = PROBLEMS[name](n=6, seed=seed)
    _, _, test = PROBLEMS[name](n=3, seed=seed + 1)
    ckpts = [_perturbed(params, seed + c) for c in range(C)]
    lrs = [0.1 * (c + 1) for c in range(C)]
    m = tracin(loss, lrs=lrs)
    S = m.score(ckpts, m.prepare(ckpts, train), _split(train, [2, 3]), test)
    ref = sum(lr * dense_per_sample_grads(p, loss, train) @ dense_per_sample_grads(p, loss, test).T
              for lr, p in zip(lrs, ckpts, strict=True))
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)
    diag = m.self_score(ckpts, (), _split(train, [1, 4]))
    torch.testing.assert_close(diag, torch.diagonal(m.score(ckpts, (), train, train)),
                               rtol=0, atol=1e-12)


@given(problem_names, st.integers(0, 2**16), st.integers(1, 4))
def test_streamed_topk_and_self(name, seed, k):
    """Streaming == one batch; top_k == torch.topk of the full matrix; self == diagonal."""
    params, loss, train = PROBLEMS[name](n=8, seed=seed)
    _, _, test = PROBLEMS[name](n=3, seed=seed + 1)
    for m in (grad_dot(loss, chunk_size=3), grad_cos(loss)):
        full = m.score(params, (), train, test)
        torch.testing.assert_close(m.score(params, (), _split(train, [3, 5]), test), full,
                                   rtol=0, atol=1e-13)
        top = m.score(params, (), _split(train, [2, 7]), test, top_k=k)
        ref = torch.topk(full, k, dim=0)
        torch.testing.assert_close(top.values, ref.values, rtol=0, atol=1e-13)
        torch.testing.assert_close(full.gather(0, top.indices), ref.values, rtol=0, atol=1e-13)
        low = m.score(params, (), train, test, top_k=k, largest=False)
        torch.testing.assert_close(low.values, torch.topk(full, k, dim=0, largest=False).values)
        torch.testing.assert_close(m.self_score(params, (), _split(train, [4])),
                                   torch.diagonal(m.score(params, (), train, train)),
                                   rtol=0, atol=1e-12)


def test_grad_cos_is_normalised():
    """grad_cos == grad_dot / (|g_i| |g_j|), and self-influence is 1."""
    params, loss, train = PROBLEMS["mlp"](n=6)
    dot = grad_dot(loss).score(params, (), train, train)
    norms = torch.diagonal(dot).sqrt()
    cos = grad_cos(loss).score(params, (), train, train)
    torch.testing.assert_close(cos, dot / norms[:, None] / norms[None, :], rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_cos(loss).self_score(params, (), train),
                               torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_projected_grad_dot_is_unbiased_and_seeded():
    """With projection, scores follow G R R^T G'^T for the projector's R; same seed, same scores."""
    from dattri_fn.transforms.project import make_projector

    params, loss, train = PROBLEMS["mlp"](n=6)
    m = grad_dot(loss, proj_dim=16, seed=3)
    S = m.score(params, (), train, train)
    G = dense_per_sample_grads(params, loss, train)
    R = make_projector(G.shape[1], proj_dim=16, seed=3, dtype=G.dtype).matrix()
    torch.testing.assert_close(S, (G @ R) @ (G @ R).T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, grad_dot(loss, proj_dim=16, seed=3).score(params, (), train, train))
    assert not torch.allclose(S, grad_dot(loss, proj_dim=16, seed=4).score(params, (), train, train))


def test_sign_duplicate_is_top_proponent():
    """A training point identical to the test point has a positive score and ranks first."""
    params, loss, (x, y) = PROBLEMS["logistic"](n=10, seed=5)
    test = (x[3:4], y[3:4])
    for m in (grad_dot(loss), grad_cos(loss), tracin(loss, lrs=[0.5])):
        s = m.score(params, (), (x, y), test)[:, 0]
        assert s[3] > 0 and int(s.argmax()) == 3


def test_bad_inputs():
    """Mismatched checkpoint keys, wrong lrs, NaN params, wrong test width: clear errors."""
    params, loss, train = PROBLEMS["linear"](n=4)
    m = tracin(loss, lrs=[0.1, 0.1])
    with pytest.raises(ValueError, match=r"tracin\(params\[1\]=...\): expected the keys"):
        m.score([params, {"w": params["w"]}], (), train, train)
    with pytest.raises(ValueError, match=r"tracin\(lrs=...\): expected 1 learning rates \(one per"):
        tracin(loss, lrs=[0.1, 0.1]).score([params], (), train, train)
    with pytest.raises(ValueError, match=r"tracin\(lrs=...\): expected a finite number > 0"):
        tracin(loss, lrs=[-1.0])
    with pytest.raises(ValueError, match=r"grad_dot\(params\[0\]=...\): expected finite"):
        grad_dot(loss).score({k: v * float("nan") for k, v in params.items()}, (), train, train)
    with pytest.raises(ValueError, match=r"grad_dot\(test=...\): expected one leading batch"):
        grad_dot(loss).score(params, (), train, (train[0], train[1][:2]))
    with pytest.raises(ValueError, match=r"grad_dot\(top_k=...\)"):
        grad_dot(loss).score(params, (), train, train, top_k=0)


def test_dataloader_train_and_test_give_the_same_scores():
    """A torch DataLoader (lists from default_collate) streams like a list of tuples."""
    from torch.utils.data import DataLoader, TensorDataset

    params, loss, (x, y) = PROBLEMS["mlp"](n=10, seed=3)
    m = grad_dot(loss)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    torch.testing.assert_close(m.score(params, (), loader, loader), m.score(params, (), (x, y), (x, y)),
                               rtol=0, atol=1e-13)


def test_attributor_verbs_map_onto_the_pure_pair():
    """Attributor.cache/attribute/self_attribute == prepare/score/self_score."""
    from dattri_fn.attribute import Attributor, influence

    params, loss, batch = PROBLEMS["logistic"](n=6)
    m = influence(loss, solver="explicit", damping=0.1)
    a = Attributor(m, params)
    ref = m.score(params, m.prepare(params, batch), batch, batch)
    torch.testing.assert_close(a.attribute(batch, batch), ref)
    torch.testing.assert_close(a.self_attribute(batch), torch.diagonal(ref))
    with pytest.raises(TypeError, match=r"Attributor\(method=...\)"):
        Attributor(lambda: None, params)


@pytest.mark.parametrize("countable", [True, False])
def test_stream_scores_refuses_a_feature_map_that_drops_rows(countable):
    """A countable train set's scores are written in place: a feature map returning fewer rows
    than its batch is an error (never uninitialised rows), as for a DataLoader."""
    from torch.utils.data import DataLoader, TensorDataset

    from dattri_fn.attribute import stream_scores

    X, T = torch.randn(10, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    train = [(X[:5],), (X[5:],)] if countable else DataLoader(TensorDataset(X), batch_size=5)
    assert torch.equal(stream_scores(lambda b: b[0], train, T, func="f"), X @ T.T)
    with pytest.raises(ValueError, match=r"f\(train=...\): expected the train feature map to "
                                         r"give one row per example \(5\), got 4"):
        stream_scores(lambda b: b[0][:-1], train, T, func="f")


def _cosines(p, loss, train, test):
    G, Gt = dense_per_sample_grads(p, loss, train), dense_per_sample_grads(p, loss, test)
    return (G / G.norm(dim=1, keepdim=True)) @ (Gt / Gt.norm(dim=1, keepdim=True)).T


@given(problem_names, st.integers(1, 3), st.integers(0, 2**16), st.booleans())
def test_tracin_cos_equals_weighted_sum_of_cosines(name, C, seed, model):
    """tracin_cos == sum_c lr_c cos(G_train(theta_c), G_test(theta_c)); self = sum_c lr_c."""
    params, loss, train = PROBLEMS[name](n=6, seed=seed)
    _, _, test = PROBLEMS[name](n=3, seed=seed + 1)
    ckpts = [_perturbed(params, seed + c) for c in range(C)]
    lrs = [0.1 * (c + 1) for c in range(C)]
    m = tracin_cos(loss, lrs=lrs)
    S = m.score(ckpts, m.prepare(ckpts, train), _split(train, [2, 3]), test)
    ref = sum(lr * _cosines(p, loss, train, test) for lr, p in zip(lrs, ckpts, strict=True))
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.self_score(ckpts, (), train),
                               torch.full((6,), sum(lrs), dtype=torch.float64), rtol=0, atol=1e-12)


def test_tracin_cos_factored_model_and_errors():
    """A FunctionalModel (factored Linear gradients) gives the dense cosine sum; bad lrs named."""
    from torch import nn

    from dattri_fn import functional_model

    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)
    bce = lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(
        out.squeeze(-1), y.to(out.dtype))
    fm = functional_model(net, bce)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (7,), generator=g)
    ckpts = [fm.params, _perturbed(fm.params, 4)]
    m = tracin_cos(fm, lrs=[0.3, 0.2])
    S = m.score(ckpts, (), (x, y), (x[:3], y[:3]))
    ref = sum(lr * _cosines(p, fm.loss, (x, y), (x[:3], y[:3]))
              for lr, p in zip([0.3, 0.2], ckpts, strict=True))
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"tracin_cos\(lrs=...\): expected 2 learning rates"):
        tracin_cos(fm, lrs=[0.1, 0.1, 0.1]).score(ckpts, (), (x, y), (x, y))
    with pytest.raises(TypeError, match=r"tracin_cos\(lrs=...\): expected a sequence"):
        tracin_cos(fm, lrs="a")


@pytest.mark.parametrize("method", ["grad_dot", "tracin"])
def test_binary_one_logit_grad_similarity(method):
    """One-logit BCE model: grad_dot / tracin == sum_c lr_c <g_i, g_j> with autograd gradients."""
    from torch import nn

    from dattri_fn import functional_model

    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.float64)
    bce = lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(
        out.squeeze(-1), y.to(out.dtype))
    fm = functional_model(net, bce)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g)
    ckpts = [fm.params] if method == "grad_dot" else [fm.params, _perturbed(fm.params, 6)]
    lrs = [1.0] if method == "grad_dot" else [0.5, 0.25]
    m = grad_dot(fm) if method == "grad_dot" else tracin(fm, lrs=lrs)
    params = ckpts[0] if method == "grad_dot" else ckpts
    S = m.score(params, (), (x, y), (x[:2], y[:2]))
    ref = sum(lr * dense_per_sample_grads(p, fm.loss, (x, y))
              @ dense_per_sample_grads(p, fm.loss, (x[:2], y[:2])).T
              for lr, p in zip(lrs, ckpts, strict=True))
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-12)
