"""K-FAC/EK-FAC influence scored layer by layer (issue 16): equal to the raveled product
``G_train (F + damping I)^-1 G_test^T`` in float64, per-layer scores summing to it, precomputed
factors in place of the training data (issue 17), the statistics-reduction hook and 16-bit
factors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri_fn import io
from dattri_fn.attribute import influence
from dattri_fn.model import functional_model
from dattri_fn.operators.kfac import (
    EKFACFactors,
    KFACFactors,
    ekfac_factors,
    ihvp_ekfac,
    kfac_factors,
    layer_scores,
    layer_self_scores,
)
from dattri_fn.store import stats_store
from dattri_fn.transforms.grad import per_sample_grad
from dattri_fn.transforms.layers import layer_io
from problems import SeqNet

DT = torch.float64
SOLVERS = ("kfac", "ekfac")


def _seq(seed: int, bias: bool = True, n: int = 10, T: int = 5):
    """SeqNet (Linear over T tokens, LayerNorm, Linear head) with its Linear layers attributed,
    two training batches and four test sequences."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = SeqNet(3, 5, 4, bias).double()
    fm = functional_model(net, F.cross_entropy, params=lambda k: not k.startswith("norm"))
    x = torch.randn(n, T, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (n,), generator=g)
    return fm, [(x[:6], y[:6]), (x[6:], y[6:])], (x[:4] + 0.1, y[:4]), (x, y)


def _mlp(seed: int, n: int = 12):
    """A tanh MLP on [B, 4] inputs (flat layers), CE loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fm = functional_model(net, F.cross_entropy)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return fm, [(x[:5], y[:5]), (x[5:], y[5:])], (x[:3] - 0.2, y[:3]), (x, y)


PROBLEMS = {"seq": _seq, "mlp": _mlp}


def _dense(fm, state, whole, test, l2=0.0):
    """``(G + 2 l2 p) ihvp(G_test)^T`` from vmap(grad) rows.  # -> [n_train, n_test]"""
    G = per_sample_grad(fm.loss, fm.params, whole)
    if l2:
        G = G + 2 * l2 * torch.cat([v.reshape(-1) for v in fm.params.values()])
    return G @ state.ihvp(per_sample_grad(fm.loss, fm.params, test)).T


def _close(S, R, tol=1e-10):
    torch.testing.assert_close(S, R, rtol=0, atol=tol * float(R.abs().max()))


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_by_layer_scores_equal_the_raveled_product(problem, solver, seed):
    """score = G_train (F + damping I)^-1 G_test^T, with and without chunk_size, to 1e-10."""
    fm, train, test, whole = PROBLEMS[problem](seed)
    for chunk in (None, 3):
        m = influence(fm, solver=solver, damping=0.1, chunk_size=chunk)
        state = m.prepare(fm.params, train)
        _close(m.score(fm.params, state, train, test), _dense(fm, state, whole, test))


@pytest.mark.parametrize("solver", SOLVERS)
def test_layer_by_layer_with_l2_self_scores_and_top_k(solver):
    """With l2: rows (g_i + 2 l2 p); self_score = diag(G ihvp(G)^T); top_k = topk of the full
    matrix (1e-10)."""
    fm, train, test, whole = _seq(3)
    m = influence(fm, solver=solver, damping=0.05, l2=0.01)
    state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, test)
    _close(S, _dense(fm, state, whole, test, l2=0.01))
    top = m.score(fm.params, state, train, test, top_k=3)
    assert torch.equal(top.indices, S.topk(3, dim=0).indices)
    m0 = influence(fm, solver=solver, damping=0.05)
    s0 = m0.prepare(fm.params, train)
    G = per_sample_grad(fm.loss, fm.params, whole)
    _close(m0.self_score(fm.params, s0, train), (G * s0.ihvp(G)).sum(1))


