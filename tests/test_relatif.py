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
