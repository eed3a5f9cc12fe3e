"""Representer Point Selection against its formula built by hand, and the representer theorem."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn import io
from dattri_fn.attribute.representer import RepresenterState, fit_head, representer
from dattri_fn.model import functional_model

F64 = torch.float64
seeds = st.integers(0, 2**16)
BODY = ("0.weight", "0.bias")


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _model(seed, device, dim=3, hidden=4, classes=3):
    """Linear-Tanh body + bias-free Linear head, through functional_model; (params, feat, head)."""
    net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                        nn.Linear(hidden, classes, bias=False)).to(F64)
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=F64))
    body = functional_model(net[:2].to(device))
    feature_fn = lambda p, ex: body.forward({k: p[k] for k in BODY}, ex[0])
    head_fn = lambda p, h: p["2.weight"] @ h
    return functional_model(net.to(device), F.cross_entropy).params, feature_fn, head_fn


def _data(n, seed, device, dim=3, classes=3):
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g, dtype=F64)
    return x.to(device), torch.randint(0, classes, (n,), generator=g).to(device)


def _split(batch, cuts):
    x, y = batch
    edges = [0, *cuts, x.shape[0]]
    return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _close(got, ref, tol=1e-12):
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))


def _by_hand(params, feature_fn, head_fn, l2, train, test, explain="label"):
    """s_ij = alpha_i[c_j] <h_i, h_j>, alpha_i = -dCE/dlogits_i / (2 l2 n), one pair at a time."""
    (x, y), (xt, yt) = train, test
    n = x.shape[0]
    S = torch.empty(n, xt.shape[0], dtype=F64, device=x.device)
    for i in range(n):
        h_i = feature_fn(params, (x[i], y[i]))
        logits = head_fn(params, h_i).detach().requires_grad_(True)
        (dl,) = torch.autograd.grad(F.cross_entropy(logits, y[i]), logits)
        alpha = -dl / (2 * l2 * n)
        for j in range(xt.shape[0]):
            h_j = feature_fn(params, (xt[j], yt[j]))
            c = yt[j] if explain == "label" else head_fn(params, h_j).argmax()
            S[i, j] = alpha[c] * (h_i @ h_j)
    return S


@given(seed=seeds, n_train=st.integers(1, 8), n_test=st.integers(1, 4),
       l2=st.sampled_from([1e-3, 0.1, 2.0]), explain=st.sampled_from(["label", "prediction"]))
def test_scores_equal_formula_by_hand(device, seed, n_train, n_test, l2, explain):
    """score[i, j] == alpha_i[c_j] <h_i, h_j> built pair by pair with autograd, to 1e-12."""
    params, feat, head = _model(seed, device)
    train, test = _data(n_train, seed + 1, device), _data(n_test, seed + 2, device)
    m = representer(feat, head, F.cross_entropy, l2=l2, explain=explain)
    S = m.score(params, m.prepare(params, train), None, test)
    assert S.shape == (n_train, n_test) and S.dtype == F64 and S.device.type == device.type
    _close(S, _by_hand(params, feat, head, l2, train, test, explain))


@pytest.mark.parametrize("l2", [1e-2, 0.3])
def test_row_sums_reproduce_logits_at_stationarity(device, l2):
    """W stationary for (1/n) sum CE + l2 |W|^2  =>  sum_i s_ij = (W h_j)[c_j], alpha^T H h = W h."""
    params, feat, head = _model(3, device)
    train, test = _data(30, 4, device), _data(5, 5, device)
    with torch.no_grad():
        H = torch.stack([feat(params, (x, None)) for x in train[0]])
    objective = lambda w: F.cross_entropy(H @ w.T, train[1]) + l2 * (w**2).sum()
    W = params["2.weight"].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], max_iter=200, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = objective(W)
        obj.backward()
        return obj

    opt.step(closure)
    W = W.detach()
    for _ in range(3):  # Newton polish: quadratic convergence from LBFGS's ~1e-9 to round-off
        g = torch.func.grad(objective)(W).reshape(-1)
        Hw = torch.func.hessian(lambda v: objective(v.reshape(W.shape)))(W.reshape(-1))
        W = W - torch.linalg.solve(Hw, g).reshape(W.shape)
    assert torch.func.grad(objective)(W).abs().max() < 1e-14  # the theorem's premise
    params = {**params, "2.weight": W}
    m = representer(feat, head, F.cross_entropy, l2=l2, explain="prediction")
    state = m.prepare(params, train)
    logits = torch.stack([head(params, feat(params, (x, None))) for x in test[0]])
    S = m.score(params, state, None, test)
    _close(S.sum(0), logits.max(-1).values, 1e-9)
    h_test = torch.stack([feat(params, (x, None)) for x in test[0]])
    _close(h_test @ state.features.T @ state.alpha, logits, 1e-9)


@given(seed=seeds, cuts=st.tuples(st.integers(1, 4), st.integers(5, 8)), k=st.integers(1, 4),
       chunk=st.sampled_from([None, 2, 5]), explain=st.sampled_from(["label", "prediction"]))
def test_streamed_topk_and_self_score(device, seed, cuts, k, chunk, explain):
    """3 uneven train batches == one batch; top_k == torch.topk(full); self == diag(full)."""
    params, feat, head = _model(seed, device)
    train, test = _data(9, seed + 1, device), _data(4, seed + 2, device)
    shards = _split(train, list(cuts))
    m = representer(feat, head, F.cross_entropy, l2=0.1, explain=explain, chunk_size=chunk)
    full = m.score(params, m.prepare(params, train), train, test)
    state = m.prepare(params, shards)
    _close(m.score(params, state, shards, test), full, 1e-13)
    for largest in (True, False):
        top = m.score(params, state, None, test, top_k=k, largest=largest)
        ref = torch.topk(full, k, dim=0, largest=largest)
        _close(top.values, ref.values, 1e-13)
        _close(full.gather(0, top.indices), ref.values, 1e-13)
    _close(m.self_score(params, state, None),
           torch.diagonal(m.score(params, state, None, train)), 1e-13)


@given(seed=seeds)
def test_prediction_needs_no_test_labels(device, seed):
    """explain='prediction': score(test=(x,)) == score(test=(x, y)), c_j = argmax logits_j."""
    params, feat, head = _model(seed, device)
    train, test = _data(5, seed + 1, device), _data(3, seed + 2, device)
    m = representer(feat, head, F.cross_entropy, l2=0.1, explain="prediction")
    state = m.prepare(params, train)
    assert torch.equal(m.score(params, state, None, (test[0],)),
                       m.score(params, state, None, test))


@given(seed=seeds)
def test_cross_entropy_self_scores_are_positive(device, seed):
    """CE: alpha_i[y_i] = (1 - p_{y_i}) / (2 l2 n) > 0, so s_ii = alpha_i[y_i] |h_i|^2 > 0."""
    params, feat, head = _model(seed, device)
    train = _data(8, seed + 1, device)
    m = representer(feat, head, F.cross_entropy, l2=0.1)
    state = m.prepare(params, train)
    assert (m.self_score(params, state, train) > 0).all()
    p = torch.stack([head(params, h) for h in state.features]).softmax(-1)
    _close(state.alpha.gather(1, train[1][:, None])[:, 0],
           (1 - p.gather(1, train[1][:, None])[:, 0]) / (2 * 0.1 * 8))


def test_state_is_tensors_and_round_trips(device, tmp_path):
    """The state is a NamedTuple of tensors [n, F], [n, K], [n]; io round trip keeps scores."""
    params, feat, head = _model(0, device)
    train, test = _data(6, 1, device), _data(2, 2, device)
    m = representer(feat, head, F.cross_entropy, l2=0.1)
    state = m.prepare(params, train)
    assert isinstance(state, RepresenterState)
    assert state.features.shape == (6, 4) and state.alpha.shape == (6, 3)
    assert state.classes.shape == (6,) and state.classes.dtype == torch.int64
    io.save(state, tmp_path / "rps.pt")
    assert torch.equal(m.score(params, io.load(tmp_path / "rps.pt"), None, test),
                       m.score(params, state, None, test))


def test_bad_input_raises_clear_errors(device):
    """Bad settings, shapes, feature sizes, labels and params raise errors naming the argument."""
    params, feat, head = _model(0, device)
    train, test = _data(6, 1, device), _data(2, 2, device)
    m = representer(feat, head, F.cross_entropy, l2=0.1)
    state = m.prepare(params, train)
    with pytest.raises(ValueError, match=r"representer\(l2=...\): expected a finite number > 0"):
        representer(feat, head, F.cross_entropy, l2=0.0)
    with pytest.raises(ValueError, match=r"representer\(explain=...\): expected one of"):
        representer(feat, head, F.cross_entropy, l2=0.1, explain="gradient")
    with pytest.raises(TypeError, match=r"representer\(head_fn=...\): expected a callable"):
        representer(feat, None, F.cross_entropy, l2=0.1)
    with pytest.raises(ValueError, match=r"representer.score\(test=...\): expected examples "
                                         r"that feature_fn accepts"):
        m.score(params, state, None, _data(2, 2, device, dim=5))
    wide, wfeat, whead = _model(0, device, hidden=6)
    with pytest.raises(ValueError, match=r"representer.score\(test=...\): expected penultimate "
                                         r"features of size F=4"):
        representer(wfeat, whead, F.cross_entropy, l2=0.1).score(wide, state, None, test)
    with pytest.raises(ValueError, match=r"feature_fn=...\): expected a function returning a "
                                         r"1-d Tensor per example, got shape \[\]"):
        representer(lambda p, ex: feat(p, ex).sum(), head, F.cross_entropy,
                    l2=0.1).prepare(params, train)
    with pytest.raises(ValueError, match=r"loss_on_logits=...\): expected a function returning "
                                         r"a scalar"):
        representer(feat, head, lambda z, y: z * 1.0, l2=0.1).prepare(params, train)
    with pytest.raises(TypeError, match=r"representer.prepare\(label_fn=...\): expected an "
                                        r"integer class label"):
        representer(feat, head, lambda z, y: (z * y).sum(), l2=0.1,
                    label_fn=lambda ex: ex[0]).prepare(params, train)
    with pytest.raises(ValueError, match=r"representer.score\(test=...\): expected classes in "
                                         r"\[0, 3\)"):
        m.score(params, state, None, (test[0], test[1] + 3))
    with pytest.raises(TypeError, match=r"representer.prepare\(params=...\): expected a "
                                        r"non-empty dict"):
        m.prepare([params], train)
    nan = {k: v.clone() for k, v in params.items()}
    nan["2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"finite values, got NaN or inf at key '2.weight'"):
        m.prepare(nan, train)
    with pytest.raises(ValueError, match=r"representer.self_score\(train=...\): expected the 6 "
                                         r"training examples"):
        m.self_score(params, state, _data(3, 1, device))
    with pytest.raises(TypeError, match=r"representer.score\(state=...\): expected the "
                                        r"RepresenterState"):
        m.score(params, (), None, test)


def _newton_head(H, targets, l2, W0):
    """argmin_W mean CE(W h_i, t_i) + l2 |W|^2 by damped Newton (torch.func.hessian, Armijo
    backtracking: globally convergent on this strongly convex objective)."""
    objective = lambda w: F.cross_entropy(H @ w.reshape(W0.shape).T, targets) + l2 * (w * w).sum()
    w = W0.reshape(-1).clone()
    for _ in range(100):
        g = torch.func.grad(objective)(w)
        if g.abs().max() < 1e-13:
            break
        step, t = torch.linalg.solve(torch.func.hessian(objective)(w), g), 1.0
        while t > 1e-8 and objective(w - t * step) > objective(w) - 0.25 * t * (g @ step):
            t /= 2
        w = w - t * step
    assert torch.func.grad(objective)(w).abs().max() < 1e-9
    return w.reshape(W0.shape)


@pytest.mark.slow  # 14-30 s at load 6: torch.func.hessian's reference Newton, 25 examples
@given(seed=seeds, n=st.integers(2, 12), l2=st.sampled_from([1e-2, 0.3]),
       soft=st.booleans())
def test_fit_head_is_the_newton_minimiser(device, seed, n, l2, soft):
    """fit_head is stationary (largest gradient entry <= 1e-7 max(1, at the start)) and within
    (|grad| + |grad at ref|) / (2 l2) of the damped-Newton minimiser ref (strong convexity), for
    labels or probability targets; the body parameters, which head_fn does not read, come back
    unchanged."""
    params, feat, head = _model(seed, device)
    x, y = _data(n, seed + 1, device)
    H = torch.stack([feat(params, (xi, None)) for xi in x]).detach()
    targets = torch.softmax(torch.randn(n, 3, generator=_gen(seed), dtype=F64), -1).to(device) \
        if soft else y
    fitted = fit_head(head, F.cross_entropy, params, H, targets, l2=l2)
    W = fitted["2.weight"]
    grad_fn = torch.func.grad(lambda w: F.cross_entropy(H @ w.T, targets) + l2 * (w * w).sum())
    start = float(grad_fn(params["2.weight"].detach()).abs().max())
    grad = grad_fn(W)
    assert float(grad.abs().max()) <= 1e-7 * max(1.0, start)
    ref = _newton_head(H, targets, l2, params["2.weight"].detach())
    slack = float(grad.norm()) + float(grad_fn(ref).norm())
    assert float((W - ref).norm()) <= slack / (2 * l2) * 1.01 + 1e-12
    assert all(fitted[k] is params[k] for k in params if k != "2.weight")


@pytest.mark.parametrize("refit", ["labels", "predictions"])
def test_refit_makes_row_sums_reproduce_the_fitted_logits(device, refit):
    """refit: alpha comes from the fitted head W* and its targets, so sum_i s_ij = (W* h_j)[y_j]
    (the representer theorem at W*), though the head in params is far from stationary."""
    params, feat, head = _model(5, device)
    train, test = _data(25, 6, device), _data(4, 7, device)
    l2 = 0.05
    H = torch.stack([feat(params, (xi, None)) for xi in train[0]]).detach()
    W0 = params["2.weight"].detach()
    targets = train[1] if refit == "labels" else torch.softmax(H @ W0.T, -1)
    W = _newton_head(H, targets, l2, W0)
    m = representer(feat, head, F.cross_entropy, l2=l2, refit=refit)
    S = m.score(params, m.prepare(params, train), None, test)
    h_test = torch.stack([feat(params, (xi, None)) for xi in test[0]])
    _close(S.sum(0), (h_test @ W.T).gather(1, test[1][:, None]).squeeze(1), 1e-5)
    plain = representer(feat, head, F.cross_entropy, l2=l2)
    assert not torch.allclose(plain.score(params, plain.prepare(params, train), None, test), S)
    with pytest.raises(ValueError, match=r"representer\(refit=...\): expected None or one of"):
        representer(feat, head, F.cross_entropy, l2=l2, refit="soft")


def test_dataloader_over_a_subset_is_refused(device):
    """score/self_score with a DataLoader over a subset of the prepared training set refuse
    (the cached state scores all n_train rows) instead of returning n_train rows (issue 15 #5);
    a DataLoader over the whole set is accepted."""
    from torch.utils.data import DataLoader, Subset, TensorDataset

    params, feat, head = _model(0, device)
    x, y = _data(10, 1, device)
    m = representer(feat, head, F.cross_entropy, l2=0.1)
    state = m.prepare(params, (x, y))
    data = TensorDataset(x, y)
    assert m.score(params, state, DataLoader(data, batch_size=4), (x[:2], y[:2])).shape == (10, 2)
    subset = DataLoader(Subset(data, range(6)), batch_size=4)
    with pytest.raises(ValueError, match=r"representer.score\(train=...\): expected the 10 "
                                         r"training examples .* got 6 examples"):
        m.score(params, state, subset, (x[:2], y[:2]))
    with pytest.raises(ValueError, match=r"representer.self_score\(train=...\): expected the 10"):
        m.self_score(params, state, subset)
    dropped = DataLoader(data, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match=r"got 8 examples"):
        m.self_score(params, state, dropped)


def _binary(seed, n, device):
    """Linear-Tanh body + one-logit bias-free head, BCE-with-logits on 0/1 integer labels."""
    g = _gen(seed)
    params = {"0.weight": 0.8 * torch.randn(4, 3, generator=g, dtype=F64),
              "0.bias": 0.8 * torch.randn(4, generator=g, dtype=F64),
              "2.weight": 0.8 * torch.randn(1, 4, generator=g, dtype=F64)}
    params = {k: v.to(device) for k, v in params.items()}
    feature_fn = lambda p, ex: torch.tanh(p["0.weight"] @ ex[0] + p["0.bias"])
    head_fn = lambda p, h: p["2.weight"] @ h  # [1]
    bce = lambda s, y: F.binary_cross_entropy_with_logits(s[0], y.to(s.dtype))
    x = torch.randn(n, 3, generator=g, dtype=F64).to(device)
    y = torch.randint(0, 2, (n,), generator=g).to(device)
    return params, feature_fn, head_fn, bce, (x, y)


@given(seeds, st.integers(3, 9), st.sampled_from(["label", "prediction"]),
       st.sampled_from([None, "labels", "predictions"]))
def test_binary_one_logit_by_hand_and_theorem(device, seed, n, explain, refit):
    """One logit: s_ij = (2c_j - 1) alpha_i <h_i, h_j>, alpha_i = -dBCE/ds_i / (2 l2 n); refit:
    sum_i s_ij = (2c_j - 1) s_j (the representer theorem on the two-class margin)."""
    params, feat, head, bce, train = _binary(seed, n, device)
    _, _, _, _, test = _binary(seed + 1, 4, device)
    l2 = 0.05
    m = representer(feat, head, bce, l2=l2, explain=explain, refit=refit)
    state = m.prepare(params, train)
    S = m.score(params, state, train, test)
    if refit is None:  # by hand, one pair at a time
        (x, y), (xt, yt) = train, test
        ref = torch.empty_like(S)
        for i in range(n):
            s_i = head(params, feat(params, (x[i], y[i]))).detach().requires_grad_(True)
            (ds,) = torch.autograd.grad(bce(s_i, y[i]), s_i)
            alpha = -ds[0] / (2 * l2 * n)
            for j in range(xt.shape[0]):
                h_j = feat(params, (xt[j], yt[j]))
                c = yt[j] if explain == "label" else (head(params, h_j)[0] > 0).long()
                ref[i, j] = (2 * c - 1) * alpha * (feat(params, (x[i], y[i])) @ h_j)
        _close(S, ref)
    c_self = train[1] if explain == "label" else None
    diag = m.self_score(params, state, train)
    _close(diag, m.score(params, state, train, train).diagonal())
    if refit is None and c_self is not None:
        assert bool((diag > 0).all())  # each point supports its own label
    if refit == "labels":  # the fitted head is stationary: the theorem holds on the test logit
        from dattri_fn.attribute.representer import fit_head

        h_train = torch.stack([feat(params, (a, b)) for a, b in zip(*train, strict=True)])
        fitted = fit_head(head, bce, params, h_train, train[1], l2=l2)
        xt, yt = test
        s_t = torch.stack([head(fitted, feat(params, (a, b)))[0] for a, b in zip(xt, yt,
                                                                                strict=True)])
        c = yt if explain == "label" else torch.stack(
            [(head(params, feat(params, (a, b)))[0] > 0).long() for a, b in zip(xt, yt,
                                                                               strict=True)])
        # fit_head stops at |grad| <= 1e-7 max(1, |grad_0|): W* is then within |grad| / (2 l2)
        _close(S.sum(0), (2 * c - 1) * s_t, tol=1e-5)


def test_binary_one_logit_errors(device):
    """One logit: labels outside {0, 1} are refused naming the argument, classes in [0, 2)."""
    params, feat, head, bce, train = _binary(0, 5, device)
    m = representer(feat, head, bce, l2=0.1)
    state = m.prepare(params, train)
    with pytest.raises(ValueError, match=r"representer.score\(test=...\): expected classes in "
                                         r"\[0, 2\)"):
        m.score(params, state, None, (train[0], train[1] + 2))
    bad = m.prepare(params, (train[0], train[1] * 0 + 3))
    with pytest.raises(ValueError, match=r"representer.self_score\(train=...\): expected "
                                         r"classes in \[0, 2\)"):
        m.self_score(params, bad, None)


def test_representer_scores_and_self_scores_from_a_feature_store(tmp_path):
    """s_ij = alpha_i[c_j] <h_i, h_j> from stored rows [h_i | alpha_i]: score(record_store) and
    score(open_store) equal score(state) to 1e-12 (per-shard products: the state's is one
    matmul), self_score(record_store) and self_score(open_store) equal self_score(state) bit for
    bit; the opened store reads no training data; a store under another state, or a recording
    of another row count, is refused by name."""
    from dattri_fn.store import open_store, record_store

    params, feat, head = _model(2, "cpu")
    train, test = _data(11, 3, "cpu"), _data(4, 4, "cpu")
    batches = _split(train, [4, 8])
    m = representer(feat, head, F.cross_entropy, l2=0.1, refit="predictions")
    state = m.prepare(params, train)
    S, diag = m.score(params, state, None, test), m.self_score(params, state, None)
    cfg = {"method": "representer"}
    rec = record_store(tmp_path, batches, params=params, config=cfg, block_rows=5)
    _close(m.score(params, state, rec, test), S)
    torch.testing.assert_close(m.self_score(params, state, rec), diag, rtol=0, atol=0)
    store = open_store(tmp_path, params=params, config=cfg, block_rows=5)
    _close(m.score(params, state, store, test), S)
    top = m.score(params, state, store, test, top_k=3)
    _close(top.values, S.topk(3, dim=0).values)
    torch.testing.assert_close(m.self_score(params, state, store), diag, rtol=0, atol=0)
    other = representer(feat, head, F.cross_entropy, l2=0.2).prepare(params, train)
    with pytest.raises(ValueError, match=r"representer\.score\(state=...\): expected the state the "
                                         r"store at .* was written under"):
        m.score(params, other, store, test)
    with pytest.raises(ValueError, match=r"representer\.self_score\(state=...\)"):
        m.self_score(params, other, store)
    with pytest.raises(ValueError, match=r"representer\.score\(train=...\): expected the 11 "
                                         r"training examples the state was prepared on, got 8"):
        m.score(params, state, record_store(tmp_path / "short", batches[:2], params=params), test)
    with pytest.raises(ValueError, match=r"representer\.score\(train=...\): expected the 11 "
                                         r"training examples the state was prepared on, got more"):
        m.score(params, state, record_store(tmp_path / "long", batches + batches[:1],
                                            params=params), test)


@given(seed=seeds, cond=st.sampled_from([10.0, 100.0]))
def test_lbfgs_solves_a_quadratic(seed, cond):
    """_lbfgs on f(x) = x^T A x / 2 - b^T x (A symmetric, eigenvalues in [1, cond], P = 40,
    history 5 so the memory wraps) stops with max|grad| <= 1e-9 and |x - A^-1 b| <= |grad|
    (lambda_min = 1); with a budget of 8 steps it returns the 8th iterate's gradient."""
    from dattri_fn.attribute.representer import _lbfgs

    g = _gen(seed)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))[0]
    A = Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), 40, dtype=F64)) @ Q.T
    A = (A + A.T) / 2  # f's gradient is then exactly A x - b
    b = torch.randn(40, generator=g, dtype=F64)

    def value_grad(x):
        return 0.5 * x @ A @ x - b @ x, A @ x - b

    x0 = torch.zeros(40, dtype=F64)
    x, grad = _lbfgs(value_grad, x0, *value_grad(x0), 1e-9, 2000, history=5)
    assert float(grad.abs().max()) <= 1e-9
    torch.testing.assert_close(grad, A @ x - b, rtol=0, atol=1e-14)
    assert float((x - torch.linalg.solve(A, b)).norm()) <= float(grad.norm()) * 1.01 + 1e-14
    x8, grad8 = _lbfgs(value_grad, x0, *value_grad(x0), 1e-9, 8, history=5)
    torch.testing.assert_close(grad8, A @ x8 - b, rtol=0, atol=1e-14)
    assert float(grad8.abs().max()) > 1e-9


