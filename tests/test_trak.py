"""TRAK against its closed form built densely: autograd-loop features, torch.linalg.inv kernels."""

import contextlib
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from dattri_fn import io
from dattri_fn.attribute.trak import (
    TRAKState,
    classification_margin,
    classification_margin_loss,
    classification_weight,
    classification_weight_loss,
    gram_of,
    trak,
)
from dattri_fn.model import functional_model
from dattri_fn.transforms.project import KINDS, make_projector
from dattri_fn.tree import num_params
from problems import dense_per_sample_grads, linear_regression, logistic_regression

F64 = torch.float64
seeds = st.integers(0, 2**16)
dampings = st.sampled_from([0.1, 1.0])


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _mlp(seed, device, dim=3, hidden=4, classes=3):
    """A Linear-Tanh-Linear classifier seen through functional_model, weights drawn from seed."""
    net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(F64)
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=F64))
    return functional_model(net.to(device), F.cross_entropy)


def _data(n, seed, device, dim=3, classes=3):
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g, dtype=F64)
    return x.to(device), torch.randint(0, classes, (n,), generator=g).to(device)


def _perturbed(params, seed, scale=0.3):
    g = _gen(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device)
            for k, v in params.items()}


def _split(batch, cuts):
    x, y = batch
    edges = [0, *cuts, x.shape[0]]
    return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _weights(weight_fn, params, batch):
    x, y = batch
    if weight_fn is None:
        return torch.ones(x.shape[0], dtype=F64, device=x.device)
    return torch.stack([weight_fn(params, (x[i], y[i])) for i in range(x.shape[0])])


def _closed_form(ckpts, out, weight_fn, train, test, damping, R=None):
    """(1/C sum_c Phi_c K_c Phi_test_c^T) * (1/C sum_c Q_c), with Phi_c = G_c R_c from autograd.

    ``R`` is one ``[P, d]`` matrix or a list of them, one per checkpoint."""
    feats, qs = [], []
    Rs = R if isinstance(R, list) else [R] * len(ckpts)
    for p, R in zip(ckpts, Rs, strict=True):
        G, Gt = dense_per_sample_grads(p, out, train), dense_per_sample_grads(p, out, test)
        if R is not None:
            G, Gt = G @ R, Gt @ R
        K = torch.linalg.inv(G.T @ G + damping * torch.eye(G.shape[1], dtype=F64,
                                                           device=G.device))
        feats.append(G @ K @ Gt.T)
        qs.append(_weights(weight_fn, p, train))
    return torch.stack(feats).mean(0) * torch.stack(qs).mean(0)[:, None]


def _close(got, ref, tol=1e-10):
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))


@given(seed=seeds, n_train=st.integers(2, 9), n_test=st.integers(1, 4), damping=dampings)
def test_unprojected_equals_dense_closed_form(device, seed, n_train, n_test, damping):
    """proj_dim=None: s = G (G^T G + damping I)^-1 G_test^T * (1 - p_y), G by autograd loops."""
    fm = _mlp(seed, device)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    train, test = _data(n_train, seed + 1, device), _data(n_test, seed + 2, device)
    m = trak(out, weight_fn=w, damping=damping)
    S = m.score(fm.params, m.prepare(fm.params, train), None, test)
    assert S.shape == (n_train, n_test) and S.dtype == F64 and S.device.type == device.type
    _close(S, _closed_form([fm.params], out, w, train, test, damping))


@given(seed=seeds, kind=st.sampled_from(KINDS), proj_dim=st.integers(2, 40), damping=dampings)
def test_projected_equals_closed_form_from_matrix(device, seed, kind, proj_dim, damping):
    """phi = G R with R = make_projector(P, ...).matrix(): TRAK == its dense closed form."""
    fm = _mlp(seed, device)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    train, test = _data(7, seed + 1, device), _data(3, seed + 2, device)
    m = trak(out, weight_fn=w, proj_dim=proj_dim, kind=kind, seed=seed, damping=damping)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    R = make_projector(num_params(fm.params), proj_dim=proj_dim, kind=kind, seed=seed,
                       dtype=F64, device=device).matrix()
    _close(S, _closed_form([fm.params], out, w, train, test, damping, R))


@given(seed=seeds, C=st.integers(2, 3), proj_dim=st.sampled_from([None, 5]))
def test_ensemble_by_vmap_equals_loop_over_checkpoints(device, seed, C, proj_dim):
    """s = (1/C sum_c phi^c K_c phi_t^c) * (1/C sum_c Q^c): vmap over C == a Python loop."""
    fm = _mlp(seed, device)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    ckpts = [_perturbed(fm.params, seed + c) for c in range(C)]
    train, test = _data(6, seed + 1, device), _data(3, seed + 2, device)
    m = trak(out, weight_fn=w, proj_dim=proj_dim, seed=seed, damping=0.5)
    state = m.prepare(ckpts, train)
    assert state.kernel.shape[0] == C and state.train_features.shape[:2] == (C, 6)
    R = None if proj_dim is None else [make_projector(
        num_params(fm.params), proj_dim=proj_dim, seed=seed + c, dtype=F64, device=device).matrix()
        for c in range(C)]
    _close(m.score(ckpts, state, train, test), _closed_form(ckpts, out, w, train, test, 0.5, R))
    # Without weights the ensemble is the plain mean of single-checkpoint TRAK scores, each
    # checkpoint c with its own projection seed (seed + c).
    m1 = trak(out, proj_dim=proj_dim, seed=seed, damping=0.5)
    loop = []
    for c, p in enumerate(ckpts):
        mc = trak(out, proj_dim=proj_dim, seed=seed + c, damping=0.5)
        loop.append(mc.score(p, mc.prepare(p, train), train, test))
    loop = torch.stack(loop).mean(0)
    _close(m1.score(ckpts, m1.prepare(ckpts, train), train, test), loop)


