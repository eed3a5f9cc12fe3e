"""Review of the K-FAC/EK-FAC diagonal block (stop 20): a tied weight whose Linear holder comes
first (or two Linears sharing a weight) is no Kronecker layer when it cannot be pooled; its
params take the exact Fisher diagonal, and the capture does not pool it. References are float64
brute force (vmap(grad) of functional_call) and the dense block-diagonal matrix of the factors."""

import warnings

import pytest
import torch
from test_kfac_diag import DT, D, T, V, _dense, _grads, _offsets, lm_loss
from torch import nn

from dattri_fn.attribute import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import ekfac_factors, ihvp_ekfac, ihvp_kfac, kfac_factors, kfac_tap


class HeadFirst(nn.Module):
    """A biased Linear head declared before the Embedding it ties (the key is 'head.weight')."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, V)
        self.emb, self.fc = nn.Embedding(V, D), nn.Linear(D, D)
        self.emb.weight = self.head.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.fc(self.emb(idx))))


class SharedLinear(nn.Module):
    """Two Linears reading one weight (fc2.weight = fc1.weight): no embedding/linear pair."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, V)
        self.fc2.weight = self.fc1.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(self.emb(idx))))))


def _setup(cls, seed: int):
    g = torch.Generator().manual_seed(seed)
    model = cls().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / 2)
    ids = torch.randint(0, V, (6, T), generator=g)
    labels = torch.randint(0, V, (6, T), generator=g)
    return model, {k: v.detach() for k, v in model.named_parameters()}, (ids, labels)


@pytest.mark.parametrize("cls, kron, outside", [
    (HeadFirst, ["fc"], ["head.weight", "head.bias"]),
    (SharedLinear, ["head"], ["emb.weight", "fc1.weight", "fc1.bias", "fc2.bias"]),
])
@pytest.mark.parametrize("fit, inverse", [(kfac_factors, ihvp_kfac), (ekfac_factors, ihvp_ekfac)])
def test_unpoolable_tied_weight_of_a_linear_takes_the_diagonal_block(cls, kron, outside, fit,
                                                                     inverse):
    """A tied weight K-FAC cannot pool, owned by a Linear: that layer is no Kronecker layer; its
    weight (gradient summed over both uses) and bias have D = mean_n g_n^2 (1e-10), the inverse
    is the dense block-diagonal one (1e-10), one warning names them, the tap captures only the
    Kronecker layers."""
    model, params, data = _setup(cls, 0)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = fit(model, lm_loss, params, data)
    said = [str(w.message) for w in got]
    assert len(said) == 1 and "a tied weight K-FAC cannot pool" in said[0]
    assert all(repr(k) in said[0] for k in outside)
    assert list(f.A if hasattr(f, "A") else f.QA) == kron and list(f.diagonal) == outside
    assert kfac_tap(model, params).layers == kron and kfac_tap(model, params).tied == ()
    G = _grads(model, params, *data)
    off = _offsets(params)
    for k, d in f.diagonal.items():
        ref = G[:, off[k]:off[k] + d.numel()].square().mean(0).reshape(d.shape)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
    ref = _dense(f, params, 0.1)
    torch.testing.assert_close(inverse(f, damping=0.1).dense(), ref, rtol=0,
                               atol=1e-10 * float(ref.abs().max()))


def test_head_first_tied_weight_is_refused_by_error_and_by_explicit_layers():
    """others='error' refuses the unpoolable tied weight naming it and why; layers= naming its
    Linear is refused (no correct Kronecker block for it); without the bias it is pooled as the
    group 'head' (captured as both members)."""
    model, params, data = _setup(HeadFirst, 1)
    with pytest.raises(ValueError, match=r"kfac_factors\(params=...\): expected tied weights "
                                         r"that K-FAC/EK-FAC can pool.*'head.weight' shared by "
                                         r"'head' \(Linear\), 'emb' \(Embedding\): the bias"):
        kfac_factors(model, lm_loss, params, data, others="error")
    with pytest.raises(ValueError, match=r"ekfac_factors\(layers=...\): expected layers whose "
                                         r"weight is their own or a poolable tied group, got "
                                         r"'head': a tied weight K-FAC cannot pool"):
        ekfac_factors(model, lm_loss, params, data, layers=["head", "fc"], others="diagonal")
    nobias = {k: v for k, v in params.items() if k != "head.bias"}
    tap = kfac_tap(model, nobias)
    assert tap.layers == ["head", "emb", "fc"] and tap.tied == (("head", "emb"),)
    f = ekfac_factors(model, lm_loss, nobias, data, others="error")
    assert list(f.QA) == ["head", "fc"] and f.diagonal == {}