def _head_problem(seed, n, K=4, Fdim=5, soft=False):
    g = _gen(seed)
    H = torch.randn(n, Fdim, generator=g, dtype=F64)
    W0 = torch.randn(K, Fdim, generator=g, dtype=F64)
    targets = (torch.softmax(torch.randn(n, K, generator=g, dtype=F64), -1) if soft
               else torch.randint(0, K, (n,), generator=g))
    return H, {"W": W0}, targets


def test_closed_form_path_is_taken_only_for_a_linear_softmax_head():
    """_linear_softmax recognises W h + cross-entropy (labels or probabilities, any batch
    reduction of one row) and returns None for a nonlinear head, another loss, a head with a
    separate bias, or one logit: those keep the generic vmapped objective."""
    from dattri_fn.attribute.representer_fit import _linear_softmax

    def recognised(head, loss, params, H, t):
        h, tt = H, t.to(F64) if t.is_floating_point() else t
        keys = [k for k in params if k != "body"]
        return _linear_softmax(head, loss, {}, keys, params, h, tt, 0.1) is not None

    H, params, y = _head_problem(0, 12)
    _, _, soft = _head_problem(0, 12, soft=True)
    ce_row = lambda z, t: F.cross_entropy(z[None], t[None])  # noqa: E731 (the recipe's form)
    lin = lambda p, h: p["W"] @ h  # noqa: E731
    assert recognised(lin, F.cross_entropy, params, H, y)
    assert recognised(lin, ce_row, params, H, soft)
    assert recognised(lambda p, h: F.linear(h, p["W"]), F.cross_entropy, params, H, y)
    assert not recognised(lambda p, h: torch.tanh(p["W"] @ h), F.cross_entropy, params, H, y)
    smooth = lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1)  # noqa: E731
    assert not recognised(lin, smooth, params, H, y)
    assert not recognised(lin, lambda z, t: ((z - F.one_hot(t, 4)) ** 2).sum(), params, H, y)
    with_b = {"W": params["W"], "b": torch.zeros(4, dtype=F64)}
    assert not recognised(lambda p, h: p["W"] @ h + p["b"], F.cross_entropy, with_b, H, y)
    one = {"W": params["W"][:1]}
    bce = lambda z, t: F.binary_cross_entropy_with_logits(z[0], t.to(F64))  # noqa: E731
    assert not recognised(lin, bce, one, H, (y > 1).long())


