"""Influence functions: closed forms, every backend against IF-explicit, LOO retraining, streaming."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute import InfluenceState, influence
from problems import PROBLEMS, dense_hessian, dense_per_sample_grads

D = torch.float64


def _closed_form(params, loss, train, test, damping, fisher=False):
    G, Gt = dense_per_sample_grads(params, loss, train), dense_per_sample_grads(params, loss, test)
    C = G.T @ G / G.shape[0] if fisher else dense_hessian(params, loss, train)
    A = C + damping * torch.eye(C.shape[0], dtype=D)
    return G @ torch.linalg.solve(A, Gt.T)


def _split(batch, cuts):
    x, y = batch
    edges = [0, *cuts, x.shape[0]]
    return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


@given(st.sampled_from(["linear", "logistic"]), st.integers(3, 10), st.integers(0, 2**16),
       st.sampled_from([1e-3, 0.1, 1.0]))
def test_explicit_equals_closed_form(name, n, seed, damping):
    """IF-explicit == G_train (H + damping I)^-1 G_test^T with H from torch.func.hessian."""
    params, loss, train = PROBLEMS[name](n=n, seed=seed)
    _, _, test = PROBLEMS[name](n=3, seed=seed + 7)
    m = influence(loss, solver="explicit", damping=damping)
    S = m.score(params, m.prepare(params, train), train, test)
    torch.testing.assert_close(S, _closed_form(params, loss, train, test, damping),
                               rtol=1e-9, atol=1e-10)


BACKENDS = {
    "cg": dict(rtol=1e-12, max_iter=200),
    "arnoldi": dict(rank=31, max_iter=31),
}


@pytest.mark.slow
@given(st.sampled_from(sorted(BACKENDS)), st.sampled_from(["linear", "logistic", "mlp"]),
       st.integers(0, 2**16))
def test_converged_backends_match_explicit(solver, name, seed):
    """CG (rtol 1e-12) and Arnoldi (rank = P) == IF-explicit to 1e-7 relative, any batching."""
    params, loss, train = PROBLEMS[name](n=8, seed=seed)
    _, _, test = PROBLEMS[name](n=3, seed=seed + 7)
    damping = 2.0  # makes the MLP's indefinite Hessian (min eig ~ -0.9) + damping positive definite
    P = sum(v.numel() for v in params.values())
    opts = dict(BACKENDS[solver])
    if solver == "arnoldi":
        opts.update(rank=P, max_iter=P)
    ref_m = influence(loss, solver="explicit", damping=damping)
    ref = ref_m.score(params, ref_m.prepare(params, train), train, test)
    m = influence(loss, solver=solver, damping=damping, **opts)
    batches = _split(train, [3, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S = m.score(params, m.prepare(params, batches), batches, test)
    torch.testing.assert_close(S, ref, rtol=1e-7, atol=1e-9 * ref.abs().max())


@pytest.mark.slow
def test_lissa_matches_explicit():
    """LiSSA, full batch, scale > lambda_max + damping, depth 2000: within 1e-6 relative."""
    params, loss, train = PROBLEMS["linear"](n=10, seed=1)
    _, _, test = PROBLEMS["linear"](n=3, seed=2)
    lam_max = torch.linalg.eigvalsh(dense_hessian(params, loss, train))[-1]
    ref_m = influence(loss, solver="explicit", damping=0.1)
    ref = ref_m.score(params, ref_m.prepare(params, train), train, test)
    m = influence(loss, solver="lissa", damping=0.1, scale=float(lam_max) * 1.5 + 0.1, depth=2000)
    S = m.score(params, m.prepare(params, _split(train, [4])), train, test)
    torch.testing.assert_close(S, ref, rtol=1e-6, atol=1e-8)


def test_many_batches_equal_one_batch_for_cached_curvature():
    """The curvature averages over batches: 5 training batches give the 1-batch scores exactly.

    (dattri 0.3.0's cached IF sums per-batch inverses and scales with the number of batches.)
    """
    params, loss, train = PROBLEMS["logistic"](n=10, seed=3)
    _, _, test = PROBLEMS["logistic"](n=2, seed=4)
    for solver, opts in [("explicit", {}), ("cg", dict(rtol=1e-12)), ("datainf", {})]:
        m = influence(loss, solver=solver, damping=0.1, **opts)
        one = m.score(params, m.prepare(params, train), train, test)
        batches = _split(train, [2, 4, 6, 8])
        five = m.score(params, m.prepare(params, batches), batches, test)
        torch.testing.assert_close(five, one, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@given(st.sampled_from(["explicit", "cg", "datainf"]), st.integers(0, 2**16),
       st.lists(st.integers(1, 8), max_size=3, unique=True))
def test_self_influence_is_diagonal(solver, seed, cuts):
    """self_score == diag(score(train, train)) for any batching of train."""
    params, loss, train = PROBLEMS["mlp"](n=9, seed=seed)
    m = influence(loss, solver=solver, damping=1.0, **({"rtol": 1e-12} if solver == "cg" else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = m.prepare(params, train)
        diag = m.self_score(params, state, _split(train, sorted(cuts)))
        full = m.score(params, state, train, train)
    torch.testing.assert_close(diag, torch.diagonal(full), rtol=1e-8, atol=1e-10)


def test_topk_equals_topk_of_full_matrix():
    """top_k streaming == torch.topk(full, k, dim=0)."""
    params, loss, train = PROBLEMS["logistic"](n=12, seed=0)
    _, _, test = PROBLEMS["logistic"](n=4, seed=1)
    m = influence(loss, solver="explicit", damping=0.1)
    state = m.prepare(params, train)
    full = m.score(params, state, train, test)
    top = m.score(params, state, _split(train, [5, 7]), test, top_k=3)
    torch.testing.assert_close(top.values, torch.topk(full, 3, dim=0).values, rtol=0, atol=1e-13)


def _fit_logistic(x, y, l2, init=None):
    """Minimise mean CE + l2/2 |W|^2 by LBFGS to a tight gradient tolerance (float64)."""
    W = (init.clone() if init is not None else torch.zeros(3, x.shape[1] + 1, dtype=D)).requires_grad_()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = F.cross_entropy(xa @ W.T, y) + 0.5 * l2 * (W ** 2).sum()
        obj.backward()
        return obj

    opt.step(closure)
    return W.detach()


def test_loo_correlation_logistic_regression():
    """IF-explicit vs actual leave-one-out retraining on logistic regression: Pearson > 0.9.

    n * (L_test(w_-i) - L_test(w)) ~ score_i: removing a proponent raises the test loss.
    """
    g = torch.Generator().manual_seed(0)
    n, dim, l2 = 40, 4, 1e-2
    x = torch.randn(n, dim, generator=g, dtype=D)
    y = (x[:, :3] + 0.5 * torch.randn(n, 3, generator=g, dtype=D)).argmax(1)
    xt, yt = x[:1] + 0.3, y[:1]

    def loss(p, ex):
        xi, yi = ex
        logits = p["W"] @ torch.cat([xi, xi.new_ones(1)])
        return F.cross_entropy(logits[None], yi[None]) + 0.5 * l2 * (p["W"] ** 2).sum()

    W = _fit_logistic(x, y, l2)
    params = {"W": W}
    m = influence(loss, solver="explicit", damping=1e-8)
    scores = m.score(params, m.prepare(params, (x, y)), (x, y), (xt, yt))[:, 0]
    test_loss = lambda W_: F.cross_entropy(torch.cat([xt, xt.new_ones(1, 1)], 1) @ W_.T, yt)
    base = test_loss(W)
    keep = torch.ones(n, dtype=torch.bool)
    diffs = []
    for i in range(n):
        keep[i] = False
        diffs.append(n * (test_loss(_fit_logistic(x[keep], y[keep], l2, init=W)) - base))
        keep[i] = True
    diffs = torch.stack(diffs)
    corr = torch.corrcoef(torch.stack([scores, diffs]))[0, 1]
    assert corr > 0.9, float(corr)


def test_ridge_matches_exact_leave_one_out():
    """Ridge: IF (test side = data loss, no L2 term) predicts the exact LOO change of test loss
    (closed-form refit) with Pearson > 0.95; the gap is the leverage factor 1/(1 - h_ii)."""
    g = torch.Generator().manual_seed(1)
    n, dim, lam = 30, 5, 0.1
    x = torch.randn(n, dim, generator=g, dtype=D)
    y = x @ torch.randn(dim, generator=g, dtype=D) + 0.3 * torch.randn(n, generator=g, dtype=D)
    xt, yt = torch.randn(1, dim, generator=g, dtype=D), torch.randn(1, generator=g, dtype=D)

    def fit(xs, ys):  # argmin (1/m) sum 0.5 r^2 + lam/2 |w|^2
        m_ = xs.shape[0]
        return torch.linalg.solve(xs.T @ xs / m_ + lam * torch.eye(dim, dtype=D), xs.T @ ys / m_)

    def loss(p, ex):
        return 0.5 * (ex[0] @ p["w"] - ex[1]) ** 2 + 0.5 * lam * (p["w"] ** 2).sum()

    w = fit(x, y)
    data_loss = lambda p, ex: 0.5 * (ex[0] @ p["w"] - ex[1]) ** 2
    m = influence(loss, solver="explicit", damping=1e-10, target=data_loss)
    scores = m.score({"w": w}, m.prepare({"w": w}, (x, y)), (x, y), (xt, yt))[:, 0]
    tl = lambda w_: 0.5 * (xt[0] @ w_ - yt[0]) ** 2
    keep = torch.ones(n, dtype=torch.bool)
    diffs = []
    for i in range(n):
        keep[i] = False
        diffs.append(n * (tl(fit(x[keep], y[keep])) - tl(w)))
        keep[i] = True
    corr = torch.corrcoef(torch.stack([scores, torch.stack(diffs)]))[0, 1]
    assert corr > 0.95, float(corr)


def _linear_model(seed, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2, bias=bias)).double()


def test_kfac_and_ekfac_exact_for_one_example():
    """One Linear layer, one training example: Fisher = (g g^T) kron (a a^T) is exactly Kronecker,
    so IF-kfac == IF-ekfac == IF-explicit with the empirical Fisher."""
    net = _linear_model(0)
    fm = functional_model(net, lambda out, t: 0.5 * ((out - t) ** 2).sum())
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(1, 3, generator=g, dtype=D), torch.randn(1, 2, generator=g, dtype=D))
    test = (torch.randn(4, 3, generator=g, dtype=D), torch.randn(4, 2, generator=g, dtype=D))
    ref_m = influence(fm.loss, solver="explicit", damping=0.3, curvature="fisher")
    ref = ref_m.score(fm.params, ref_m.prepare(fm.params, train), train, test)
    for solver in ("kfac", "ekfac"):
        m = influence(fm.loss, solver=solver, damping=0.3, model=fm)
        S = m.score(fm.params, m.prepare(fm.params, train), train, test)
        torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-11)


def test_ekfac_close_to_fisher_if_on_mlp():
    """On an MLP, IF-ekfac scores correlate with IF-explicit(empirical Fisher) above 0.9."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (30,), generator=g)
    ref_m = influence(fm.loss, solver="explicit", damping=0.05, curvature="fisher")
    ref = ref_m.score(fm.params, ref_m.prepare(fm.params, (x, y)), (x, y), (x[:5], y[:5]))
    m = influence(fm.loss, solver="ekfac", damping=0.05, model=fm)
    S = m.score(fm.params, m.prepare(fm.params, _split((x, y), [10, 20])), (x, y), (x[:5], y[:5]))
    corr = torch.corrcoef(torch.stack([S.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.9, float(corr)


def test_indefinite_mlp_never_nan():
    """MLP Hessian is indefinite: explicit/arnoldi with tiny damping warn and stay finite."""
    params, loss, train = PROBLEMS["mlp"](n=16, seed=0)
    assert torch.linalg.eigvalsh(dense_hessian(params, loss, train))[0] < 0
    for solver, opts in [("explicit", {}), ("arnoldi", dict(rank=10, max_iter=20))]:
        m = influence(loss, solver=solver, damping=1e-6, **opts)
        with pytest.warns(RuntimeWarning, match="damping"):
            state = m.prepare(params, train)
        assert torch.isfinite(m.score(params, state, train, train)).all()


def test_sign_duplicate_is_proponent():
    """A training duplicate of the test point has a positive score and ranks first."""
    params, loss, (x, y) = PROBLEMS["logistic"](n=12, seed=2)
    m = influence(loss, solver="explicit", damping=0.1)
    s = m.score(params, m.prepare(params, (x, y)), (x, y), (x[5:6], y[5:6]))[:, 0]
    assert s[5] > 0 and int(s.argmax()) == 5


def test_bad_inputs():
    """Unknown solver/curvature, non-positive damping, K-FAC without model, wrong state."""
    params, loss, train = PROBLEMS["linear"](n=4)
    with pytest.raises(ValueError, match=r"influence\(solver=...\): expected one of"):
        influence(loss, solver="newton")
    with pytest.raises(ValueError, match=r"influence\(damping=...\): expected a finite number > 0"):
        influence(loss, damping=0.0)
    with pytest.raises(ValueError, match=r"influence\(curvature=...\)"):
        influence(loss, curvature="ggn")
    with pytest.raises(ValueError, match=r"influence\(model=...\)"):
        influence(loss, solver="kfac")
    m = influence(loss, solver="explicit")
    with pytest.raises(TypeError, match=r"if_explicit\(state=...\): expected the InfluenceState"):
        m.score(params, None, train, train)
    state = m.prepare(params, train)
    assert isinstance(state, InfluenceState)
    with pytest.raises(ValueError, match=r"if_explicit\(test=...\)"):
        m.score(params, state, train, (train[0], train[1][:1]))
    assert per_sample_grad(loss, params, train).shape == (4, 5)


def test_test_gradients_computed_once_per_test_point():
    """The test-side function runs once per test batch, not once per (train, test) batch pair."""
    params, loss, train = PROBLEMS["logistic"](n=12, seed=0)
    calls = []

    def target(p, ex):
        calls.append(1)
        return loss(p, ex)

    m = influence(loss, solver="cg", damping=0.1, target=target)
    state = m.prepare(params, train)
    m.score(params, state, _split(train, [3, 6, 9]), train)
    assert len(calls) == 1  # vmap traces the python function once for the single test batch


@given(st.sampled_from(["explicit", "cg", "datainf", "ekfac"]), st.integers(0, 2**16),
       st.floats(0.0, 0.5), st.sampled_from([[], [5], [3, 11]]))
def test_functional_model_with_l2_equals_plain_loss(solver, seed, l2, cuts):
    """influence(fm, l2=c) == influence(loss + c|p|^2, target=loss): scores and self-scores.

    The FunctionalModel path takes Linear gradients from one batched backward; the plain path
    is vmap(grad) of the regularised loss (float64, 1e-10)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g)
    train, test = _split((x, y), cuts), (x[:4] + 0.1, y[:4])
    reg = lambda p, ex: fm.loss(p, ex) + l2 * sum((v * v).sum() for v in p.values())
    opts = dict(max_iter=200, rtol=1e-12) if solver == "cg" else {}
    ref_m = influence(reg, solver=solver, damping=0.2, target=fm.loss, model=fm,
                      curvature="fisher", **opts)
    m = influence(fm, l2=l2, solver=solver, damping=0.2, curvature="fisher", **opts)
    ref_state, state = ref_m.prepare(fm.params, train), m.prepare(fm.params, train)
    torch.testing.assert_close(m.score(fm.params, state, train, test),
                               ref_m.score(fm.params, ref_state, train, test),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.self_score(fm.params, state, train),
                               ref_m.self_score(fm.params, ref_state, train),
                               rtol=1e-10, atol=1e-12)


def test_functional_model_hessian_includes_l2():
    """With curvature='hessian', influence(fm, l2=c) inverts the Hessian of loss + c|p|^2."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 2)).double()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 3, generator=g, dtype=D), torch.randint(0, 2, (10,), generator=g)
    l2, damping = 0.3, 0.1
    reg = lambda p, ex: fm.loss(p, ex) + l2 * sum((v * v).sum() for v in p.values())
    H = dense_hessian(fm.params, reg, (x, y))
    G = dense_per_sample_grads(fm.params, reg, (x, y))
    T = dense_per_sample_grads(fm.params, fm.loss, (x[:3], y[:3]))
    ref = G @ torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=D), T.T)
    m = influence(fm, l2=l2, solver="explicit", damping=damping, curvature="hessian")
    S = m.score(fm.params, m.prepare(fm.params, (x, y)), (x, y), (x[:3], y[:3]))
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-11)


def test_functional_model_errors():
    """Negative l2, a model without loss_fn, and params with other keys name the argument."""
    net = nn.Sequential(nn.Linear(3, 2)).double()
    fm = functional_model(net, F.cross_entropy)
    with pytest.raises(ValueError, match=r"influence\(l2=...\): expected a finite number >= 0"):
        influence(fm, l2=-1.0)
    with pytest.raises(ValueError, match=r"influence\(loss=...\): expected a FunctionalModel "
                                         r"built with a loss_fn"):
        influence(functional_model(net))
    m = influence(fm, solver="cg")
    x, y = torch.randn(4, 3, dtype=D), torch.randint(0, 2, (4,))
    bad = {"w": fm.params["0.weight"], "b": fm.params["0.bias"]}
    with pytest.raises(ValueError, match=r"if_cg\(params=...\): expected the keys"):
        m.score(bad, m.prepare(fm.params, (x, y)), (x, y), (x, y))


def test_kfac_retraces_after_a_submodule_is_swapped():
    """influence(fm, solver='ekfac') traces once, and again after a layer is replaced in place:
    its factors then equal a fresh method's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 3, generator=g, dtype=D), torch.randint(0, 2, (8,), generator=g))
    m = influence(fm, solver="ekfac", damping=0.1)
    m.prepare(fm.params, data)
    net[1] = nn.Sigmoid()
    got = m.prepare(fm.params, data).factors
    ref = influence(functional_model(net, F.cross_entropy), solver="ekfac",
                    damping=0.1).prepare(fm.params, data).factors
    for k in ref.Lambda:
        torch.testing.assert_close(got.Lambda[k], ref.Lambda[k], rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", ["explicit", "datainf", "ekfac", "cg"])
def test_batch_rows_merges_batches_without_changing_scores(solver):
    """influence(..., batch_rows=r) == batch_rows=None for score, top_k and self_score (1e-12):
    merging consecutive train/test batches only changes the calls."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(14, 4, generator=g, dtype=D), torch.randint(0, 3, (14,), generator=g)
    train, test = _split((x, y), [3, 4, 9, 10]), _split((x[:5] + 0.1, y[:5]), [2])
    opts = dict(curvature="fisher", damping=0.3)
    if solver == "cg":
        opts.update(max_iter=100, rtol=1e-12)
    ref, got = influence(fm, solver=solver, **opts), influence(fm, solver=solver, batch_rows=4,
                                                              **opts)
    s_ref, s_got = ref.prepare(fm.params, train), got.prepare(fm.params, train)
    torch.testing.assert_close(got.score(fm.params, s_got, train, test),
                               ref.score(fm.params, s_ref, train, test), rtol=1e-12, atol=1e-12)
    top_got = got.score(fm.params, s_got, train, test, top_k=3)
    top_ref = ref.score(fm.params, s_ref, train, test, top_k=3)
    assert torch.equal(top_got.indices, top_ref.indices)
    torch.testing.assert_close(got.self_score(fm.params, s_got, train),
                               ref.self_score(fm.params, s_ref, train), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"influence\(batch_rows=...\): expected an int >= 1"):
        influence(fm, batch_rows=0)


@pytest.mark.parametrize("solver, curvature", [("cg", "hessian"), ("cg", None),
                                               ("explicit", "hessian"), ("datainf", None)])
def test_prepare_names_train_for_empty_or_one_shot_data(solver, curvature):
    """prepare([]) and prepare(<generator>) name influence's own `train`, never an inner call
    (hvp / linear_gnvp / linear_hessian) (issue 15)."""
    net = nn.Sequential(nn.Linear(3, 2)).double()
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(4, 3, dtype=D), torch.randint(0, 2, (4,))
    m = influence(fm, solver=solver, curvature=curvature)
    with pytest.raises(ValueError, match=rf"if_{solver}\(train=...\): expected at least one batch"):
        m.prepare(fm.params, [])
    with pytest.raises(TypeError, match=rf"if_{solver}\(train=...\): expected a re-iterable"):
        m.prepare(fm.params, (b for b in [(x, y)]))


def test_data_in_another_dtype_than_the_model_is_named():
    """float64 data for a float32 model: a TypeError naming the method and the argument the
    data came through (train or test), not torch's matmul message alone (issue 15)."""
    from dattri_fn.attribute import grad_dot

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    fm = functional_model(net, F.cross_entropy)
    x, y = torch.randn(6, 3, dtype=D), torch.randint(0, 2, (6,))
    with pytest.raises(TypeError, match=r"grad_dot\(test=...\): expected floating tensors in the "
                                        r"dtype of the model's parameters, got data of "
                                        r"\['torch.float64'\]"):
        grad_dot(fm).score(fm.params, (), (x, y), (x, y))
    with pytest.warns(RuntimeWarning), pytest.raises(TypeError, match=r"if_cg\(train=...\)"):
        influence(fm, solver="cg").prepare(fm.params, (x, y))


def test_other_params_and_half_precision_are_named():
    """Scoring with another model's params names params (not ihvp_explicit(V=...)); a float16
    operator is refused by ihvp_explicit by dtype (issue 15)."""
    from dattri_fn import ihvp_explicit

    fm = functional_model(nn.Sequential(nn.Linear(3, 2)).double(), F.cross_entropy)
    other = functional_model(nn.Sequential(nn.Linear(4, 2)).double(), F.cross_entropy)
    x, y = torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,))
    m = influence(fm, solver="explicit", damping=0.1)
    state = m.prepare(fm.params, (x, y))
    x4 = torch.randn(5, 4, dtype=D)
    with pytest.raises(ValueError, match=r"if_explicit\(params=...\): expected params of the "
                                         r"model the state was prepared with \(P = 8\), got P = 10"):
        m.score(other.params, state, (x4, y), (x4[:2], y[:2]))
    with pytest.raises(TypeError, match=r"ihvp_explicit\(op=...\): expected a float32 or float64 "
                                        r"operator .* got torch.float16"):
        ihvp_explicit(torch.eye(3, dtype=torch.float16), damping=0.1)