@pytest.mark.filterwarnings("ignore:layer_grads")
@pytest.mark.filterwarnings("ignore:influence")
@pytest.mark.filterwarnings("ignore:ekfac_factors")
def test_head_first_influence_scores_equal_the_dense_reference():
    """influence(solver='ekfac') on HeadFirst with every param: score = G_i^T M G_j and
    self_score = diag, M the dense block-diagonal inverse of the state's factors (1e-10)."""
    model, params, data = _setup(HeadFirst, 2)
    fm = functional_model(model, lm_loss)
    m = influence(fm, solver="ekfac", damping=0.1)
    state = m.prepare(fm.params, data)
    test = (data[0][:2], data[1][:2])
    S = m.score(fm.params, state, data, test)
    M = _dense(state.factors, fm.params, 0.1)
    G = _grads(model, fm.params, *data)
    ref = G @ M @ G[:2].T
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(m.self_score(fm.params, state, data), ((G @ M) * G).sum(1),
                               rtol=1e-10, atol=0)


def _layer_block(vec, params, off, layer) -> torch.Tensor:
    """A raveled [P] vector's [out, in(+1)] block of a Linear layer (bias as the last column)."""
    w = params[f"{layer}.weight"]
    W = vec[off[f"{layer}.weight"]:off[f"{layer}.weight"] + w.numel()].reshape(w.shape)
    b = vec[off[f"{layer}.bias"]:off[f"{layer}.bias"] + w.shape[0]]
    return torch.cat([W, b[:, None]], 1)