@given(seed=seeds, cuts=st.tuples(st.integers(1, 4), st.integers(5, 8)), k=st.integers(1, 4),
       cache=st.booleans(), C=st.integers(1, 2))
def test_streamed_topk_and_self_score(device, seed, cuts, k, cache, C):
    """3 uneven batches == one == unchunked == batches merged (batch_rows); top_k ==
    torch.topk(full); self == diag(full)."""
    fm = _mlp(seed, device)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    ckpts = [_perturbed(fm.params, seed + c) for c in range(C)]
    train, test = _data(9, seed + 1, device), _data(4, seed + 2, device)
    shards = _split(train, list(cuts))
    m = trak(out, weight_fn=w, proj_dim=6, seed=seed, damping=0.3, cache_features=cache,
             chunk_size=2)
    full = m.score(ckpts, m.prepare(ckpts, train), train, test)
    whole = trak(out, weight_fn=w, proj_dim=6, seed=seed, damping=0.3)  # chunk_size=None
    _close(whole.score(ckpts, whole.prepare(ckpts, train), None, test), full, 1e-12)
    state = m.prepare(ckpts, shards)
    _close(m.score(ckpts, state, shards, test), full, 1e-12)
    for largest in (True, False):
        top = m.score(ckpts, state, shards, test, top_k=k, largest=largest)
        ref = torch.topk(full, k, dim=0, largest=largest)
        _close(top.values, ref.values, 1e-12)
        _close(full.gather(0, top.indices), ref.values, 1e-12)
    square = m.score(ckpts, state, shards, train)
    _close(m.self_score(ckpts, state, shards), torch.diagonal(square), 1e-12)
    _close(m.self_score(ckpts, state, _split(train, [2, 3])), torch.diagonal(square), 1e-12)
    merged = trak(out, weight_fn=w, proj_dim=6, seed=seed, damping=0.3, cache_features=cache,
                  batch_rows=k + 1)  # shards merged into calls of >= k + 1 rows
    s_merged = merged.prepare(ckpts, shards)
    _close(merged.score(ckpts, s_merged, shards, _split(test, [1])), full, 1e-12)
    _close(merged.self_score(ckpts, s_merged, shards), torch.diagonal(square), 1e-12)


@given(seed=seeds)
def test_same_seed_same_scores_other_seed_differs(device, seed):
    """R is fixed by the seed: equal scores for equal seeds, different for another seed."""
    fm = _mlp(seed, device)
    out = classification_margin(fm.forward)
    train, test = _data(8, seed + 1, device), _data(3, seed + 2, device)
    run = lambda s: trak(out, proj_dim=4, seed=s, damping=0.1).score(
        fm.params, trak(out, proj_dim=4, seed=s, damping=0.1).prepare(fm.params, train),
        None, test)
    assert torch.equal(run(seed), run(seed))
    assert not torch.allclose(run(seed), run(seed + 1), rtol=1e-6, atol=1e-9)


@given(seed=seeds, kind=st.sampled_from(["gaussian", "rademacher"]))
def test_invertible_projection_changes_nothing_without_damping(device, seed, kind):
    """R [P, P] invertible, damping 0: g^T R (R^T G^T G R)^-1 R^T g_t == g^T (G^T G)^-1 g_t."""
    params, loss, train = linear_regression(n=12, dim=4, seed=seed, device=device)
    _, _, test = linear_regression(n=3, dim=4, seed=seed + 1, device=device)
    out = lambda p, ex: ex[0] @ p["w"] + p["b"]  # the prediction; its gradient is [x, 1]
    P = num_params(params)
    R = make_projector(P, proj_dim=P, kind=kind, seed=seed, dtype=F64).matrix()
    assume(torch.linalg.cond(R) < 1e4)  # a singular +-1 draw has nothing to compare
    exact = trak(out, damping=0.0)
    proj = trak(out, proj_dim=P, kind=kind, seed=seed, damping=0.0)
    ref = exact.score(params, exact.prepare(params, train), None, test)
    _close(proj.score(params, proj.prepare(params, train), None, test), ref, 1e-8)
    _close(ref, _closed_form([params], out, None, train, test, 0.0))