@given(seed=seeds, n=st.integers(3, 25), l2=st.sampled_from([1e-3, 1e-2, 0.3]),
       soft=st.booleans())
def test_closed_form_fit_matches_the_generic_fit(monkeypatch, seed, n, l2, soft):
    """The closed-form Newton-CG fit and the generic vmapped L-BFGS fit both stop at
    max|grad f| <= 1e-7 max(1, max|grad f(W0)|) (grad f by autograd), so, f being 2 l2-strongly
    convex, |W_closed - W_generic| <= (|grad_closed| + |grad_generic|) / (2 l2)."""
    import dattri_fn.attribute.representer_fit as RF

    H, params, t = _head_problem(seed, n, soft=soft)
    head = lambda p, h: p["W"] @ h  # noqa: E731
    grad_fn = torch.func.grad(lambda w: F.cross_entropy(H @ w.T, t) + l2 * (w * w).sum())
    bound = 1e-7 * max(1.0, float(grad_fn(params["W"]).abs().max()))
    closed = fit_head(head, F.cross_entropy, params, H, t, l2=l2)["W"]
    with monkeypatch.context() as mp:
        mp.setattr(RF, "_linear_softmax", lambda *a: None)
        generic = fit_head(head, F.cross_entropy, params, H, t, l2=l2)["W"]
    g_c, g_g = grad_fn(closed), grad_fn(generic)
    assert float(g_c.abs().max()) <= bound and float(g_g.abs().max()) <= bound
    slack = (float(g_c.norm()) + float(g_g.norm())) / (2 * l2)
    assert float((closed - generic).norm()) <= slack * 1.01 + 1e-13