@pytest.mark.parametrize("solver", SOLVERS)
def test_checkpoint_list_scored_layer_by_layer_is_the_mean(solver):
    """Two checkpoints: score = mean_c G_c ihvp_c(G_test,c)^T (1e-10)."""
    fm, train, test, whole = _seq(4)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9),
                                       dtype=DT) for k, v in fm.params.items()}
    m = influence(fm, solver=solver, damping=0.1)
    state = m.prepare([fm.params, other], train)
    S = m.score([fm.params, other], state, train, test)
    refs = []
    for p, st in zip([fm.params, other], state.states, strict=True):
        refs.append(per_sample_grad(fm.loss, p, whole) @ st.ihvp(per_sample_grad(fm.loss, p, test)).T)
    _close(S, (refs[0] + refs[1]) / 2)


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_layer_scores_sum_to_the_score(solver):
    """per_layer=True: {layer: G_l ihvp(G_test)_l^T}, each equal to its block of the raveled
    product, summing to the plain score (1e-10), with l2 split by layer too."""
    fm, train, test, whole = _seq(5)
    m = influence(fm, solver=solver, damping=0.1, l2=0.02)
    mp = influence(fm, solver=solver, damping=0.1, l2=0.02, per_layer=True)
    state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, test)
    D = mp.score(fm.params, state, train, test)
    assert list(D) == ["emb", "head"]
    _close(sum(D.values()), S)
    G = per_sample_grad(fm.loss, fm.params, whole) + 0.04 * torch.cat(
        [v.reshape(-1) for v in fm.params.values()])
    Q = state.ihvp(per_sample_grad(fm.loss, fm.params, test))
    start = 0
    for layer in ("emb", "head"):
        size = sum(v.numel() for k, v in fm.params.items() if k.startswith(layer + "."))
        _close(D[layer], G[:, start:start + size] @ Q[:, start:start + size].T)
        start += size


def test_per_layer_errors():
    """per_layer needs kfac/ekfac, no relatif, the FunctionalModel as loss, no top_k."""
    fm, train, test, _ = _seq(0)
    with pytest.raises(ValueError, match=r"influence\(per_layer=...\): expected solver 'kfac' or "
                                         r"'ekfac'"):
        influence(fm, solver="cg", per_layer=True)
    with pytest.raises(ValueError, match=r"influence\(per_layer=...\): expected relatif=None"):
        influence(fm, solver="ekfac", per_layer=True, relatif="l")
    with pytest.raises(ValueError, match=r"influence\(per_layer=...\): expected loss to be the "
                                         r"FunctionalModel"):
        influence(fm.loss, solver="ekfac", model=fm, per_layer=True)
    with pytest.raises(TypeError, match=r"influence\(per_layer=...\): expected a bool"):
        influence(fm, solver="ekfac", per_layer=1)
    m = influence(fm, solver="ekfac", per_layer=True)
    state = m.prepare(fm.params, train)
    with pytest.raises(ValueError, match=r"if_ekfac\(top_k=...\): expected None with per_layer"):
        m.score(fm.params, state, train, test, top_k=2)


def test_layer_scores_and_self_scores_against_dense_blocks():
    """layer_scores: <sum_t g_t a_t^T, M_j> per layer; layer_self_scores: <DW, ihvp(DW)> per
    layer, for a sequence layer with bias (1e-12)."""
    fm, train, test, whole = _seq(6)
    ek = ekfac_factors(fm.module, F.cross_entropy, fm.params, train)
    inv = ihvp_ekfac(ek, damping=0.1)
    io_ = layer_io(fm.module, F.cross_entropy, ["emb", "head"], fm.params, whole)
    G = per_sample_grad(fm.loss, fm.params, whole)
    V = torch.randn(3, G.shape[1], generator=torch.Generator().manual_seed(0), dtype=DT)
    per = layer_scores(io_, inv.blocks(V))
    _close(sum(per.values()), G @ V.T, 1e-12)
    diag = layer_self_scores(inv, io_)
    _close(sum(diag.values()), (G * inv(G)).sum(1), 1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_prepare_takes_precomputed_factors(solver, tmp_path):
    """prepare(params, factors) -- the factors given, saved and loaded by io, or cached by
    stats_store (computed once, the second call reads them) -- scores bit for bit as
    prepare(params, train)."""
    fm, train, test, _ = _seq(7)
    m = influence(fm, solver=solver, damping=0.1)
    state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, test)
    fit = kfac_factors if solver == "kfac" else ekfac_factors
    io.save(state.factors, tmp_path / "f.pt")
    loaded = io.load(tmp_path / "f.pt")
    assert torch.equal(m.score(fm.params, m.prepare(fm.params, loaded), train, test), S)
    calls = []

    def compute():
        calls.append(1)
        return fit(fm.module, F.cross_entropy, fm.params, train)

    for _ in range(2):
        factors = stats_store(tmp_path / "stats", compute, params=fm.params,
                              config={"solver": solver})
        assert torch.equal(m.score(fm.params, m.prepare(fm.params, factors), train, test), S)
    assert len(calls) == 1
    # one factors object per checkpoint
    ens = m.prepare([fm.params, fm.params], [loaded, loaded])
    assert torch.equal(m.score([fm.params, fm.params], ens, train, test), S)