@pytest.mark.parametrize("seed", range(6))
def test_duplicate_of_the_test_example_is_a_top_proponent(device, seed):
    """Trained logistic regression: train[j] == test gets s > 0 (K PD, Q > 0) and ranks top-4/20."""
    params, _, (x, y) = logistic_regression(n=20, dim=3, classes=3, seed=seed, device=device)
    W = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.LBFGS(list(W.values()), max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = F.cross_entropy(x @ W["W"].T + W["b"], y)
        obj = obj + 1e-2 * sum((v**2).sum() for v in W.values())
        obj.backward()
        return obj

    opt.step(closure)
    params = {k: v.detach() for k, v in W.items()}
    forward = lambda p, ex: p["W"] @ ex[0] + p["b"]
    j = seed % 5
    for proj_dim in (None, 4):
        m = trak(classification_margin(forward), weight_fn=classification_weight(forward),
                 proj_dim=proj_dim, seed=seed, damping=1e-2)
        s = m.score(params, m.prepare(params, (x, y)), None, (x[j:j + 1], y[j:j + 1]))[:, 0]
        assert s[j] > 0
        assert int((s > s[j]).sum()) <= 3


@given(seed=seeds, K=st.integers(2, 6))
def test_classification_margin_and_weight(device, seed, K):
    """margin = l_y - logsumexp_{c != y} l_c; weight = 1 - softmax(l)_y; vmappable; dict labels."""
    g = _gen(seed)
    logits = torch.randn(5, K, generator=g, dtype=F64).to(device)
    y = torch.randint(0, K, (5,), generator=g).to(device)
    forward = lambda p, ex: ex[0] * p["s"]
    p = {"s": torch.ones((), dtype=F64, device=device)}
    margin, weight = classification_margin(forward), classification_weight(forward)
    got_m = torch.func.vmap(margin, in_dims=(None, 0))(p, (logits, y))
    got_w = torch.func.vmap(weight, in_dims=(None, 0))(p, (logits, y))
    for i in range(5):
        others = torch.cat([logits[i, :y[i]], logits[i, y[i] + 1:]])
        _close(got_m[i], logits[i, y[i]] - others.logsumexp(0), 1e-13)
        _close(got_w[i], 1 - logits[i].softmax(0)[y[i]], 1e-13)
    dict_margin = classification_margin(lambda p, ex: ex["x"] * p["s"])
    _close(dict_margin(p, {"x": logits[0], "labels": y[0]}), got_m[0], 1e-15)


@given(seed=seeds, C=st.integers(1, 3), proj_dim=st.sampled_from([None, 5]),
       by_columns=st.booleans())
def test_model_output_fn_equals_the_per_example_function(device, seed, C, proj_dim,
                                                         by_columns):
    """trak(functional_model(net, margin_loss)) == trak(classification_margin(forward)), with
    the factored gradients densified whole or projected column block by column block."""
    trak_module = importlib.import_module("dattri_fn.attribute.trak_features")
    fm = _mlp(seed, device)
    saved = trak_module._DENSE_ENTRIES
    trak_module._DENSE_ENTRIES = 0 if by_columns else saved
    margin_fm = functional_model(fm.module, classification_margin_loss)
    weight_fm = functional_model(fm.module, classification_weight_loss)
    ckpts = [_perturbed(fm.params, seed + c) for c in range(C)]
    train, test = _split(_data(7, seed, device), [3]), _data(3, seed + 1, device)
    fast = trak(margin_fm, weight_fn=weight_fm, proj_dim=proj_dim, damping=0.1)
    slow = trak(classification_margin(fm.forward), weight_fn=classification_weight(fm.forward),
                proj_dim=proj_dim, damping=0.1)
    try:
        got = fast.score(ckpts, fast.prepare(ckpts, train), train, test)
    finally:
        trak_module._DENSE_ENTRIES = saved
    _close(got, slow.score(ckpts, slow.prepare(ckpts, train), train, test), 1e-9)
    with pytest.raises(ValueError, match=r"trak.prepare\(params=...\): expected the keys"):
        fast.prepare({"0.weight": fm.params["0.weight"]}, train)


class _Loader:
    """A re-iterable of batches that is not a list: its rows are not counted up front."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@given(seed=seeds, kind=st.sampled_from(KINDS), row_block=st.sampled_from([1, 2**19]),
       by_checkpoint=st.booleans())
def test_one_projection_held_at_a_time(device, monkeypatch, seed, kind, row_block,
                                       by_checkpoint):
    """Counted data, read once per checkpoint (big R's) or once for all, holds one
    checkpoint's dense R at a time (a rademacher R is let go after: its packed signs stay),
    and scores as reading batch by batch with every R held, also with the densified rows
    projected a few at a time."""
    trak_module = importlib.import_module("dattri_fn.attribute.trak_features")
    project_module = importlib.import_module("dattri_fn.transforms.project")
    monkeypatch.setattr(trak_module, "_ROW_BLOCK_ENTRIES", row_block * 31)  # P = 31
    monkeypatch.setattr(trak_module, "_MIN_BLOCK_ROWS", 1)
    # R's of 31 x 8 entries: read by checkpoint only when even these count as big
    monkeypatch.setattr(trak_module, "_HELD_BYTES", 0 if by_checkpoint else 2**22)
    held, most, kept = set(), [0], project_module.Projector.kept

    def counted(self, dtype, device):  # the distinct dense R's that kept() holds (packed signs)
        with kept(self, dtype, device):
            now = bool(self.held_bytes(dtype)) and (dtype, torch.device(device)) in self._cache \
                and id(self) not in held
            if now:
                held.add(id(self))
            most[0] = max(most[0], len(held))
            try:
                yield self
            finally:
                if now:
                    held.discard(id(self))

    monkeypatch.setattr(project_module.Projector, "kept", contextlib.contextmanager(counted))
    fm = _mlp(seed, device)
    ckpts = [_perturbed(fm.params, seed + c) for c in range(3)]
    model = functional_model(fm.module, classification_margin_loss)
    m = trak(model, weight_fn=functional_model(fm.module, classification_weight_loss),
             proj_dim=8, kind=kind, seed=seed, damping=0.1)
    train, test = _split(_data(7, seed, device), [3]), _split(_data(3, seed + 1, device), [1])
    state = m.prepare(ckpts, train)
    scores = m.score(ckpts, state, None, test)
    packed = kind == "rademacher"  # other kinds keep their small R: nothing is held
    assert most[0] == (1 if packed else 0)
    most[0] = 0
    m.self_score(ckpts, state, None)  # from the cache: no projection at all
    assert most[0] == 0
    streamed = m.score(ckpts, m.prepare(ckpts, _Loader(train)), None, _Loader(test))
    assert most[0] == (3 if packed else 0)
    _close(scores, streamed, 1e-12)
    monkeypatch.setattr(trak_module, "_ROW_BLOCK_ENTRIES", 2**19)
    whole = trak(model, weight_fn=functional_model(fm.module, classification_weight_loss),
                 proj_dim=8, kind=kind, seed=seed, damping=0.1)
    _close(scores, whole.score(ckpts, whole.prepare(ckpts, train), None, test), 1e-12)


@pytest.mark.parametrize("whole_pass", ["batch", "merged"])
def test_a_one_call_prepare_holds_one_projection_at_a_time(whole_pass, monkeypatch):
    """A prepare whose pass is ONE call (a Batch, or batches merged by batch_rows), or two
    batches, holds each dense rademacher R_c only while checkpoint c is projected (at most 1
    alive, not C = 3); the two states are equal bit for bit."""
    project_module = importlib.import_module("dattri_fn.transforms.project")
    held, most, kept = set(), [0], project_module.Projector.kept

    def counted(self, dtype, device):  # the distinct dense R's that kept() holds (packed signs)
        with kept(self, dtype, device):
            now = bool(self.held_bytes(dtype)) and (dtype, torch.device(device)) in self._cache \
                and id(self) not in held
            if now:
                held.add(id(self))
            most[0] = max(most[0], len(held))
            try:
                yield self
            finally:
                if now:
                    held.discard(id(self))

    monkeypatch.setattr(project_module.Projector, "kept", contextlib.contextmanager(counted))
    fm = _mlp(0, "cpu")
    ckpts = [_perturbed(fm.params, c) for c in range(3)]
    model = functional_model(fm.module, classification_margin_loss)
    weight = functional_model(fm.module, classification_weight_loss)
    data = _data(7, 0, "cpu")
    one = trak(model, weight_fn=weight, proj_dim=8, damping=0.1,
               batch_rows=None if whole_pass == "batch" else 7)
    state = one.prepare(ckpts, data if whole_pass == "batch" else _split(data, [3]))
    assert most[0] == 1
    most[0] = 0
    ref = trak(model, weight_fn=weight, proj_dim=8, damping=0.1).prepare(ckpts, _split(data, [3]))
    assert most[0] == 1
    for got, want in zip(state[:3], ref[:3], strict=True):
        assert torch.equal(got, want)
    assert state.plan == ref.plan  # plan decisions: plain values


def test_state_is_tensors_and_round_trips(device, tmp_path):
    """The state is a NamedTuple of tensors; io.save/io.load gives the same scores."""
    fm = _mlp(0, device)
    out = classification_margin(fm.forward)
    train, test = _data(6, 1, device), _data(2, 2, device)
    m = trak(out, weight_fn=classification_weight(fm.forward), proj_dim=3)
    state = m.prepare(fm.params, train)
    assert isinstance(state, TRAKState)
    assert state.kernel.shape == (1, 3, 3) and state.train_weights.shape == (6,)
    io.save(state, tmp_path / "trak.pt")
    loaded = io.load(tmp_path / "trak.pt")
    assert torch.equal(m.score(fm.params, loaded, None, test),
                       m.score(fm.params, state, None, test))


def test_dtype_and_device_follow_params(device):
    """float32 params give float32 kernels and scores on the params' device."""
    fm = _mlp(0, device)
    fm32 = functional_model(copy.deepcopy(fm.module).float(), F.cross_entropy)
    x, y = _data(5, 1, device)
    m = trak(classification_margin(fm32.forward), proj_dim=3, damping=0.1)
    state = m.prepare(fm32.params, (x.float(), y))
    S = m.score(fm32.params, state, None, (x.float(), y))
    assert state.kernel.dtype == S.dtype == torch.float32 and S.device.type == device.type


@given(seed=seeds, C=st.integers(1, 2), proj_dim=st.sampled_from([None, 4]),
       dtype=st.sampled_from([torch.float32, F64]), cache=st.booleans())
def test_bfloat16_features(device, seed, C, proj_dim, dtype, cache):
    """feature_dtype=bfloat16: the cache is the float features rounded (2^-7 relative), Q and
    the kernel are in the params' dtype, the kernel is the closed form of the cached features
    (primal, or dual when d = P > n_train),
    scores are within 5% of the float path and self-scores are the score diagonal."""
    fm = _mlp(seed, device)
    net = copy.deepcopy(fm.module).to(dtype)
    fm = functional_model(net, F.cross_entropy)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    ckpts = [_perturbed(fm.params, seed + c) for c in range(C)]
    train = tuple(t.to(dtype) if t.is_floating_point() else t for t in _data(12, seed + 1, device))
    test = tuple(t.to(dtype) if t.is_floating_point() else t for t in _data(3, seed + 2, device))
    opts = dict(weight_fn=w, proj_dim=proj_dim, seed=seed, damping=0.5)
    half = trak(out, feature_dtype=torch.bfloat16, cache_features=cache, **opts)
    full = trak(out, **opts)
    s_half, s_full = half.prepare(ckpts, train), full.prepare(ckpts, train)
    assert s_half.kernel.dtype == dtype
    if cache:
        phi = s_half.train_features
        assert phi.dtype == torch.bfloat16 and s_half.train_weights.dtype == dtype
        ref = s_full.train_features
        assert bool(((phi.to(F64) - ref.to(F64)).abs() <= 2**-7 * ref.abs().to(F64)
                     + 2**-7 * float(ref.abs().max())).all())
        _close(s_half.train_weights, s_full.train_weights, tol=1e-6)
        f = phi.to(F64)
        gram = f @ f.mT if f.shape[2] > f.shape[1] else f.mT @ f  # dual form when d > n_train
        K = torch.linalg.inv(gram + 0.5 * torch.eye(gram.shape[1], dtype=F64, device=f.device))
        _close(s_half.kernel.to(F64), K, tol=1e-4 if dtype == torch.float32 else 1e-10)
    S, ref = half.score(ckpts, s_half, train, test), full.score(ckpts, s_full, train, test)
    assert S.dtype == dtype
    assert float((S - ref).norm()) <= 0.05 * float(ref.norm())
    _close(half.self_score(ckpts, s_half, train),
           half.score(ckpts, s_half, train, train).diagonal(), tol=1e-4)
    with pytest.raises(TypeError, match=r"trak\(feature_dtype=...\): expected None or a floating"):
        trak(out, feature_dtype=torch.int8)


def test_batch_rows_with_a_bare_tensor_batch(device):
    """batch_rows merges batches of a bare-Tensor Batch too (one example = one row): the same
    scores and self-scores, cached or streamed."""
    g = _gen(3)
    X = torch.randn(10, 3, generator=g, dtype=F64).to(device)
    p = {"w": torch.randn(3, generator=g, dtype=F64).to(device)}
    out = lambda P, x: (P["w"] * x).sum().tanh()
    for cache in (True, False):
        ref = trak(out, proj_dim=None, damping=0.1, cache_features=cache)
        got = trak(out, proj_dim=None, damping=0.1, cache_features=cache, batch_rows=4)
        s_ref, s_got = ref.prepare([p], X), got.prepare([p], X)
        _close(got.score([p], s_got, X, X[:3]), ref.score([p], s_ref, X, X[:3]))
        _close(got.self_score([p], s_got, X), ref.self_score([p], s_ref, X))


def test_bad_input_raises_clear_errors(device):
    """Mismatched checkpoints, NaN, non-scalar outputs, wrong test layout, bad state/settings."""
    fm = _mlp(0, device)
    out = classification_margin(fm.forward)
    train, test = _data(6, 1, device), _data(2, 2, device)
    m = trak(out, proj_dim=3, damping=0.1)
    renamed = {("x" + k): v for k, v in fm.params.items()}
    with pytest.raises(ValueError, match=r"trak.prepare\(params\[1\]=...\): expected the keys"):
        m.prepare([fm.params, renamed], train)
    nan = {k: v.clone() for k, v in fm.params.items()}
    nan["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"finite values, got NaN or inf at key '0.weight'"):
        m.prepare(nan, train)
    with pytest.raises(ValueError, match=r"output_fn=...\): expected a function returning a "
                                         r"scalar Tensor\[\] per example, got shape \[3\]"):
        trak(fm.forward).prepare(fm.params, train)
    with pytest.raises(ValueError, match=r"weight_fn=...\): expected a function returning a "
                                         r"scalar"):
        trak(out, weight_fn=fm.forward).prepare(fm.params, train)
    state = m.prepare(fm.params, train)
    with pytest.raises(ValueError, match=r"trak.score\(test=...\): expected examples that "
                                         r"output_fn accepts"):
        m.score(fm.params, state, None, _data(2, 2, device, dim=5))
    with pytest.raises(ValueError, match=r"trak.score\(state=...\): expected a kernel of shape "
                                         r"\[C, d, d\] = \[2, 3, 3\]"):
        m.score([fm.params, fm.params], state, None, test)
    with pytest.raises(TypeError, match=r"trak.score\(state=...\): expected the TRAKState"):
        m.score(fm.params, (), train, test)
    with pytest.raises(ValueError, match=r"trak.score\(train=...\): expected the 6 training"):
        m.score(fm.params, state, _data(4, 1, device), test)
    uncached = trak(out, proj_dim=3, damping=0.1, cache_features=False)
    with pytest.raises(ValueError, match=r"trak.self_score\(train=...\): expected the training"):
        uncached.self_score(fm.params, uncached.prepare(fm.params, train), None)
    with pytest.raises(ValueError, match=r"trak.prepare\(damping=...\): expected Phi\^T Phi "
                                         r"\+ damping I positive definite"):
        trak(out, damping=0.0).prepare(fm.params, train)  # P = 31 > n_train = 6
    with pytest.raises(ValueError, match=r"trak\(kind=...\): expected one of"):
        trak(out, kind="dense")
    with pytest.raises(ValueError, match=r"trak\(damping=...\): expected a finite number >= 0"):
        trak(out, damping=-1.0)
    with pytest.raises(ValueError, match=r"trak\(proj_dim=...\): expected an int >= 1"):
        trak(out, proj_dim=0)
    with pytest.raises(TypeError, match=r"trak\(output_fn=...\): expected a callable"):
        trak(None)


@given(seed=seeds, C=st.integers(1, 2), proj_dim=st.sampled_from([None, 10]),
       k=st.integers(1, 3))
def test_dual_form_equals_primal_when_d_exceeds_n_train(device, seed, C, proj_dim, k, tmp_path_factory):
    """d > n_train with cached features: K = (Phi Phi^T + damping I)^-1 [C, n, n] gives the
    primal scores (Phi^T Phi + damping I)^-1 (push-through identity), top_k and self-scores,
    and survives io.save/io.load."""
    fm = _mlp(seed, device)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    ckpts = [_perturbed(fm.params, seed + c) for c in range(C)]
    train, test = _data(6, seed + 1, device), _data(3, seed + 2, device)
    dual = trak(out, weight_fn=w, proj_dim=proj_dim, seed=seed, damping=0.3)
    primal = trak(out, weight_fn=w, proj_dim=proj_dim, seed=seed, damping=0.3,
                  cache_features=False)
    s_dual, s_primal = dual.prepare(ckpts, train), primal.prepare(ckpts, train)
    d = num_params(fm.params) if proj_dim is None else proj_dim
    assert s_dual.kernel.shape == (C, 6, 6) and s_primal.kernel.shape == (C, d, d)
    ref = primal.score(ckpts, s_primal, train, test)
    _close(dual.score(ckpts, s_dual, None, test), ref)
    for largest in (True, False):
        top = dual.score(ckpts, s_dual, train, test, top_k=k, largest=largest)
        _close(top.values, torch.topk(ref, k, dim=0, largest=largest).values)
    _close(dual.self_score(ckpts, s_dual, None), primal.self_score(ckpts, s_primal, train))
    path = tmp_path_factory.mktemp("dual") / "trak.pt"
    io.save(s_dual, path)
    _close(dual.score(ckpts, io.load(path), None, test), ref)


@given(seed=seeds, n=st.integers(1, 1200), d=st.sampled_from([1, 7, 192, 193, 300]),
       half=st.booleans())
def test_gram_of_equals_dense_product(seed, n, d, half):
    """gram_of(x) == x^T x in float64 for every row-block count and column-block split; bfloat16
    rows multiplied in float32 give their exact products, summed in float32 within a block of
    512 rows (round-off at most 512 u_32 of the column norms)."""
    x = torch.randn(n, d, generator=_gen(seed), dtype=F64)
    if half:
        x = x.to(torch.bfloat16)
    x64 = x.to(F64)
    ref = x64.T @ x64
    scale = float((x64 * x64).sum(0).max())  # |x^T x| entries <= max column norm^2
    tol = (512 * 2**-24 if half else 1e-13) * scale
    got = gram_of(x, torch.float32 if half else F64)
    assert got.dtype == F64 and got.shape == (d, d)
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    acc = ref.clone()  # out= adds to a symmetric accumulator in place
    assert gram_of(x, torch.float32 if half else F64, out=acc) is acc
    torch.testing.assert_close(acc, 2 * ref, rtol=0, atol=2 * tol)


def test_singular_kernel_names_the_checkpoint(device):
    """A checkpoint whose features span fewer than d directions (damping 0): the error names it,
    on the cached (Batch) path and the streamed one."""
    out = lambda p, ex: (p["w"] @ ex[0] + 0.5 * p["s"].sum()) * p["s"].sum()
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64, device=device)
    ok = {"w": w, "s": torch.ones(1, dtype=F64, device=device)}
    bad = {"w": w, "s": torch.zeros(1, dtype=F64, device=device)}  # d/dw = s x = 0: rank 1
    train = _data(8, 1, device)
    for cache in (True, False):
        m = trak(out, damping=0.0, cache_features=cache)
        with pytest.raises(ValueError, match=r"trak.prepare\(damping=...\): .*singular matrix at "
                                             r"checkpoints \[1\]"):
            m.prepare([ok, bad], train)
        with pytest.raises(ValueError, match=r"singular matrix at checkpoints \[0, 2\]"):
            m.prepare([bad, ok, bad], train)  # the loop goes on after a failure
        assert m.prepare([ok, ok], train).kernel.shape == (2, 4, 4)


@pytest.mark.parametrize("cache", [True, False])
def test_kernel_across_gram_blocks(device, monkeypatch, cache):
    """gram_of's row and column blocks (shrunk to 4 rows and 3 columns) and the in-place
    Cholesky per checkpoint give the closed-form scores, cached (Batch) and streamed."""
    trak_module = importlib.import_module("dattri_fn.attribute.trak_kernel")
    for name, value in (("_GRAM_ROWS", 4), ("_GRAM_COLS", 3), ("_GRAM_WHOLE", 2)):
        monkeypatch.setattr(trak_module, name, value)
    fm = _mlp(3, device)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    ckpts = [_perturbed(fm.params, 3 + c) for c in range(3)]
    train, test = _data(11, 4, device), _data(3, 5, device)
    m = trak(out, weight_fn=w, proj_dim=8, seed=3, damping=0.5, cache_features=cache)
    R = [make_projector(num_params(fm.params), proj_dim=8, seed=3 + c, dtype=F64,
                        device=device).matrix() for c in range(3)]
    state = m.prepare(ckpts, train)
    assert state.kernel.shape == (3, 8, 8)
    _close(m.score(ckpts, state, train, test), _closed_form(ckpts, out, w, train, test, 0.5, R))


def test_gram_of_sums_blocks_in_float64():
    """Block sums are float64: 4,096 rows of 64^2 and one of 1 give 2^24 + 1 exactly (a float32
    running sum rounds it to 2^24)."""
    x = torch.cat([torch.full((4096, 1), 64.0), torch.ones(1, 1)]).to(torch.bfloat16)
    assert float(gram_of(x, torch.float32)[0, 0]) == 2.0**24 + 1


def test_kernel_factored_in_place(device, monkeypatch):
    """primal_kernel hands LAPACK each Gram column-major, so the Cholesky factor and its
    inverse are written into it (a row-major input costs a hidden full [d, d] copy per call)."""
    seen = []
    cholesky_ex = torch.linalg.cholesky_ex

    def recording(A, *args, **kwargs):
        seen.append((A.mT.is_contiguous(), kwargs.get("out", (None,))[0] is A))
        return cholesky_ex(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", recording)
    fm = _mlp(1, device)
    m = trak(classification_margin(fm.forward), proj_dim=5, damping=0.5)
    m.prepare([fm.params, _perturbed(fm.params, 2)], _data(9, 1, device))
    assert seen == [(True, True), (True, True)]


# -- binary classifiers: one logit, BCE-with-logits ---------------------------------------
def _binary_mlp(seed, dim=3, hidden=4):
    net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(F64)
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=F64))
    bce = lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype))
    return functional_model(net, bce)


