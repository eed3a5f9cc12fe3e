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


def _whole_matrix(dist, y_train, y_test, k):
    """The recursion on the whole [m, n] matrix at once (the stop-19 implementation)."""
    m, n = dist.shape
    order = torch.argsort(dist, dim=1, stable=True)
    match = (y_train[order] == y_test[:, None]).to(dist.dtype)
    i = torch.arange(1, n, dtype=dist.dtype)
    tail = ((match[:, :-1] - match[:, 1:]) * (i.clamp(max=k) / (k * i))).flip(1).cumsum(1).flip(1)
    last = match[:, -1:] * (min(k, n) / (k * n))
    sorted_values = torch.cat([tail, torch.zeros_like(match[:, :1])], 1) + last
    return torch.empty_like(sorted_values).scatter_(1, order, sorted_values).T


@given(st.integers(1, 40), st.integers(1, 20), st.integers(1, 6), st.integers(0, 2**16),
       st.booleans())
def test_blocks_of_test_points_change_no_value(n, m, k, seed, ties):
    """_values in blocks of 1, 3, m and the default rows == the whole-matrix recursion, bit for
    bit (each test point's sort and cumulative sum are its own)."""
    from dattri_fn.attribute.knn_shapley import _values

    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(m, n, generator=g, dtype=F64)
    if ties:
        dist = (dist * 3).floor()
    y_train, y_test = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    ref = _whole_matrix(dist, y_train, y_test, k)
    for rows in (1, 3, m, None):
        assert torch.equal(_values(dist, y_train, y_test, k, rows=rows), ref)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_method_blocks_bit_for_bit_and_bounded_peak(metric):
    """score/self_score with chunk_size None, 1, 7, m are equal bit for bit; score's exact tensor
    peak <= output + 64 bytes per [block, n] entry (+ cosine's normalised train copy), where the
    whole-matrix version peaked at 7x the output."""
    from benchmarks.peak import tensor_peak

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # cdist's and the sort's work split must not matter below
    try:
        g = torch.Generator().manual_seed(3)
        n, m, F = 400, 64, 8
        x, y = torch.randn(n, F, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)
        xt, yt = torch.randn(m, F, generator=g, dtype=F64), torch.randint(0, 3, (m,), generator=g)
        runs = []
        for chunk in (None, 1, 7, m):
            meth = knn_shapley(k=3, metric=metric, chunk_size=chunk)
            state = meth.prepare({}, [(x[:150], y[:150]), (x[150:], y[150:])])
            S, peak = tensor_peak(lambda meth=meth, state=state: meth.score({}, state, None,
                                                                            (xt, yt)))
            runs.append((S, meth.self_score({}, state, (x, y))))
            if chunk is None:
                rows = -(-m // 16)
                extra = x.nbytes if metric == "cosine" else 0
                assert peak <= S.nbytes + 64 * rows * n + extra, (peak, S.nbytes)
        for S, d in runs[1:]:
            assert torch.equal(S, runs[0][0]) and torch.equal(d, runs[0][1])
        # the state holds copies: a caller's later writes to its batch do not reach it
        one = knn_shapley(k=3).prepare({}, (x, y))
        assert one.features.data_ptr() != x.data_ptr()
    finally:
        torch.set_num_threads(threads)