@given(seed=seeds, n=st.integers(3, 30), l2=st.sampled_from([1e-3, 0.05]))
def test_refit_row_sums_equal_the_logits_up_to_the_stationarity_residual(monkeypatch, seed, n, l2):
    """For the fitted head W (any W): sum_i alpha_i <h_i, h_t> = W h_t - grad f(W) h_t / (2 l2)
    exactly (alpha_i = -dL_i/dz / (2 l2 n)), so RPS's row sums miss the test logit by
    (grad f h_t)[c] / (2 l2), at most |grad f| |h_t| / (2 l2) with fit_head's gradient bound."""
    R = importlib.import_module("dattri_fn.attribute.representer")

    H, params, _ = _head_problem(seed, n + 3)
    h_tr, h_te = H[:n], H[n:]
    y = torch.randint(0, 4, (n,), generator=_gen(seed + 1))
    fits = []

    def fit_and_keep(*args, **kwargs):  # the head prepare fits, and its targets
        fits.append((fit_head(*args, **kwargs), args[4]))
        return fits[-1][0]

    feat = lambda p, ex: ex[0]  # noqa: E731
    head = lambda p, h: p["W"] @ h  # noqa: E731
    m = representer(feat, head, F.cross_entropy, l2=l2, refit="predictions",
                    explain="prediction")
    with monkeypatch.context() as mp:
        mp.setattr(R, "fit_head", fit_and_keep)
        S = m.score(params, m.prepare(params, (h_tr, y)), None, (h_te,))
    (fitted, targets), = fits
    W = fitted["W"]

    def grad_f(w):
        return torch.func.grad(lambda v: F.cross_entropy(h_tr @ v.T, targets)
                               + l2 * (v * v).sum())(w)

    grad = grad_f(W)
    c = (h_te @ params["W"].T).argmax(1)  # explained classes: the model's predictions
    logit = (h_te @ W.T).gather(1, c[:, None]).squeeze(1)
    _close(S.sum(0), logit - (h_te @ grad.T / (2 * l2)).gather(1, c[:, None]).squeeze(1), 1e-10)
    assert float(grad.abs().max()) <= 1e-7 * max(1.0, float(grad_f(params["W"]).abs().max()))
    bound = grad.norm() * h_te.norm(dim=1) / (2 * l2)
    assert bool(((S.sum(0) - logit).abs() <= bound * 1.01 + 1e-12).all())


def test_prepare_refuses_an_overflowing_example_by_name():
    """Logits that overflow on one example made a NaN alpha: prepare accepted it and self_score
    refused the state without naming NaN or the data (stop 24). Refused at prepare, naming train
    and the example."""
    params, _, _ = _model(0, "cpu")
    x, y = _data(6, 1, "cpu", dim=4)
    x[2] *= 1e10  # its logits 1e310: inf in float64, so a NaN gradient of the loss
    feat = lambda p, ex: ex[0]
    head = lambda p, h: (p["2.weight"] @ h) * 1e300
    m = representer(feat, head, F.cross_entropy, l2=0.1)
    with pytest.raises(ValueError, match=r"representer.prepare\(train=...\): expected examples "
                                         r"whose features and output gradients are finite, got "
                                         r"NaN or inf in the output gradients \(alpha\) of "
                                         r"example 2"):
        m.prepare(params, (x, y))
    x[2] /= 1e10
    assert torch.isfinite(m.prepare(params, (x, y)).alpha).all()