def _binary_data(n, seed, dim=3, float_labels=False):
    g = _gen(seed)
    x, y = torch.randn(n, dim, generator=g, dtype=F64), torch.randint(0, 2, (n,), generator=g)
    return x, (y.to(F64) if float_labels else y)


@given(seed=seeds, float_labels=st.booleans())
def test_binary_margin_is_the_two_class_margin_and_its_weight_the_bce_slope(seed, float_labels):
    """One logit s: f = (2y-1) s = the margin of logits (0, s); Q = sigmoid(-f); grad BCE = -Q grad f."""
    fm = _binary_mlp(seed)
    x, y = _binary_data(5, seed + 1, float_labels=float_labels)
    two = lambda p, ex: torch.cat([torch.zeros(1, dtype=F64), fm.forward(p, ex).reshape(1)])
    for fwd in (fm.forward, lambda p, ex: fm.forward(p, ex).reshape(())):  # logits [1] and []
        m = torch.func.vmap(classification_margin(fwd), in_dims=(None, 0))(fm.params, (x, y))
        ref = torch.func.vmap(classification_margin(two), in_dims=(None, 0))(fm.params,
                                                                          (x, y.long()))
        _close(m, ref, 1e-13)
        q = torch.func.vmap(classification_weight(fwd), in_dims=(None, 0))(fm.params, (x, y))
        _close(q, torch.sigmoid(-ref), 1e-13)
    for i in range(5):
        g_loss = torch.func.grad(fm.loss)(fm.params, (x[i], y[i]))
        g_margin = torch.func.grad(classification_margin(fm.forward))(fm.params, (x[i], y[i]))
        q = classification_weight(fm.forward)(fm.params, (x[i], y[i]))
        for k in g_loss:
            _close(g_loss[k], -q * g_margin[k], 1e-12)


