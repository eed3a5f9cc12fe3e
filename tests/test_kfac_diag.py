"""K-FAC/EK-FAC with params outside every Kronecker layer (issues 14/16): LayerNorms, a
positional Embedding, a bias without its weight take their exact Fisher diagonal as a block of
their own, combined block-diagonally with the Kronecker blocks, after ONE warning naming them.
References are float64 brute force built without the capture engine."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn.attribute import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import (
    ekfac_factors,
    ihvp_ekfac,
    ihvp_kfac,
    kfac_factors,
    kfac_operator,
    kfac_tap,
)

DT = torch.float64
V, D, T, C = 7, 4, 5, 7


def _rows(out, labels):
    """Per-sequence sum of token cross-entropies, -100 ignored.  # [B, T, V], [B, T] -> [B]"""
    keep = labels >= 0
    lp = out.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return -(lp * keep).sum(1)


def lm_loss(out, labels):
    return _rows(out, labels).sum()


lm_loss.per_example = _rows


class PosLM(nn.Module):
    """tok + pos embeddings -> LayerNorm -> tanh(fc) -> head; pos read by position ids."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln, self.fc, self.head = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(torch.tanh(self.fc(self.ln(h))))


def _problem(seed: int, n: int = 8):
    """A float64 PosLM with O(1) weights, ids and labels [n, T] (a few labels ignored)."""
    g = torch.Generator().manual_seed(seed)
    model = PosLM().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    ids = torch.randint(0, V, (n, T), generator=g)
    labels = torch.randint(0, C, (n, T), generator=g)
    labels[1, 3:] = -100
    return model, ids, labels


def _grads(model, params, ids, labels) -> torch.Tensor:
    """Raveled per-example gradients by vmap(grad) of functional_call.  # -> [n, P]"""
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}

    def one(p, x, y):
        return _rows(torch.func.functional_call(model, {**fixed, **p}, (x[None],)), y[None]).sum()

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, ids, labels)
    return torch.cat([g[k].flatten(1) for k in params], 1)


def _offsets(params) -> dict:
    out, at = {}, 0
    for k, v in params.items():
        out[k] = at
        at += v.numel()
    return out