def test_prepare_with_factors_errors():
    """Factors of the other kind, of other params or one per checkpoint missing are named."""
    fm, train, _, _ = _seq(8)
    ek = ekfac_factors(fm.module, F.cross_entropy, fm.params, train)
    kf = kfac_factors(fm.module, F.cross_entropy, fm.params, train)
    with pytest.raises(TypeError, match=r"if_ekfac\(train=...\): expected training data or "
                                        r"EKFACFactors \(solver 'ekfac'\), got KFACFactors"):
        influence(fm, solver="ekfac").prepare(fm.params, kf)
    head = {k: v for k, v in fm.params.items() if k.startswith("head")}
    fm_head = functional_model(fm.module, F.cross_entropy, params=lambda k: k.startswith("head"))
    with pytest.raises(ValueError, match=r"if_ekfac\(train=...\): expected factors of the params"):
        influence(fm_head, solver="ekfac").prepare(head, ek)
    with pytest.raises(ValueError, match=r"if_kfac\(train=...\): expected 2 factors"):
        influence(fm, solver="kfac").prepare([fm.params, fm.params], [kf])
    assert isinstance(ek, EKFACFactors) and isinstance(kf, KFACFactors)


def test_reduce_hook_sums_statistics_across_shards():
    """K-FAC: reduce(sums, n) adding a second shard's sums gives the factors of both shards
    (1e-12): the hook sees sums and counts, not means. EK-FAC calls it twice (K-FAC pass, then
    Lambda; the K-FAC call carries each layer's R count), and an identity hook changes nothing
    (bit for bit)."""
    fm, train, _, _ = _seq(9)
    seen = []

    def record(sums, n):
        seen.append((dict(sums), n))
        return sums, n

    kfac_factors(fm.module, F.cross_entropy, fm.params, [train[1]], reduce=record)
    other, m = seen.pop()
    got = kfac_factors(fm.module, F.cross_entropy, fm.params, [train[0]],
                       reduce=lambda s, n: ({k: v + other[k] for k, v in s.items()}, n + m))
    whole = kfac_factors(fm.module, F.cross_entropy, fm.params, train)
    assert int(got.num_examples) == 10
    for k in whole.A:
        _close(got.A[k], whole.A[k], 1e-12)
        _close(got.G[k], whole.G[k], 1e-12)
    ek = ekfac_factors(fm.module, F.cross_entropy, fm.params, train, reduce=record)
    assert [sorted({key.split(":")[0] for key in s}) for s, _ in seen] == [["A", "G", "R"], ["L"]]
    plain = ekfac_factors(fm.module, F.cross_entropy, fm.params, train)
    for k in plain.Lambda:
        assert torch.equal(ek.Lambda[k], plain.Lambda[k])
    with pytest.raises(TypeError, match=r"kfac_factors\(reduce=...\): expected None or a callable"):
        kfac_factors(fm.module, F.cross_entropy, fm.params, train, reduce=3)
    with pytest.raises(TypeError, match=r"kfac_factors\(reduce=...\): expected a callable "
                                        r"\(sums, count\) -> \(sums with the same keys"):
        kfac_factors(fm.module, F.cross_entropy, fm.params, train, reduce=lambda s, n: s)


def test_reduced_dtype_factors_and_scores():
    """dtype=float32 on a float64 model: factors stored in float32, scores within 1e-5 of
    float64; bfloat16 factors and products: Pearson > 0.99 and dtype bfloat16; a non-float
    dtype is refused."""
    fm, train, test, _ = _seq(10)
    ref_m = influence(fm, solver="ekfac", damping=0.1)
    R = ref_m.score(fm.params, ref_m.prepare(fm.params, train), train, test)
    m32 = influence(fm, solver="ekfac", damping=0.1, dtype=torch.float32)
    st32 = m32.prepare(fm.params, train)
    assert st32.factors.QA["emb"].dtype == torch.float32
    torch.testing.assert_close(m32.score(fm.params, st32, train, test), R, rtol=1e-4,
                               atol=1e-5 * float(R.abs().max()))
    mb = influence(fm, solver="ekfac", damping=0.1, dtype=torch.bfloat16)
    stb = mb.prepare(fm.params, train)
    assert stb.factors.Lambda["head"].dtype == torch.bfloat16
    Sb = mb.score(fm.params, stb, train, test)
    assert Sb.dtype == DT
    assert float(torch.corrcoef(torch.stack([Sb.flatten(), R.flatten()]))[0, 1]) > 0.99
    kb = kfac_factors(fm.module, F.cross_entropy, fm.params, train, dtype=torch.bfloat16)
    assert kb.A["emb"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"ekfac_factors\(dtype=...\): expected None or a "
                                        r"floating torch.dtype"):
        ekfac_factors(fm.module, F.cross_entropy, fm.params, train, dtype=torch.int64)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=6, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (6, 5), generator=g)
    return model, {"input_ids": ids, "labels": ids}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings("ignore:layer_grads")  # the raveled test side: wte by vmap(grad)