@given(seed=seeds, float_labels=st.booleans(), column=st.booleans())
def test_binary_batch_losses_equal_the_per_example_means(seed, float_labels, column):
    """classification_margin_loss / _weight_loss on logits [B] or [B, 1] = mean of the per-example forms."""
    fm = _binary_mlp(seed)
    x, y = _binary_data(6, seed + 1, float_labels=float_labels)
    logits = fm.module(x)  # [B, 1]
    logits = logits if column else logits.reshape(-1)
    m = torch.func.vmap(classification_margin(fm.forward), in_dims=(None, 0))(fm.params, (x, y))
    _close(classification_margin_loss(logits, y), m.mean(), 1e-13)
    _close(classification_weight_loss(logits, y), torch.sigmoid(-m).mean(), 1e-13)


def test_binary_labels_other_than_0_1_are_refused():
    """A label 0.5 or 2 with one logit is named, eagerly and in the batch form."""
    fm = _binary_mlp(0)
    x, _ = _binary_data(3, 1)
    with pytest.raises(ValueError, match=r"classification_margin\(example=...\): expected a binary "
                                         r"label 0/1 .* got label 0.5"):
        classification_margin(fm.forward)(fm.params, (x[0], torch.tensor(0.5, dtype=F64)))
    with pytest.raises(ValueError, match=r"classification_weight_loss\(labels=...\): expected "
                                         r"binary labels 0/1 \[B\] .* got label 2"):
        classification_weight_loss(fm.module(x), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"classification_margin_loss\(labels=...\): expected "
                                         r"binary labels 0/1 \[B\] for 3 logits, got label shape"):
        classification_margin_loss(fm.module(x), torch.tensor([0, 1]))


