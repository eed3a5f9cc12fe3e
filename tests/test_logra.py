"""LoGra: projected layer gradients against autograd, and EK-FAC influence when nothing is projected."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn.attribute import influence
from dattri_fn.attribute.logra import LoGraState, logra
from dattri_fn.model import functional_model
from problems import SeqNet

DT = torch.float64
seeds = st.integers(0, 2**16)


def _problem(kind, seed, n, bias=True, dim=3, hidden=5, classes=3, T=3):
    """(FunctionalModel with CE, batch): a tanh MLP on [n, dim] or SeqNet on [n, T, dim]."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.Tanh(),
                            nn.Linear(hidden, classes, bias=bias))
        x = torch.randn(n, dim, generator=g, dtype=DT)
        params = None
    else:
        net = SeqNet(dim, hidden, classes, bias)
        x = torch.randn(n, T, dim, generator=g, dtype=DT)
        params = lambda name: not name.startswith("norm.")
    y = torch.randint(0, classes, (n,), generator=g)
    return functional_model(net.to(DT).eval(), F.cross_entropy, params=params), (x, y)


def _layer_grad(grads, layer, bias):
    """[out, in(+1)]: example's gradient of [W | b]."""
    w = grads[f"{layer}.weight"]
    return torch.cat([w, grads[f"{layer}.bias"][:, None]], 1) if bias else w


@given(seed=seeds, kind=st.sampled_from(["mlp", "seq"]), bias=st.booleans(),
       proj=st.sampled_from([2, (2, 3), None]))
def test_features_are_the_projected_per_example_gradients(seed, kind, bias, proj):
    """phi_i = vec(P_out^T DW_i P_in) per layer, DW_i from torch.func.grad of one example's loss."""
    fm, (x, y) = _problem(kind, seed, 5, bias)
    state = logra(fm, proj_dim=proj, damping=0.1).prepare(fm.params, (x, y))
    layers = ["0", "2"] if kind == "mlp" else ["emb", "head"]
    assert list(state.eigvecs) == layers
    for i in range(5):
        grads = torch.func.grad(fm.loss)(fm.params, (x[i], y[i]))
        ref = []
        for layer in layers:
            DW = _layer_grad(grads, layer, bias)
            P_in, P_out = state.projections[layer]
            DW = DW if P_in is None else DW @ P_in
            ref.append((DW if P_out is None else P_out.T @ DW).flatten())
        torch.testing.assert_close(state.feature_rows(i, i + 1)[0], torch.cat(ref), rtol=1e-10, atol=1e-12)


@given(seed=seeds, kind=st.sampled_from(["mlp", "seq"]), bias=st.booleans(),
       damping=st.sampled_from([0.05, 1.0]))
def test_without_projection_logra_is_ekfac_influence(seed, kind, bias, damping):
    """proj_dim=None: s_ij = g_i^T (EK-FAC + damping I)^-1 g_j, the library's EK-FAC influence."""
    fm, (x, y) = _problem(kind, seed, 7, bias)
    train, test = [(x[:4], y[:4]), (x[4:], y[4:])], (x[:3], y[:3])
    m = logra(fm, proj_dim=None, damping=damping)
    S = m.score(fm.params, m.prepare(fm.params, train), train, test)
    ref = influence(fm, solver="ekfac", damping=damping)
    S_ref = ref.score(fm.params, ref.prepare(fm.params, train), train, test)
    torch.testing.assert_close(S, S_ref, rtol=1e-9, atol=1e-11 * float(S_ref.abs().max()))