def test_tied_gpt2_embedding_is_pooled_and_every_selection_scores_exactly():
    """Tiny GPT-2 (wte tied to lm_head): EK-FAC with the tied weight in params pools its two
    uses into one layer (tests/test_kfac_tied.py checks it against brute force) and the
    layer-by-layer scores equal the raveled product (1e-10), as they do without it (every
    Conv1D); the factored Hessian (tied=False selection) still refuses the tie, naming both
    uses."""
    from dattri_fn.losses import causal_lm_loss
    from dattri_fn.operators.kfac import _select

    model, batch = _gpt2()
    fm = functional_model(model, causal_lm_loss, params=lambda n: "wte" in n or "c_fc" in n)
    with pytest.raises(ValueError, match=r"f\(params=...\): expected weights used by one layer "
                                         r"each, got 'transformer.wte.weight' shared by "
                                         r"'transformer.wte' \(Embedding\), 'lm_head' \(Linear\)"):
        _select("f", model, fm.params, None)
    assert _select("f", model, fm.params, None, tied=True)[0] == ["transformer.wte",
                                                                  "transformer.h.0.mlp.c_fc"]
    for select in (lambda n: "wte" in n or "c_fc" in n,
                   lambda n: n.endswith(("c_fc.weight", "c_proj.weight", "c_attn.weight",
                                         "c_attn.bias"))):
        fm = functional_model(model, causal_lm_loss, params=select)
        m = influence(fm, solver="ekfac", damping=0.1)
        state = m.prepare(fm.params, batch)
        _close(m.score(fm.params, state, batch, batch), _dense(fm, state, batch, batch))


def test_streamed_io_gives_batched_io_layer_by_layer():
    """streamed_io calls step(layer, a, g) once per layer with batched_io's (a, g) (bit for bit);
    with on_input, a goes to on_input after the forward and step gets None."""
    from dattri_fn.transforms import capture
    from dattri_fn.transforms.layers import batched_io, output_shapes, streamed_io

    fm, _, _, (x, y) = _seq(11)
    tapped = capture.tap(fm.module, ["emb", "head"])
    state = {**fm.fixed, **fm.params}
    like = fm.params["emb.weight"]
    shapes = output_shapes(tapped, state, (x,), {}, like)
    ref = batched_io(tapped, F.cross_entropy, state, (x,), {}, y, shapes, like)
    got, order = {}, []

    def step(layer, a, g):
        order.append(layer)
        got[layer] = (a, g)

    streamed_io(tapped, F.cross_entropy, state, (x,), {}, y, shapes, like, step)
    assert order == ["head", "emb"]  # the backward reaches the last layer first
    for layer, (a, g) in ref.items():
        assert torch.equal(got[layer][0], a) and torch.equal(got[layer][1], g)
    inputs = {}
    streamed_io(tapped, F.cross_entropy, state, (x,), {}, y, shapes, like,
                lambda layer, a, g: got.__setitem__(layer, (a, g)),
                on_input=lambda layer, a: inputs.__setitem__(layer, a))
    for layer, (a, g) in ref.items():
        assert torch.equal(inputs[layer], a) and got[layer][0] is None
        assert torch.equal(got[layer][1], g)