@given(seed=seeds, n_train=st.integers(2, 7), damping=dampings)
def test_binary_trak_equals_the_dense_closed_form_on_both_paths(seed, n_train, damping):
    """Binary TRAK = G (G^T G + damping I)^-1 G_test^T * sigmoid(-f), by vmap and by the capture engine."""
    fm = _binary_mlp(seed)
    train, test = _binary_data(n_train, seed + 1), _binary_data(3, seed + 2)
    out, w = classification_margin(fm.forward), classification_weight(fm.forward)
    ref = _closed_form([fm.params], out, w, train, test, damping)
    m = trak(out, weight_fn=w, damping=damping)
    _close(m.score(fm.params, m.prepare(fm.params, train), None, test), ref)
    factored = trak(functional_model(fm.module, classification_margin_loss),
                    weight_fn=functional_model(fm.module, classification_weight_loss),
                    damping=damping)
    _close(factored.score(fm.params, factored.prepare(fm.params, train), None, test), ref)


def test_trak_scores_from_a_feature_store(tmp_path):
    """cache_features=False: TRAK's weighted train rows (w_i phi_ci, stacked over 2 checkpoints)
    written to a store while scoring, then read back for new test points, equal the data's."""
    from dattri_fn.store import open_store, record_store

    fm = _mlp(0, "cpu")
    train, test = _data(10, 1, "cpu"), _data(4, 2, "cpu")
    ckpts = [fm.params, _perturbed(fm.params, 5)]
    m = trak(classification_margin(fm.forward), weight_fn=classification_weight(fm.forward),
             proj_dim=5, cache_features=False, damping=0.1)
    state = m.prepare(ckpts, train)
    cfg = {"method": "trak", "proj_dim": 5, "seed": 0}
    rec = record_store(tmp_path, _split(train, [5]), params=ckpts, config=cfg)
    _close(m.score(ckpts, state, rec, test), m.score(ckpts, state, train, test))
    store = open_store(tmp_path, params=ckpts, config=cfg)
    _close(m.score(ckpts, state, store, test, top_k=3).values,
           m.score(ckpts, state, train, test).topk(3, dim=0).values)