@given(seed=seeds, kind=st.sampled_from(["mlp", "seq"]))
def test_self_score_top_k_and_uncached_features_agree_with_score(seed, kind):
    """self_score = diag(score(train, train)); top_k = topk of the full matrix; no cache = cache."""
    fm, (x, y) = _problem(kind, seed, 9)
    train = [(x[:5], y[:5]), (x[5:], y[5:])]
    m = logra(fm, proj_dim=2)
    state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, (x, y))
    torch.testing.assert_close(m.self_score(fm.params, state, train), S.diagonal(),
                               rtol=1e-10, atol=1e-12)
    top = m.score(fm.params, state, None, (x, y), top_k=3)
    torch.testing.assert_close(top.values, S.topk(3, dim=0).values, rtol=1e-12, atol=1e-14)
    bare = logra(fm, proj_dim=2, cache_features=False)
    bstate = bare.prepare(fm.params, train)
    assert bstate.train_features is None and bstate.train_factors is None and bstate.cached_rows() is None
    torch.testing.assert_close(bare.score(fm.params, bstate, train, (x, y)), S, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(bare.self_score(fm.params, bstate, train), S.diagonal(),
                               rtol=1e-10, atol=1e-12)
    assert bool((S.diagonal() > 0).all())  # (F' + damping)^-1 is positive definite


def test_bad_input_is_named():
    """A list of checkpoints, a foreign state, no loss_fn and left-out parameters are named."""
    fm, batch = _problem("seq", 0, 4)
    m = logra(fm)
    with pytest.raises(TypeError, match=r"logra.prepare\(params=...\): expected one params dict"):
        m.prepare([fm.params, fm.params], batch)
    with pytest.raises(TypeError, match=r"logra.score\(state=...\): expected the LoGraState"):
        m.score(fm.params, (), batch, batch)
    with pytest.raises(ValueError, match=r"logra\(model=...\): expected a FunctionalModel built "
                                         r"with a loss_fn"):
        logra(functional_model(fm.module))
    with pytest.warns(RuntimeWarning, match=r"parameters are left out: \['norm.weight', "
                                            r"'norm.bias'\]"):
        logra(functional_model(fm.module, F.cross_entropy))
    assert isinstance(m.prepare(fm.params, batch), LoGraState)


def test_logra_on_stock_gpt2_with_a_causal_lm_loss():
    """GPT-2 (HF Conv1D, default attention, padding): every Conv1D block projected, no fallback;
    unprojected it equals the library's EK-FAC influence on the same blocks."""
    transformers = pytest.importorskip("transformers")
    from dattri_fn.losses import causal_lm_loss

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0)).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    fm = functional_model(gpt2, causal_lm_loss, params=lambda n: n.startswith("transformer.h.")
                          and "ln_" not in n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = logra(fm, proj_dim=4)
        state = m.prepare(fm.params, batch)
        S = m.score(fm.params, state, batch, batch)
    assert len(state.eigvecs) == 8 and state.feature_rows().shape == (4, 8 * 16)
    torch.testing.assert_close(m.self_score(fm.params, state, batch), S.diagonal())
    exact = logra(fm, proj_dim=None, damping=0.1)
    ref = influence(fm, solver="ekfac", damping=0.1)
    torch.testing.assert_close(exact.score(fm.params, exact.prepare(fm.params, batch), batch, batch),
                               ref.score(fm.params, ref.prepare(fm.params, batch), batch, batch),
                               rtol=1e-8, atol=1e-10)


def test_logra_scores_from_a_feature_store(tmp_path):
    """cache_features=False: the projected train features written to a store while scoring, then
    read back with new test points, give the scores from the data exactly."""
    from dattri_fn.store import open_store, record_store

    fm, (x, y) = _problem("mlp", 3, 12)
    train = [(x[:6], y[:6]), (x[6:], y[6:])]
    m = logra(fm, proj_dim=2, cache_features=False)
    state = m.prepare(fm.params, train)
    cfg = {"method": "logra", "proj_dim": 2, "seed": 0}
    rec = record_store(tmp_path, train, params=fm.params, config=cfg)
    torch.testing.assert_close(m.score(fm.params, state, rec, (x[:3], y[:3])),
                               m.score(fm.params, state, train, (x[:3], y[:3])), rtol=0, atol=0)
    store = open_store(tmp_path, params=fm.params, config=cfg)
    torch.testing.assert_close(m.score(fm.params, state, store, (x[3:], y[3:])),
                               m.score(fm.params, state, train, (x[3:], y[3:])), rtol=0, atol=0)


def test_logra_self_score_from_a_feature_store(tmp_path):
    """s_ii = <DW'_i, (F' + damping)^-1 DW'_i>: self_score(record_store) writes it to <store>/self
    equal to self_score(train) bit for bit; self_score(open_store) reads it back with no training
    data; a state with another damping or another data order is refused by name."""
    from dattri_fn.store import open_store, record_store

    fm, (x, y) = _problem("mlp", 3, 12)
    train = [(x[:5], y[:5]), (x[5:9], y[5:9]), (x[9:], y[9:])]
    m = logra(fm, proj_dim=2, cache_features=False)
    state = m.prepare(fm.params, train)
    want = m.self_score(fm.params, state, train)
    cfg = {"method": "logra", "proj_dim": 2, "seed": 0}
    rec = record_store(tmp_path, train, params=fm.params, config=cfg)
    torch.testing.assert_close(m.self_score(fm.params, state, rec), want, rtol=0, atol=0)
    m.score(fm.params, state, rec, (x[:3], y[:3]))
    store = open_store(tmp_path, params=fm.params, config=cfg)
    torch.testing.assert_close(m.self_score(fm.params, state, store), want, rtol=0, atol=0)
    torch.testing.assert_close(m.score(fm.params, state, store, (x, y)).diagonal(), want,
                               rtol=1e-10, atol=1e-12)
    other = logra(fm, proj_dim=2, cache_features=False, damping=0.5)
    other_state = other.prepare(fm.params, train)
    with pytest.raises(ValueError, match=r"logra\.self_score\(state=...\): expected the state"):
        other.self_score(fm.params, other_state, store)
    with pytest.raises(ValueError, match=r"logra\.self_score\(data=...\): expected the rows of shard 0"):
        m.self_score(fm.params, state, record_store(tmp_path, train[::-1], params=fm.params,
                                                    config=cfg))


def test_zero_damping_with_a_softmax_null_direction_is_refused():
    """Review R6 F2 (stop 24): with ``damping=0`` and no projection on the last layer, softmax CE
    leaves a rounding-level eigenvalue (the logits' constant direction); dividing by it scored
    O(1) noise silently. It is refused naming ``damping``; a positive damping still works."""
    fm, batch = _problem("mlp", 0, 40)
    with pytest.raises(ValueError, match=r"logra.prepare\(damping=...\).*rounding level"):
        logra(fm, proj_dim=None, damping=0.0).prepare(fm.params, batch)
    state = logra(fm, proj_dim=None, damping=1e-3).prepare(fm.params, batch)
    assert all(bool((v > 0).all()) for v in state.eigvals.values())


def test_zero_damping_with_small_real_eigenvalues_is_kept_in_float32():
    """Review R8: a layer-size-scaled floor refused real, accurately computed small eigenvalues
    (inputs with column scales 1 .. 1e-2, MSE, no projection); float32 scores then matched
    float64's. Kept now, and the float32 scores still agree with float64's."""
    g = torch.Generator().manual_seed(0)
    n, d, o = 200, 32, 4
    x = torch.randn(n, d, generator=g, dtype=DT) * torch.logspace(0, -2, d, dtype=DT)
    y = x @ torch.randn(o, d, generator=g, dtype=DT).T + 0.1 * torch.randn(n, o, generator=g,
                                                                           dtype=DT)
    out = {}
    for dt in (torch.float64, torch.float32):
        torch.manual_seed(1)
        fm = functional_model(nn.Linear(d, o).to(DT).to(dt).eval(), F.mse_loss)
        m = logra(fm, proj_dim=None, damping=0.0)
        batch = (x.to(dt), y.to(dt))
        out[dt] = m.score(fm.params, m.prepare(fm.params, batch), batch,
                          (x[:20].to(dt), y[:20].to(dt))).double()
    assert torch.linalg.norm(out[torch.float32] - out[torch.float64]) \
        < 1e-3 * torch.linalg.norm(out[torch.float64])