# -- kronfluence's low-rank query gradients (query_rank) ------------------------------------
def _truncated(M, r):
    """Rank-r SVD truncation of each [out, in] block (whole where min(out, in) <= r)."""
    if min(M.shape[-2:]) <= r:
        return M
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[..., :r] @ torch.diag_embed(S[..., :r]) @ Vh[..., :r, :]


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("rank, l2", [(1, 0.0), (2, 0.01), (3, 0.0)])
def test_query_rank_scores_equal_scoring_with_the_truncated_test_blocks(problem, solver, rank,
                                                                        l2):
    """query_rank=r: s_ij = sum_l <DW_il + 2 l2 p_l, trunc_r(M_jl)>, M_jl the layer blocks of
    (F + damping I)^-1 g_j and trunc_r their rank-r SVD, formed densely (1e-10)."""
    fm, train, test, whole = PROBLEMS[problem](0)
    m = influence(fm, solver=solver, damping=0.1, l2=l2, query_rank=rank)
    state = m.prepare(fm.params, train)
    S = m.score(fm.params, state, train, test)
    G = per_sample_grad(fm.loss, fm.params, whole)
    if l2:
        G = G + 2 * l2 * torch.cat([v.reshape(-1) for v in fm.params.values()])
    train_blocks = state.ihvp.blocks(G)
    test_blocks = state.ihvp.blocks(state.ihvp(per_sample_grad(fm.loss, fm.params, test)))
    R = sum(torch.einsum("noi,moi->nm", train_blocks[k], _truncated(M, rank))
            for k, M in test_blocks.items())
    _close(S, R)
    exact = influence(fm, solver=solver, damping=0.1, l2=l2).score(fm.params, state, train, test)
    assert float((S - exact).abs().max()) > 1e-8 * float(exact.abs().max())  # truncation bites


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_query_rank_at_full_rank_is_the_exact_score(problem):
    """query_rank >= min(out, in(+1)) of every layer: no truncation, the exact scores (1e-10);
    the factored product sum_t (g_t^T L).(R a_t) of a full-rank SVD pair equals the dense
    block product (1e-10)."""
    from dattri_fn import solvers

    fm, train, test, whole = PROBLEMS[problem](1)
    m = influence(fm, solver="ekfac", damping=0.1)
    state = m.prepare(fm.params, train)
    exact = m.score(fm.params, state, train, test)
    full = influence(fm, solver=solvers.ekfac(query_rank=7)).score(fm.params, state, train, test)
    _close(full, exact)
    from dattri_fn.operators.kfac import _low_rank_pair_scores, _tokens

    io_ = layer_io(fm.module, fm.loss_fn, list(state.ihvp.eigen[0]), fm.params, whole)
    blocks = state.ihvp.blocks(state.ihvp(per_sample_grad(fm.loss, fm.params, test)))
    for layer, M in blocks.items():
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        pair = (U * S[:, None, :], Vh)
        a, g = _tokens(*io_[layer], True)  # every layer of these models has its bias
        _close(_low_rank_pair_scores(a, g, *pair, None), layer_scores(io_, {layer: M})[layer])
        _close(layer_scores(io_, {layer: pair})[layer], layer_scores(io_, {layer: M})[layer])


def test_query_rank_is_refused_outside_layered_kfac():
    """query_rank needs kfac/ekfac on the FunctionalModel and an int >= 1."""
    fm, train, test, whole = _mlp(0)
    with pytest.raises(ValueError, match=r"influence\(query_rank=...\): expected solver 'kfac' or "
                                         r"'ekfac'"):
        influence(fm, solver="cg", query_rank=2)
    with pytest.raises(ValueError, match=r"influence\(query_rank=...\): expected an int >= 1"):
        influence(fm, solver="ekfac", query_rank=0)
    with pytest.raises(ValueError, match=r"influence\(query_rank=...\): expected loss to be the "
                                         r"FunctionalModel"):
        influence(fm, solver="ekfac", query_rank=2, relatif="l")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pair_scores_one_position_equal_the_einsum_bit_for_bit(dtype):
    """The one-position path's batched products (a bmm since stop 26) give the bits of
    einsum("bno,bo->bn") over (a M_j^T) and g, which it replaced (no score moved)."""
    from dattri_fn.operators.kfac_scores import _pair_scores

    for seed, (B, n, o, i) in enumerate([(500, 50, 10, 65), (7, 3, 64, 65), (33, 20, 1, 40)]):
        gen = torch.Generator().manual_seed(seed)
        a, g = torch.randn(B, 1, i, generator=gen), torch.randn(B, 1, o, generator=gen)
        M = torch.randn(n, o, i, generator=gen)
        a, g, M = a.to(dtype), g.to(dtype), M.to(dtype)
        X = (a[:, 0] @ M.reshape(n * o, i).T).reshape(B, n, o)
        assert torch.equal(_pair_scores(a, g, M, None), torch.einsum("bno,bo->bn", X, g[:, 0]))