def test_trak_with_kronecker_projection():
    """trak(projection='kronecker') = the TRAK formula (Phi_tr (Phi_tr^T Phi_tr + lam I)^-1
    Phi_te^T) * Q_i on the Kronecker-projected features of trak_features.feature_calls (checked
    against kron(P_out, P_in) on autograd gradients in test_kron_projection); settings named."""
    from dattri_fn.attribute.trak_features import FeatureConfig, feature_calls
    from dattri_fn.transforms.layer_grads import layer_plan

    fm = _mlp(0, "cpu", dim=4, hidden=5)
    out = functional_model(fm.module, classification_margin_loss)
    w = functional_model(fm.module, classification_weight_loss)
    train, test = _data(12, 1, "cpu", dim=4), _data(3, 2, "cpu", dim=4)
    m = trak(out, weight_fn=w, proj_dim=(2, 3), projection="kronecker", kind="gaussian", seed=4,
             damping=0.1)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    cfg = FeatureConfig(out.loss, None, layer_plan(out), list(fm.params), (2, 3), "gaussian", 4,
                        None, None, None, {}, None, projection="kronecker")
    calls = feature_calls("trak", fm.params, cfg)
    phi_tr, phi_te = calls.packed(train)[0, :, :-1], calls.packed(test)[0, :, :-1]
    K = phi_tr.T @ phi_tr + 0.1 * torch.eye(phi_tr.shape[1], dtype=F64)
    Q = torch.stack([w.loss(fm.params, (x, y)) for x, y in zip(*train, strict=True)])
    want = (phi_tr @ torch.linalg.solve(K, phi_te.T)) * Q[:, None]
    torch.testing.assert_close(S, want, rtol=1e-8, atol=1e-10)
    dense = trak(out, weight_fn=w, proj_dim=6, kind="gaussian", seed=4, damping=0.1)
    assert not torch.allclose(dense.score(fm.params, dense.prepare(fm.params, train), train, test), S)
    with pytest.raises(ValueError, match=r"trak\(projection=...\): expected 'dense' or"):
        trak(out, proj_dim=2, projection="sparse")
    with pytest.raises(ValueError, match=r"trak\(output_fn=...\): expected a FunctionalModel"):
        trak(classification_margin(fm.forward), proj_dim=2, projection="kronecker")
    with pytest.raises(ValueError, match=r"trak\(proj_dim=...\): expected k \(per side\)"):
        trak(out, projection="kronecker")
    with pytest.raises(ValueError, match=r"trak\(kind=...\): expected one of"):
        trak(out, proj_dim=2, kind="mask")


