"""RelatIF (Barshan et al. 2020): influence normalised per training row, against dense algebra."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dattri_fn.attribute.influence import influence
from problems import PROBLEMS, dense_hessian, dense_per_sample_grads

D = torch.float64


def _dense_relatif(params, loss, train, test, damping, kind):
    G, Gt = dense_per_sample_grads(params, loss, train), dense_per_sample_grads(params, loss, test)
    A = dense_hessian(params, loss, train) + damping * torch.eye(G.shape[1], dtype=D)
    Q = torch.linalg.solve(A, G.T).T  # [n, P]: (H + damping I)^-1 g_i
    norm = (G * Q).sum(1).abs().sqrt() if kind == "l" else Q.norm(dim=1)
    return (G @ torch.linalg.solve(A, Gt.T)) / norm[:, None], (G * Q).sum(1) / norm


@settings(max_examples=10)
@given(st.sampled_from(["linear", "logistic"]), st.sampled_from(["l", "theta"]),
       st.integers(3, 9), st.integers(0, 2**16), st.sampled_from([1e-2, 0.5]))
def test_relatif_matches_dense(name, kind, n, seed, damping):
    """RelatIF_ij = g_i^T A^-1 g_j / n_i, n_i = sqrt|g_i^T A^-1 g_i| ('l') or |A^-1 g_i| ('theta')."""
    params, loss, train = PROBLEMS[name](n=n, seed=seed)
    _, _, test = PROBLEMS[name](n=3, seed=seed + 7)
    m = influence(loss, solver="explicit", damping=damping, relatif=kind)
    state = m.prepare(params, train)
    ref, ref_self = _dense_relatif(params, loss, train, test, damping, kind)
    torch.testing.assert_close(m.score(params, state, train, test), ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.self_score(params, state, train), ref_self, rtol=1e-9,
                               atol=1e-10)


@settings(max_examples=8)
@given(st.sampled_from(["l", "theta"]), st.integers(0, 2**16))
@example("l", 65536)  # 5 of its 8 rows have g_i^T A^-1 g_i < 0
def test_relatif_on_indefinite_mlp_hessian_with_literal_inverse(kind, seed):
    """tanh MLP, damping 0.01 (H + damping I indefinite), method='lu': RelatIF == dense, with
    n_i = sqrt|g_i^T A^-1 g_i| real where g_i^T A^-1 g_i < 0."""
    params, loss, train = PROBLEMS["mlp"](n=8, seed=seed)
    _, _, test = PROBLEMS["mlp"](n=2, seed=seed + 7)
    m = influence(loss, solver="explicit", damping=0.01, relatif=kind, method="lu")
    state = m.prepare(params, train)
    ref, ref_self = _dense_relatif(params, loss, train, test, 0.01, kind)
    torch.testing.assert_close(m.score(params, state, train, test), ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(m.self_score(params, state, train), ref_self, rtol=1e-8,
                               atol=1e-9)


def test_relatif_self_score_is_diagonal_and_l_is_sqrt():
    """self_score == diag(score(train, train)); with 'l' it is sqrt(g_i^T A^-1 g_i) >= 0."""
    params, loss, train = PROBLEMS["logistic"](n=7, seed=3)
    for kind in ("l", "theta"):
        m = influence(loss, solver="cg", damping=0.1, relatif=kind, rtol=1e-13, max_iter=200)
        state = m.prepare(params, train)
        full = m.score(params, state, train, train)
        torch.testing.assert_close(m.self_score(params, state, train), full.diagonal(),
                                   rtol=1e-9, atol=1e-11)
    plain = influence(loss, solver="explicit", damping=0.1)
    ref = plain.self_score(params, plain.prepare(params, train), train).sqrt()
    m = influence(loss, solver="explicit", damping=0.1, relatif="l")
    torch.testing.assert_close(m.self_score(params, m.prepare(params, train), train), ref,
                               rtol=1e-10, atol=1e-12)


def test_relatif_ranking_is_top_k_of_full():
    """top_k of RelatIF == torch.topk of its full score matrix along train."""
    params, loss, train = PROBLEMS["linear"](n=9, seed=5)
    _, _, test = PROBLEMS["linear"](n=2, seed=6)
    m = influence(loss, solver="explicit", damping=0.1, relatif="theta")
    state = m.prepare(params, train)
    full = m.score(params, state, train, test)
    top = m.score(params, state, train, test, top_k=3)
    torch.testing.assert_close(top.values, full.topk(3, dim=0).values, rtol=0, atol=1e-12)


def test_relatif_errors():
    """An unknown normalisation is refused naming influence(relatif=...)."""
    _, loss, _ = PROBLEMS["linear"](n=3, seed=0)
    with pytest.raises(ValueError, match=r"influence\(relatif=...\): expected None, 'l' or 'theta'"):
        influence(loss, relatif="x")


def _batches(train, cuts):
    """``train`` (a tuple of tensors) cut into consecutive batches at ``cuts``."""
    edges = [0, *cuts, train[0].shape[0]]
    return [tuple(t[a:b] for t in train) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _counted(state, rows: list):
    """``state`` whose inverse records the row count of every call in ``rows``."""
    from dattri_fn._types import LinOp

    inner = state.ihvp

    def apply(V):
        rows.append(V.shape[0])
        return inner(V)

    return state._replace(ihvp=LinOp(apply, inner.dim, inner.dtype, inner.device, name="counted"))


@pytest.mark.parametrize("kind", ["l", "theta"])
def test_relatif_score_inverts_only_the_test_rows(kind):
    """After prepare, score applies (H + damping I)^-1 to the n_test test rows only (RelatIF's
    n_i are in state.row_scale); self_score to the n_train rows once (test side only)."""
    params, loss, train = PROBLEMS["logistic"](n=9, seed=2)
    _, _, test = PROBLEMS["logistic"](n=4, seed=3)
    train = _batches(train, [4, 7])
    m = influence(loss, solver="explicit", damping=0.2, relatif=kind)
    state = m.prepare(params, train)
    assert state.row_scale.shape == (9,)
    rows: list[int] = []
    counted = _counted(state, rows)
    first = m.score(params, counted, train, test)
    second = m.score(params, counted, train, test)
    assert rows == [4, 4]
    assert torch.equal(first, second) and torch.equal(first, m.score(params, state, train, test))
    rows.clear()
    m.self_score(params, counted, train)
    assert rows == [4, 3, 2]


@pytest.mark.parametrize("kind", ["l", "theta"])
@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_relatif_prepared_scales_equal_per_batch_scales(kind, solver):
    """Scores from the prepared 1/n_i == scores with n_i recomputed per training batch (the
    state without row_scale), to 1e-10: one checkpoint and a list of two, batch_rows merging,
    top_k and self_score."""
    from dattri_fn.attribute.influence import InfluenceEnsembleState

    params, loss, train = PROBLEMS["logistic"](n=10, seed=5)
    _, _, test = PROBLEMS["logistic"](n=3, seed=6)
    train = _batches(train, [3, 6, 8])
    other = {k: v * 0.9 for k, v in params.items()}
    opts = {"rtol": 1e-12, "max_iter": 50} if solver == "cg" else {}
    m = influence(loss, solver=solver, damping=0.5, relatif=kind, batch_rows=4, **opts)
    for p in (params, [params, other]):
        state = m.prepare(p, train)
        bare = (state._replace(row_scale=None) if not isinstance(state, InfluenceEnsembleState)
                else InfluenceEnsembleState(tuple(s._replace(row_scale=None)
                                                  for s in state.states)))
        for kw in ({}, {"top_k": 2}):
            got, ref = m.score(p, state, train, test, **kw), m.score(p, bare, train, test, **kw)
            if kw:
                assert torch.equal(got.indices, ref.indices)
                got, ref = got.values, ref.values
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.self_score(p, state, train), m.self_score(p, bare, train),
                                   rtol=1e-10, atol=1e-12)


def test_relatif_scores_another_training_set_row_by_row():
    """The prepared 1/n_i serve only the rows prepare saw, in order (their print); fewer or more
    rows get their own n_i (one more inverse application per batch): the same rows' scores."""
    params, loss, train = PROBLEMS["linear"](n=9, seed=1)
    _, _, test = PROBLEMS["linear"](n=2, seed=2)
    train = _batches(train, [5])
    m = influence(loss, solver="explicit", damping=0.1, relatif="l")
    state = m.prepare(params, train)
    S, s = m.score(params, state, train, test), m.self_score(params, state, train)
    torch.testing.assert_close(m.score(params, state, train[:1], test), S[:5], rtol=1e-12,
                               atol=1e-15)
    torch.testing.assert_close(m.self_score(params, state, [*train, train[0]]),
                               torch.cat([s, s[:5]]), rtol=1e-12, atol=1e-15)


def test_relatif_scores_from_a_store_equal_scores_from_data(tmp_path):
    """RelatIF scored while recording a store (n_i per batch: the recording may resume) and from
    the opened store (no training data) == scores from the data, to 1e-12."""
    from dattri_fn.store import open_store, record_store

    params, loss, train = PROBLEMS["logistic"](n=8, seed=4)
    _, _, test = PROBLEMS["logistic"](n=3, seed=5)
    train = _batches(train, [5])
    m = influence(loss, solver="explicit", damping=0.3, relatif="theta")
    state = m.prepare(params, train)
    ref = m.score(params, state, train, test)
    got = m.score(params, state, record_store(tmp_path, train, params=params), test)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.score(params, state, open_store(tmp_path, params=params), test),
                               ref, rtol=0, atol=1e-12)