def _checkpoints(name, seed, C):
    """C parameter sets of one problem (different seeds), sharing one training/test set."""
    ps = [PROBLEMS[name](n=6, seed=seed + 11 * c)[0] for c in range(C)]
    _, loss, train = PROBLEMS[name](n=6, seed=seed)
    _, _, test = PROBLEMS[name](n=3, seed=seed + 7)
    return ps, loss, train, test


@settings(max_examples=10)
@given(st.sampled_from(["linear", "logistic"]), st.sampled_from(["explicit", "cg"]),
       st.integers(1, 3), st.integers(0, 2**16), st.sampled_from([None, "l"]))
def test_checkpoint_list_is_mean_of_single_runs(name, solver, C, seed, relatif):
    """score([p_1..p_C]) == (1/C) sum_c score(p_c), and self_score likewise (RelatIF too)."""
    ps, loss, train, test = _checkpoints(name, seed, C)
    opts = dict(rtol=1e-13, max_iter=300) if solver == "cg" else {}
    m = influence(loss, solver=solver, damping=0.5, relatif=relatif, **opts)
    state = m.prepare(ps, [train])
    assert len(state.states) == C
    singles = [m.prepare(p, train) for p in ps]
    ref = torch.stack([m.score(p, s, train, test) for p, s in zip(ps, singles, strict=True)]).mean(0)
    ref_self = torch.stack([m.self_score(p, s, train) for p, s in zip(ps, singles, strict=True)]).mean(0)
    torch.testing.assert_close(m.score(ps, state, train, test), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.self_score(ps, state, train), ref_self, rtol=1e-10, atol=1e-12)
    top = m.score(ps, state, train, test, top_k=2)
    torch.testing.assert_close(top.values, ref.topk(2, dim=0).values, rtol=1e-10, atol=1e-12)