def test_trak_self_score_from_a_feature_store(tmp_path):
    """s_ii = Qbar_i/C sum_c phi_ci^T K_c phi_ci: self_score(record_store) writes it to <store>/self
    equal to self_score(train) bit for bit; self_score(open_store) reads it back with no training
    data; a state of another prepare, other params or another data order is refused by name."""
    from dattri_fn.store import open_store, record_store

    fm = _mlp(0, "cpu")
    train, test = _split(_data(10, 1, "cpu"), [4, 7]), _data(3, 2, "cpu")
    ckpts = [fm.params, _perturbed(fm.params, 5)]
    m = trak(classification_margin(fm.forward), weight_fn=classification_weight(fm.forward),
             proj_dim=5, cache_features=False, damping=0.1)
    state = m.prepare(ckpts, train)
    want = m.self_score(ckpts, state, train)
    cfg = {"method": "trak", "proj_dim": 5, "seed": 0}
    rec = record_store(tmp_path, train, params=ckpts, config=cfg)
    torch.testing.assert_close(m.self_score(ckpts, state, rec), want, rtol=0, atol=0)
    m.score(ckpts, state, rec, test)  # writes the weighted train rows themselves
    store = open_store(tmp_path, params=ckpts, config=cfg)
    torch.testing.assert_close(m.self_score(ckpts, state, store), want, rtol=0, atol=0)
    _close(m.score(ckpts, state, store, [(x, y) for x, y in train]).diagonal(), want)
    # a complete record is read back: the method's features are not computed again
    torch.testing.assert_close(m.self_score(ckpts, state, rec), want, rtol=0, atol=0)
    other = trak(classification_margin(fm.forward), weight_fn=classification_weight(fm.forward),
                 proj_dim=5, cache_features=False, damping=1.0)
    other_state = other.prepare(ckpts, train)
    with pytest.raises(ValueError, match=r"trak\.self_score\(state=...\): expected the state the "
                                         r"store at .* was written under"):
        other.self_score(ckpts, other_state, store)
    with pytest.raises(ValueError, match=r"trak\.self_score\(state=...\)"):
        other.self_score(ckpts, other_state, rec)
    moved = [ckpts[0], _perturbed(fm.params, 6)]
    with pytest.raises(ValueError, match=r"trak\.self_score\(params=...\): expected the store's "
                                         r"params_hash"):
        m.self_score(moved, state, record_store(tmp_path, train, params=moved, config=cfg))
    with pytest.raises(ValueError, match=r"trak\.self_score\(data=...\): expected the rows of shard 0"):
        m.self_score(ckpts, state, record_store(tmp_path, train[::-1], params=ckpts, config=cfg))
    cached = trak(classification_margin(fm.forward), proj_dim=5, damping=0.1)
    with pytest.raises(TypeError, match=r"trak\.self_score\(train=...\): expected examples"):
        cached.self_score(ckpts, cached.prepare(ckpts, train), store)