def _dense(factors, params, damping: float | None) -> torch.Tensor:
    """The block-diagonal matrix from the factors' own blocks, each built densely: per layer
    K = kron(Q_G, Q_A) diag(s) kron(Q_G, Q_A)^T over row-major [out, in(+1)] (s = 1/(Lambda +
    damping), or Lambda itself for damping=None; K-FAC: inv(G (x) A + damping I) / G (x) A),
    placed at the weight's and bias's raveled indices; each diagonal key 1/(D + damping) (or D)."""
    off = _offsets(params)
    P = sum(v.numel() for v in params.values())
    M = torch.zeros(P, P, dtype=DT)
    layers = factors.A if hasattr(factors, "A") else factors.QA
    for layer in layers:
        wk, bk = f"{layer}.weight", f"{layer}.bias"
        out, inp = params[wk].shape
        bias = bk in params
        if hasattr(factors, "A"):
            K = torch.kron(factors.G[layer], factors.A[layer])
            if damping is not None:
                K = torch.linalg.inv(K + damping * torch.eye(len(K), dtype=DT))
        else:
            Q = torch.kron(factors.QG[layer], factors.QA[layer])
            lam = factors.Lambda[layer].reshape(-1)
            K = Q @ torch.diag(lam if damping is None else 1 / (lam + damping)) @ Q.T
        idx = [off[wk] + o * inp + i if i < inp else off[bk] + o
               for o in range(out) for i in range(inp + bias)]
        idx = torch.tensor(idx)
        M[idx[:, None], idx[None]] = K
    for k, d in factors.diagonal.items():
        sl = torch.arange(off[k], off[k] + d.numel())
        M[sl, sl] = d.reshape(-1) if damping is None else 1 / (d.reshape(-1) + damping)
    return M


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("fit, inverse", [(kfac_factors, ihvp_kfac), (ekfac_factors, ihvp_ekfac)])
def test_diagonal_block_is_the_fisher_diagonal_and_the_inverse_is_block_diagonal(fit, inverse):
    """Default params (tok, pos, LayerNorm outside the Kronecker layers): D = mean_n g_n^2 of
    those keys, and the inverse / the operator equal blockdiag(Kronecker blocks, diag(1/(D +
    damping))) / blockdiag(blocks, diag(D)) built densely from the same factors (1e-10)."""
    model, ids, labels = _problem(0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = _quiet(fit, model, lm_loss, params, (ids, labels), chunk_size=3)
    assert list(f.diagonal) == ["tok.weight", "pos.weight", "ln.weight", "ln.bias"]
    G = _grads(model, params, ids, labels)
    off = _offsets(params)
    for k, d in f.diagonal.items():
        ref = G[:, off[k]:off[k] + d.numel()].square().mean(0).reshape(d.shape)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
    ref = _dense(f, params, 0.1)
    torch.testing.assert_close(inverse(f, damping=0.1).dense(), ref, rtol=0,
                               atol=1e-10 * float(ref.abs().max()))
    fwd = _dense(f, params, None)
    torch.testing.assert_close(kfac_operator(f).dense(), fwd, rtol=0,
                               atol=1e-10 * float(fwd.abs().max()))


def test_one_warning_names_the_keys_and_others_selects_the_behaviour():
    """Default: exactly one warning, naming every key outside the Kronecker layers and why;
    others='diagonal': the same factors, no warning; others='error': refused, naming them; a
    Linear left out of layers= is named too; the Kronecker layers' factors equal those of the
    params without these keys (bit for bit)."""
    model, ids, labels = _problem(1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = ekfac_factors(model, lm_loss, params, (ids, labels))
    assert len(got) == 1
    text = str(got[0].message)
    for key in ("'tok.weight'", "'pos.weight'", "'ln.weight'", "'ln.bias'", "nn.Embedding",
                "LayerNorm", "others='error'"):
        assert key in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = ekfac_factors(model, lm_loss, params, (ids, labels), others="diagonal")
    assert all(torch.equal(f.diagonal[k], g.diagonal[k]) for k in f.diagonal)
    with pytest.raises(ValueError, match=r"ekfac_factors\(params=...\): expected only weights/"
                                         r"biases.*other keys \['tok.weight', 'pos.weight', "
                                         r"'ln.weight', 'ln.bias'\].*others='diagonal'"):
        ekfac_factors(model, lm_loss, params, (ids, labels), others="error")
    with pytest.warns(UserWarning, match=r"its layer 'head' is not among the selected layers: "
                                         r"\['head.weight', 'head.bias'\]"):
        part = kfac_factors(model, lm_loss, params, (ids, labels), layers=["fc"])
    assert list(part.A) == ["fc"] and "head.bias" in part.diagonal
    kron = {k: v for k, v in params.items() if k not in f.diagonal}
    h = ekfac_factors(model, lm_loss, kron, (ids, labels))
    assert h.diagonal == {} and list(h.QA) == list(f.QA) == ["fc", "head"]
    for field in ("QA", "QG", "Lambda"):
        assert all(torch.equal(getattr(f, field)[k], getattr(h, field)[k]) for k in h.QA)


@pytest.mark.parametrize("solver, l2", [("ekfac", 0.0), ("kfac", 0.0), ("ekfac", 0.05)])
def test_influence_scores_equal_the_dense_block_diagonal_reference(solver, l2):
    """influence(fm, solver) with default params: score = (g_i + 2 l2 p)^T M g_j (damping + 2 l2
    in M, as for every Gauss-Newton solver), self_score =
    diag, per_layer parts (Kronecker layers and diagonal groups) summing to the score, with M
    the dense block-diagonal inverse of the state's factors and g by vmap(grad) (1e-10)."""
    model, ids, labels = _problem(2)
    fm = functional_model(model, lm_loss)
    train, test = (ids, labels), (ids[:3], labels[:3])
    m = influence(fm, solver=solver, damping=0.1, l2=l2, chunk_size=3)
    state = _quiet(m.prepare, fm.params, train)
    S = _quiet(m.score, fm.params, state, train, test)
    M = _dense(state.factors, fm.params, 0.1 + 2 * l2)  # the Gauss-Newton's l2: 2 l2 I
    G = _grads(model, fm.params, ids, labels)
    p = torch.cat([v.reshape(-1) for v in fm.params.values()])
    ref = (G + 2 * l2 * p) @ M @ G[:3].T
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    if l2 == 0:
        self_ref = ((G @ M) * G).sum(1)
        torch.testing.assert_close(_quiet(m.self_score, fm.params, state, train), self_ref,
                                   rtol=1e-10, atol=0)
        per = influence(fm, solver=solver, damping=0.1, per_layer=True)
        parts = _quiet(per.score, fm.params, state, train, test)
        assert list(parts) == ["fc", "head", "tok", "pos", "ln"]
        torch.testing.assert_close(sum(parts.values()), ref, rtol=0,
                                   atol=1e-10 * float(ref.abs().max()))


def test_true_fisher_diagonal_uses_the_factor_passes_draws():
    """fisher='true': D = mean_n g_n(y~_n)^2 with y~ the targets the sampler draws from the
    model's output, the same draws as the Lambda pass (1e-10)."""
    model, ids, labels = _problem(3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def draw(out, target, gen):
        y = torch.multinomial(out.softmax(-1).reshape(-1, C), 1, generator=gen).reshape(target.shape)
        return y.masked_fill(target < 0, -100)

    f = ekfac_factors(model, lm_loss, params, (ids, labels), fisher="true", seed=4, sampler=draw,
                      others="diagonal")
    with torch.no_grad():
        drawn = draw(model(ids), labels, torch.Generator().manual_seed(4))
    G = _grads(model, params, ids, drawn)
    off = _offsets(params)
    for k, d in f.diagonal.items():
        ref = G[:, off[k]:off[k] + d.numel()].square().mean(0).reshape(d.shape)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)


def test_expected_fisher_with_diagonal_keys_is_refused():
    """fisher='expected' with params outside the Kronecker layers is refused, naming them."""
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    params = {k: v.detach() for k, v in net.named_parameters()}
    with pytest.raises(ValueError, match=r"kfac_factors\(fisher=...\): expected 'empirical' or "
                                         r"'true' with params outside.*\['1.weight', '1.bias'\]"):
        kfac_factors(net, F.cross_entropy, params, (x, y), fisher="expected", others="diagonal")


@pytest.mark.filterwarnings("ignore:layer_grads")  # the test side: pos read at [T] positions
def test_every_param_outside_kronecker_layers_is_the_diagonal_fisher():
    """params = the LayerNorm and the positional embedding only: the inverse is diag(1/(D +
    damping)) and influence scores equal g_i^T diag(1/(D + damping)) g_j (1e-10)."""
    model, ids, labels = _problem(4)
    keys = ["pos.weight", "ln.weight", "ln.bias"]
    fm = functional_model(model, lm_loss, params=lambda n: n in keys)
    f = ekfac_factors(model, lm_loss, fm.params, (ids, labels), others="diagonal")
    assert f.QA == {} and list(f.diagonal) == keys
    G = _grads(model, fm.params, ids, labels)
    d = G.square().mean(0)
    torch.testing.assert_close(ihvp_ekfac(f, damping=0.1).dense(), torch.diag(1 / (d + 0.1)),
                               rtol=1e-10, atol=0)
    m = influence(fm, solver="ekfac", damping=0.1, others="diagonal")
    state = m.prepare(fm.params, (ids, labels))
    ref = G / (d + 0.1) @ G[:2].T
    torch.testing.assert_close(m.score(fm.params, state, (ids, labels), (ids[:2], labels[:2])),
                               ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    assert kfac_tap(model, fm.params).layers == []


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=6, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[2, 3:] = 0  # right padding, its labels ignored
    return model, {"input_ids": ids, "attention_mask": mask,
                   "labels": ids.masked_fill(mask == 0, -100)}


def _autograd_rows(model, batch, keys, loss) -> torch.Tensor:
    """Raveled per-example gradients of ``keys``, one stock autograd backward per sequence."""
    own = dict(model.named_parameters())
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        loss(model(input_ids=batch["input_ids"][i:i + 1],
                   attention_mask=batch["attention_mask"][i:i + 1]),
             batch["labels"][i:i + 1]).backward()
        rows.append(torch.cat([own[k].grad.reshape(-1) for k in keys]))
    return torch.stack(rows)


@pytest.mark.filterwarnings("ignore:layer_grads")  # the raveled test side loops (sdpa, wpe)
def test_stock_gpt2_with_default_params_runs_and_splits_into_its_blocks():
    """Tiny stock GPT-2, EVERY parameter (wte = lm_head pooled, Conv1Ds, and wpe / LayerNorms
    outside the Kronecker layers): influence(solver='ekfac') runs with one warning naming the
    outside keys; the Kronecker factors equal the restricted-params run's (bit for bit); D is the
    mean of per-example autograd g^2 (1e-10); and the scores are the restricted run's plus
    g_i^T diag(1/(D + damping)) g_j of the outside keys (1e-9)."""
    from dattri_fn.losses import causal_lm_loss

    model, batch = _gpt2()
    fm = functional_model(model, causal_lm_loss)
    outside = ["transformer.wpe.weight", "transformer.h.0.ln_1.weight",
               "transformer.h.0.ln_1.bias", "transformer.h.0.ln_2.weight",
               "transformer.h.0.ln_2.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    m = influence(fm, solver="ekfac", damping=0.1)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        state = m.prepare(fm.params, batch)
        S = m.score(fm.params, state, batch, batch)
    said = [str(w.message) for w in got if "params are outside the" in str(w.message)]
    assert len(said) == 1 and all(repr(k) in said[0] for k in outside)
    ef = state.factors
    assert list(ef.diagonal) == outside
    kron = functional_model(model, causal_lm_loss, params=lambda n: n not in outside)
    mk = influence(kron, solver="ekfac", damping=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = mk.prepare(kron.params, batch)
        Sk = mk.score(kron.params, sk, batch, batch)
    for field in ("QA", "QG", "Lambda"):
        ours, ref = getattr(ef, field), getattr(sk.factors, field)
        assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    G = _autograd_rows(model, batch, outside, causal_lm_loss)
    d = torch.cat([ef.diagonal[k].reshape(-1) for k in outside])
    torch.testing.assert_close(d, G.square().mean(0), rtol=1e-10, atol=1e-14)
    ref = Sk + G / (d + 0.1) @ G.T
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))


def test_tied_head_with_its_bias_takes_the_diagonal_block():
    """A weight tied between an Embedding and a biased Linear head cannot be pooled (the bias is
    in params): by default the weight and the bias take the diagonal block (D = mean g^2, the
    weight's gradient summing both uses) and the inverse equals the dense block-diagonal one."""
    class TiedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.fc(self.emb(idx))))

    g = torch.Generator().manual_seed(6)
    model = TiedBias().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    ids = torch.randint(0, V, (6, T), generator=g)
    labels = torch.randint(0, V, (6, T), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.warns(UserWarning, match=r"a tied weight K-FAC cannot pool: the bias "
                                         r"\['head.bias'\].*\['emb.weight'\]; the bias of "
                                         r"'head', whose weight is not in params: "
                                         r"\['head.bias'\]"):
        f = ekfac_factors(model, lm_loss, params, (ids, labels))
    assert list(f.diagonal) == ["emb.weight", "head.bias"] and list(f.QA) == ["fc"]
    G = _grads(model, params, ids, labels)
    off = _offsets(params)
    for k, d in f.diagonal.items():
        ref = G[:, off[k]:off[k] + d.numel()].square().mean(0).reshape(d.shape)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
    ref = _dense(f, params, 0.1)
    torch.testing.assert_close(ihvp_ekfac(f, damping=0.1).dense(), ref, rtol=0,
                               atol=1e-10 * float(ref.abs().max()))


@pytest.mark.slow  # ~2 s of its own, ~6 s more alone (the explicit solve's first torch.func imports)
@pytest.mark.filterwarnings("ignore:layer_grads")
@pytest.mark.filterwarnings("ignore:gauss_newton")
def test_ekfac_preconditioned_cg_with_diagonal_keys_solves_the_gauss_newton():
    """CG on the Gauss-Newton with M='ekfac' built with default params (the diagonal block a
    part of M) gives the explicit solve's scores G_i^T (GN + damping I)^-1 G_j (1e-8)."""
    model, ids, labels = _problem(7, n=6)
    fm = functional_model(model, lm_loss)
    train, test = (ids, labels), (ids[:2], labels[:2])
    ref_m = influence(fm, solver="explicit", damping=1.0)
    ref = ref_m.score(fm.params, ref_m.prepare(fm.params, train), train, test)
    m = influence(fm, solver="cg", damping=1.0, M="ekfac", rtol=1e-12, max_iter=300)
    with pytest.warns(UserWarning, match=r"params are outside the Kronecker"):
        state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, test)
    torch.testing.assert_close(S, ref, rtol=0, atol=1e-8 * float(ref.abs().max()))


@pytest.mark.filterwarnings("ignore:layer_grads")  # the test side: pos read at [T] positions
def test_query_rank_and_bfloat16_storage_keep_the_diagonal_block():
    """query_rank >= every layer's rank keeps every block whole: the scores equal the exact ones
    (1e-10), the diagonal groups passed through untruncated; dtype=bfloat16 stores D in
    bfloat16 and the inverse applies 1/(D + damping) computed in float32 from it (1e-6)."""
    model, ids, labels = _problem(8)
    fm = functional_model(model, lm_loss)
    train, test = (ids, labels), (ids[:3], labels[:3])
    exact = influence(fm, solver="ekfac", damping=0.1, others="diagonal")
    state = exact.prepare(fm.params, train)
    ref = exact.score(fm.params, state, train, test)
    ranked = influence(fm, solver="ekfac", damping=0.1, others="diagonal", query_rank=5)
    torch.testing.assert_close(ranked.score(fm.params, state, train, test), ref, rtol=0,
                               atol=1e-10 * float(ref.abs().max()))
    f16 = ekfac_factors(model, lm_loss, fm.params, train, others="diagonal", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in f16.diagonal.values())
    off = _offsets(fm.params)
    V = torch.randn(2, sum(v.numel() for v in fm.params.values()), dtype=DT,
                    generator=torch.Generator().manual_seed(0))
    out = ihvp_ekfac(f16, damping=0.1)(V)
    for k, d in f16.diagonal.items():
        sl = slice(off[k], off[k] + d.numel())
        want = V[:, sl] / (d.float().reshape(-1).double() + 0.1)
        torch.testing.assert_close(out[:, sl], want, rtol=1e-6, atol=0)


class _Branchy(PosLM):
    """PosLM whose forward reads a value (.item()): vmap refuses it; its position lookup is
    copied (``.clone()``) before it meets the batch, which the capture engine does not follow,
    so the diagonal pass loops for ``pos.weight`` (the same function as PosLM's)."""

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)).clone()
        out = self.head(torch.tanh(self.fc(self.ln(h))))
        return out if float(idx.sum().item()) >= 0 else -out