def test_checkpoint_list_errors():
    """A list state with one dict, a dict state with a list, a wrong count: errors naming them."""
    ps, loss, train, test = _checkpoints("linear", 0, 2)
    m = influence(loss, solver="explicit", damping=0.1)
    ens, one = m.prepare(ps, train), m.prepare(ps[0], train)
    with pytest.raises(TypeError, match=r"if_explicit\(params=...\): expected the list of 2 "):
        m.score(ps[0], ens, train, test)
    with pytest.raises(TypeError, match=r"if_explicit\(state=...\): expected the "
                                        r"InfluenceEnsembleState"):
        m.score(ps, one, train, test)
    with pytest.raises(ValueError, match=r"if_explicit\(params=...\): expected the 2 checkpoints"):
        m.self_score(ps[:1], ens, train)
    bad = dict(ps[1], w=torch.zeros(7, dtype=D))
    with pytest.raises(ValueError, match=r"if_explicit\(params\[1\]=...\): expected the shapes"):
        m.prepare([ps[0], bad], train)
    with pytest.raises(TypeError, match=r"if_explicit\(params=...\): expected a params dict or"):
        m.prepare("w", train)


def _bce_mlp(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = torch.randint(0, 2, (n,), generator=g)

    def bce(out, target):  # one logit per example: [B, 1] -> [B]
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), target.to(out.dtype))

    return functional_model(net, bce), (x, y)