@pytest.mark.filterwarnings("ignore:layer_grads")  # the test side: pos read at [T] positions
def test_query_rank_one_truncates_kronecker_blocks_and_keeps_diagonal_groups_whole():
    """query_rank=1, per_layer=True: a Kronecker layer's part = <DW_i, svd_1(M_j)> with M_j the
    layer's block of (F + damping I)^-1 g_j (dense reference) and a diagonal group's part the
    exact g_i^T M g_j of its keys (1e-10); the exact and truncated Kronecker parts differ."""
    from test_kfac_diag import _problem

    model, ids, labels = _problem(12)
    fm = functional_model(model, lm_loss)
    train, test = (ids, labels), (ids[:3], labels[:3])
    exact = influence(fm, solver="ekfac", damping=0.1, others="diagonal", per_layer=True)
    state = exact.prepare(fm.params, train)
    ranked = influence(fm, solver="ekfac", damping=0.1, others="diagonal", per_layer=True,
                       query_rank=1)
    parts = ranked.score(fm.params, state, train, test)
    assert list(parts) == ["fc", "head", "tok", "pos", "ln"]
    G = _grads(model, fm.params, ids, labels)
    Q = G[:3] @ _dense(state.factors, fm.params, 0.1)  # [3, P]: M g_j (M symmetric)
    off = _offsets(fm.params)
    for layer in ("fc", "head"):
        U, S, Vh = torch.linalg.svd(torch.stack([_layer_block(q, fm.params, off, layer)
                                                 for q in Q]))
        M1 = (U[..., :1] * S[:, None, :1]) @ Vh[:, :1]  # [3, out, in + 1]
        DW = torch.stack([_layer_block(g, fm.params, off, layer) for g in G])
        ref = torch.einsum("ioc,joc->ij", DW, M1)
        torch.testing.assert_close(parts[layer], ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
        full = torch.einsum("ioc,joc->ij", DW, torch.stack(
            [_layer_block(q, fm.params, off, layer) for q in Q]))
        assert float((full - ref).abs().max()) > 1e-3 * float(full.abs().max())
    for group in ("tok", "pos", "ln"):
        sl = torch.cat([torch.arange(off[k], off[k] + v.numel()) for k, v in fm.params.items()
                        if k.startswith(group + ".")])
        ref = G[:, sl] @ Q[:, sl].T
        torch.testing.assert_close(parts[group], ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.filterwarnings("ignore:layer_grads")
def test_scoring_a_model_vmap_refuses_warns_once_per_call():
    """A model vmap refuses (.item()), scored over 4 training batches: one fallback warning per
    score / self_score call (not per batch), scores = the plain model's (1e-10)."""
    from test_kfac_diag import _Branchy as Branchy
    from test_kfac_diag import _problem

    model, ids, labels = _problem(13)
    branchy = Branchy().double().eval()
    branchy.load_state_dict(model.state_dict())
    fb, fm = functional_model(branchy, lm_loss), functional_model(model, lm_loss)
    batches = [(ids[i:i + 2], labels[i:i + 2]) for i in range(0, 8, 2)]
    test = (ids[:3], labels[:3])
    plain = influence(fm, solver="ekfac", damping=0.1, others="diagonal")
    state = plain.prepare(fm.params, batches)
    m = influence(fb, solver="ekfac", damping=0.1, others="diagonal")
    for call, ref in ((lambda: m.score(fb.params, state, batches, test),
                       plain.score(fm.params, state, batches, test)),
                      (lambda: m.self_score(fb.params, state, batches),
                       plain.self_score(fm.params, state, batches))):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            out = call()
        assert sum("vmap cannot run this model" in str(w.message) for w in got) == 1
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


def test_diagonal_pass_blocks_rows_by_the_entry_budget(monkeypatch):
    """_DIAG_ENTRIES = 3 numel(keys): the diagonal pass vmaps blocks of <= 3 examples (8 = 3 + 3
    + 2 per chunk); D = mean g^2 (1e-10) and, with fisher='true', the unblocked pass's D (the
    chunk's targets drawn once, before the split; 1e-12); influence scores, self-scores and
    per-layer parts equal the unblocked ones (1e-12)."""
    from test_kfac_diag import _problem

    from dattri_fn.operators import kfac_diag

    model, ids, labels = _problem(14)
    fm = functional_model(model, lm_loss)
    params = fm.params
    outside = ["tok.weight", "pos.weight", "ln.weight", "ln.bias"]
    p = sum(params[k].numel() for k in outside)

    def draw(out, target, gen):
        y = torch.multinomial(out.softmax(-1).reshape(-1, out.shape[-1]), 1,
                              generator=gen).reshape(target.shape)
        return y.masked_fill(target < 0, -100)

    def run():
        f = ekfac_factors(model, lm_loss, params, (ids, labels), others="diagonal")
        t = ekfac_factors(model, lm_loss, params, (ids, labels), others="diagonal",
                          fisher="true", seed=3, sampler=draw)
        m = influence(fm, solver="ekfac", damping=0.1, others="diagonal", per_layer=True)
        state = m.prepare(params, (ids, labels))
        test = (ids[:3], labels[:3])
        return f, t, m.score(params, state, (ids, labels), test), influence(
            fm, solver="ekfac", damping=0.1, others="diagonal").self_score(params, state,
                                                                           (ids, labels))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = run()
        sizes = []
        rows_of = kfac_diag.diagonal_rows

        def counted(module, loss_fn, state, keys, args, *rest, **kw):
            sizes.append(args[0].shape[0])
            return rows_of(module, loss_fn, state, keys, args, *rest, **kw)

        monkeypatch.setattr(kfac_diag, "diagonal_rows", counted)
        monkeypatch.setattr(kfac_diag, "_DIAG_ENTRIES", 3 * p)
        blocked = run()
    assert max(sizes) == 3 and sizes[:3] == [3, 3, 2]
    G = _grads(model, params, ids, labels)
    off = _offsets(params)
    for k in outside:
        d = blocked[0].diagonal[k]
        ref = G[:, off[k]:off[k] + d.numel()].square().mean(0).reshape(d.shape)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(blocked[1].diagonal[k], whole[1].diagonal[k], rtol=1e-12,
                                   atol=1e-14)
    for part in whole[2]:
        torch.testing.assert_close(blocked[2][part], whole[2][part], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocked[3], whole[3], rtol=1e-12, atol=0)


def test_diagonal_pass_tensor_peak_is_a_block_not_a_chunk():
    """An untied Embedding(4096, 64) in the diagonal block, one chunk of 16 float64 examples:
    the K-FAC call's exact tensor peak stays under 24 MiB (blocks of 2**20 // 262144 = 4 rows,
    8 MiB: 14.0 MiB measured), where one [16, 262144] chunk of per-example gradients alone is
    32 MiB (66 MiB measured before the blocks)."""
    from benchmarks.peak import tensor_peak

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(4096, 64), nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(self.emb(x)).mean(1)

    g = torch.Generator().manual_seed(15)
    model = LM().double().eval()
    x, y = torch.randint(0, 4096, (16, 4), generator=g), torch.randint(0, 3, (16,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f, peak = tensor_peak(lambda: kfac_factors(model, torch.nn.functional.cross_entropy, params,
                                               (x, y), others="diagonal"))
    assert list(f.diagonal) == ["emb.weight"] and f.diagonal["emb.weight"].abs().max() > 0
    assert peak < 24 * 2**20, peak / 2**20