def test_a_model_vmap_refuses_loops_once_with_one_warning_and_the_same_diagonal():
    """vmap cannot run the model (.item()) and the capture cannot take ``pos``: one warning per
    pass, naming pos.weight and why; pos's per-example gradients by one backward each, the
    other keys captured, and fisher='true' D = mean g(y~)^2 over the drawn targets (1e-10)."""
    model, ids, labels = _problem(10)
    branchy = _Branchy().double().eval()
    branchy.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in branchy.named_parameters()}

    def draw(out, target, gen):
        y = torch.multinomial(out.softmax(-1).reshape(-1, C), 1, generator=gen).reshape(target.shape)
        return y.masked_fill(target < 0, -100)

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = kfac_factors(branchy, lm_loss, params, (ids, labels), fisher="true", seed=5,
                         sampler=draw, chunk_size=3, others="diagonal")
    loops = [str(w.message) for w in got if "vmap cannot run this model" in str(w.message)]
    assert len(loops) == 1 and len(got) == 1
    assert "['pos.weight']" in loops[0] and "pos: its indices are not batch-first" in loops[0]
    with torch.no_grad():
        drawn = torch.cat([draw(model(ids[r:r + 3]), labels[r:r + 3], g) for g in
                           [torch.Generator().manual_seed(5)] for r in range(0, 8, 3)])
    G = _grads(model, params, ids, drawn)
    off = _offsets(params)
    for k, d in f.diagonal.items():
        ref = G[:, off[k]:off[k] + d.numel()].square().mean(0).reshape(d.shape)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