@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_binary_one_logit_matches_dense(curvature):
    """One-logit BCE model: IF-explicit == G (C + damping I)^-1 G_t^T, C the dense GN / Hessian."""
    fm, (x, y) = _bce_mlp(4)
    train, test = (x, y), (x[:3], y[:3])

    def loss(p, ex):
        s = torch.func.functional_call(fm.module, p, (ex[0][None],))[0, 0]
        return F.binary_cross_entropy_with_logits(s, ex[1].to(D))

    G = dense_per_sample_grads(fm.params, loss, train)
    if curvature == "hessian":
        C = dense_hessian(fm.params, loss, train)
    else:  # J^T sigma'(s) J averaged: the BCE output Hessian is p (1 - p)
        from dattri_fn.tree import ravel

        flat0, unravel = ravel(fm.params)
        J = torch.stack([torch.func.jacrev(lambda f, xi=xi: torch.func.functional_call(
            fm.module, unravel(f), (xi[None],))[0, 0])(flat0) for xi in x])
        s = torch.func.functional_call(fm.module, fm.params, (x,))[:, 0]
        w = torch.sigmoid(s) * torch.sigmoid(-s)
        C = (J.T * w) @ J / x.shape[0]
    ref = G @ torch.linalg.solve(C + 0.5 * torch.eye(C.shape[0], dtype=D), G[:3].T)
    m = influence(fm, solver="explicit", damping=0.5, curvature=curvature)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Hessian of a tanh MLP may be indefinite
        S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("solver", ["ekfac", "datainf", "arnoldi"])
