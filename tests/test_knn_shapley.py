"""KNN-Shapley's recursion against brute-force Shapley values over all subsets (n <= 8)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn.attribute.knn_shapley import knn_shapley, knn_shapley_values

F64 = torch.float64


def _utility(subset, dist, y_train, y_test, k):
    """U(S) = (1/K) #{K nearest of S (ties by index) with label y_test}; U(empty) = 0."""
    nearest = sorted(subset, key=lambda i: (float(dist[i]), i))[:k]
    return sum(int(y_train[i] == y_test) for i in nearest) / k


def _brute_force(dist, y_train, y_test, k):
    """phi_i = sum_{S without i} |S|! (n - |S| - 1)! / n! (U(S + i) - U(S)), per test column."""
    m, n = dist.shape
    out = torch.zeros(n, m, dtype=F64)
    for j in range(m):
        for i in range(n):
            others = [a for a in range(n) if a != i]
            for size in range(n):
                w = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                for S in itertools.combinations(others, size):
                    gain = (_utility((*S, i), dist[j], y_train, y_test[j], k)
                            - _utility(S, dist[j], y_train, y_test[j], k))
                    out[i, j] += w * gain
    return out


@settings(max_examples=30)
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 9), st.integers(2, 3),
       st.integers(0, 2**16), st.booleans())
def test_recursion_equals_brute_force_shapley(n, m, k, classes, seed, ties):
    """knn_shapley_values == exact Shapley values of the K-NN vote share, ties broken by index."""
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(m, n, generator=g, dtype=F64)
    if ties:  # few distinct distances: the index tie-break decides the order
        dist = (dist * 3).floor()
    y_train = torch.randint(0, classes, (n,), generator=g)
    y_test = torch.randint(0, classes, (m,), generator=g)
    got = knn_shapley_values(dist, y_train, y_test, k=k)
    ref = _brute_force(dist, y_train, y_test, k)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@given(st.integers(2, 8), st.integers(1, 4), st.integers(0, 2**16),
       st.sampled_from(["euclidean", "cosine"]), st.sampled_from([None, 2]))
def test_method_on_raw_inputs_and_embeddings(n, k, seed, metric, chunk_size):
    """Method scores == knn_shapley_values on explicit distances of the (embedded) inputs;
    columns sum to U(all) (efficiency); self_score == diag(score(train, train))."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 2, 2, generator=g, dtype=F64), torch.randint(0, 2, (n,), generator=g)
    xt, yt = torch.randn(3, 2, 2, generator=g, dtype=F64), torch.randint(0, 2, (3,), generator=g)
    params = {"W": torch.randn(3, 4, generator=g, dtype=F64)}
    embed = lambda p, ex: torch.tanh(p["W"] @ ex[0].reshape(-1))
    for fn, feats in ((None, lambda a: a.reshape(a.shape[0], -1)),
                      (embed, lambda a: torch.tanh(a.reshape(a.shape[0], -1) @ params["W"].T))):
        m = knn_shapley(fn, k=k, metric=metric, chunk_size=chunk_size)
        state = m.prepare(params, [(x[:1], y[:1]), (x[1:], y[1:])])
        S = m.score(params, state, None, (xt, yt))
        A, B = feats(xt), feats(x)
        if metric == "euclidean":
            D = ((A[:, None] - B[None]) ** 2).sum(-1).sqrt()
        else:
            D = 1 - (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(S, knn_shapley_values(D, y, yt, k=k), rtol=0, atol=1e-12)
        nearest = D.argsort(dim=1, stable=True)[:, :k]
        util = (y[nearest] == yt[:, None]).sum(1).to(F64) / k
        torch.testing.assert_close(S.sum(0), util, rtol=0, atol=1e-12)
        full = m.score(params, state, None, (x, y))
        torch.testing.assert_close(m.self_score(params, state, (x, y)), full.diagonal(),
                                   rtol=0, atol=1e-12)
        top = m.score(params, state, None, (xt, yt), top_k=1)
        torch.testing.assert_close(top.values, S.max(0, keepdim=True).values, rtol=0, atol=0)


def test_errors():
    """Bad k, metric, shapes and states are refused naming the argument."""
    with pytest.raises(ValueError, match=r"knn_shapley\(metric=...\): expected one of"):
        knn_shapley(k=2, metric="l1")
    with pytest.raises(ValueError, match=r"knn_shapley\(k=...\)"):
        knn_shapley(k=0)
    with pytest.raises(ValueError, match=r"knn_shapley_values\(train_labels=...\)"):
        knn_shapley_values(torch.zeros(2, 3, dtype=F64), torch.zeros(2), torch.zeros(2), k=1)
    m = knn_shapley(k=1)
    x, y = torch.zeros(3, 2, dtype=F64), torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match=r"knn_shapley.score\(state=...\): expected the "
                                        r"KNNShapleyState"):
        m.score({}, (), None, (x, y))
    with pytest.raises(ValueError, match=r"knn_shapley.score\(test=...\): expected embeddings "
                                         r"of size F=2"):
        m.score({}, m.prepare({}, (x, y)), None, (torch.zeros(1, 3, dtype=F64), y[:1]))