def test_checkpoint_list_with_factored_solvers(solver):
    """EK-FAC / DataInf / Arnoldi on a FunctionalModel: score([p0, p1]) == mean of single runs."""
    g = torch.Generator().manual_seed(9)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    fm = functional_model(net, F.cross_entropy)
    p1 = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=D) for k, v in fm.params.items()}
    x, y = torch.randn(10, 3, generator=g, dtype=D), torch.randint(0, 3, (10,), generator=g)
    train, test = [(x[:6], y[:6]), (x[6:], y[6:])], (x[:3], y[:3])
    opts = dict(rank=8, max_iter=16) if solver == "arnoldi" else {}
    m = influence(fm, solver=solver, damping=0.1, **opts)
    ps = [fm.params, p1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Arnoldi may drop directions of an indefinite part
        S = m.score(ps, m.prepare(ps, train), train, test)
        ref = sum(m.score(p, m.prepare(p, train), train, test) for p in ps) / 2
    torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["cg", "ekfac", "explicit"])
def test_params_of_another_shape_are_named_against_influence(solver):
    """influence(fm).prepare with a params tensor of the wrong shape names if_<solver>(params=...)
    and the key, not an inner forward or factor pass."""
    import torch.nn.functional as F
    from torch import nn

    from dattri_fn import functional_model

    fm = functional_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(),
                          F.cross_entropy)
    bad = {**fm.params, "0.weight": torch.zeros(5, 3, dtype=torch.float64)}
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.raises(ValueError, match=rf"^if_{solver}\(params=...\): expected the model's shape "
                                         r"\[4, 3\] at key '0.weight', got \[5, 3\]"):
        influence(fm, solver=solver, damping=0.1).prepare(bad, (x, y))


def test_method_closes_over_its_config_only_and_the_state_holds_the_capture():
    """The Method's functions close over the validated InfluenceConfig alone (no cache); EK-FAC's
    layer-by-layer scoring runs through state.tap, and a state without it (built by hand)
    scores the same, bit for bit."""
    from dattri_fn.attribute.influence import InfluenceConfig

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    fm = functional_model(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(),
                          F.cross_entropy)
    x, y = torch.randn(9, 4, generator=g, dtype=D), torch.randint(0, 3, (9,), generator=g)
    train, test = _split((x, y), [5]), (x[:3] + 0.1, y[:3])
    m = influence(fm, solver="ekfac", damping=0.1)
    for fn in m[:3]:
        assert [type(c.cell_contents) for c in fn.__closure__] == [InfluenceConfig]
    state = m.prepare(fm.params, train)
    assert state.tap is not None and list(state.tap.layers) == list(state.ihvp.eigen[0])
    S = m.score(fm.params, state, train, test)
    assert torch.equal(S, m.score(fm.params, state._replace(tap=None), train, test))
    assert torch.equal(m.self_score(fm.params, state, train),
                       m.self_score(fm.params, state._replace(tap=None), train))
