"""KNN-Shapley on data whose distances overflow or whose embeddings are not finite: refused
naming the call, the argument and the example (euclidean), or computed exactly (cosine, which
reads only directions); never finite values from ``inf`` distances sorted as ties."""

import pytest
import torch

from dattri_fn.attribute.knn_shapley import KNNShapleyState, knn_shapley, knn_shapley_values

F32, F64 = torch.float32, torch.float64
# A scale whose square overflows the dtype (float32 max ~3.4e38, float64 ~1.8e308) while the
# value itself is finite, and one whose square underflows below the smallest subnormal.
HUGE = {F32: 1e20, F64: 1e160}
TINY = {F32: 1e-30, F64: 1e-200}


def _data(dtype, n=8, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=F64).to(dtype)
    y = torch.randint(0, 2, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("dtype", [F32, F64])
def test_overflowing_euclidean_distance_is_refused_naming_the_examples(dtype):
    """|x_2| ~ 1e20 (float32) / 1e160 (float64): |x_j - x_2|^2 = inf; score, self_score and a
    huge test example are refused naming the call, the argument and both examples."""
    x, y = _data(dtype)
    big = x.clone()
    big[2] *= HUGE[dtype]
    m = knn_shapley(k=3)
    st = m.prepare({}, (big, y))  # prepare alone forms no distance
    want = (rf"expected examples whose embeddings are a finite {dtype} distance from the "
            rf"training examples', got a distance of inf between example 0 and training example "
            rf"2 \(the squared distance overflows {dtype}\)\. Scale the embeddings down")
    with pytest.raises(ValueError, match=r"^knn_shapley\.score\(test=\.\.\.\): " + want):
        m.score({}, st, None, (x[:3], y[:3]))
    with pytest.raises(ValueError, match=r"^knn_shapley\.self_score\(train=\.\.\.\): expected "
                                         r".* between example 0 and example 2 "):
        m.self_score({}, st, (big, y))
    with pytest.raises(ValueError, match=r"^knn_shapley\.score\(test=\.\.\.\): expected .* "
                                         r"between example 1 and training example 0 "):
        m.score({}, m.prepare({}, (x, y)), None, (big[1:3], y[1:3]))
    with pytest.raises(ValueError, match=r"or compute in float64\." if dtype == F32 else
                       r"features\)\.$"):
        m.score({}, st, None, (x[:3], y[:3]))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embedding_is_refused_naming_argument_and_example(dtype, bad):
    """feature_fn's output NaN/inf at example 3 (finite inputs): prepare(train=...),
    score(test=...) and self_score(train=...) name example 3."""
    x, y = _data(dtype)

    def embed(params, example):  # the embedding of x[3] (marked by x[0] == 99) is not finite
        inp = example[0]
        return torch.where(inp[0] == 99, torch.full_like(inp, bad), inp)

    xb = x.clone()
    xb[3, 0] = 99
    m = knn_shapley(embed, k=2, metric="cosine")
    want = (r"expected examples whose embeddings \(feature_fn's output, or the flattened inputs\) "
            r"are finite, got NaN or inf in the embedding of example 3\. Fix or drop")
    with pytest.raises(ValueError, match=r"^knn_shapley\.prepare\(train=\.\.\.\): " + want):
        m.prepare({}, (xb, y))
    st = m.prepare({}, (x, y))
    with pytest.raises(ValueError, match=r"^knn_shapley\.score\(test=\.\.\.\): " + want):
        m.score({}, st, None, (xb, y))
    with pytest.raises(ValueError, match=r"^knn_shapley\.self_score\(train=\.\.\.\): " + want):
        m.self_score({}, st, (xb, y))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_non_finite_raw_input_is_refused_naming_argument(dtype):
    """A NaN in the raw inputs (no feature_fn): refused at the batch check, naming the call and
    the argument."""
    x, y = _data(dtype)
    xb = x.clone()
    xb[5, 1] = float("nan")
    m = knn_shapley(k=2)
    with pytest.raises(ValueError, match=r"^knn_shapley\.prepare\(train=\.\.\.\): expected finite"):
        m.prepare({}, (xb, y))
    with pytest.raises(ValueError, match=r"^knn_shapley\.score\(test=\.\.\.\): expected finite"):
        m.score({}, m.prepare({}, (x, y)), None, (xb, y))


def test_embedding_overflowing_at_the_cast_to_the_state_dtype_is_named():
    """float64 test embeddings of 1e100 against a float32 state: inf after the cast; named."""
    x, y = _data(F32)
    m = knn_shapley(k=2)
    st = m.prepare({}, (x, y))
    xt = x[:2].to(F64)
    xt[1] *= 1e100
    with pytest.raises(ValueError, match=r"^knn_shapley\.score\(test=\.\.\.\): .* got NaN or inf "
                                         r"in the embedding of example 1 \(after the cast to the "
                                         r"state's torch\.float32\)"):
        m.score({}, st, None, (xt, y[:2]))


def test_state_with_nan_features_is_refused_naming_state():
    """A hand-made state with a NaN feature row: NaN distances name state, not the test."""
    x, y = _data(F64)
    feats = x.clone()
    feats[4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^knn_shapley\.score\(state=\.\.\.\): expected the "
                                         r"KNNShapleyState .* training example 4\."):
        knn_shapley(k=2).score({}, KNNShapleyState(feats, y), None, (x[:2], y[:2]))


def _cosine_reference(train, test, y_train, y_test, k):
    """The recursion on 1 - cos computed in float64 from the unscaled rows."""
    a, b = test.to(F64), train.to(F64)
    cos = (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])
    return knn_shapley_values(1 - cos, y_train, y_test, k=k)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("scale", ["huge", "tiny"])
def test_cosine_reads_directions_exactly_for_overflowing_or_underflowing_rows(dtype, scale):
    """cos(s x_i, x_j) = cos(x_i, x_j): rows scaled by 1e20 / 1e-30 (float32), 1e160 / 1e-200
    (float64), whose squared norms overflow / underflow, give the values of the unscaled rows
    (bit for bit) and of a float64 reference; self_score too."""
    x, y = _data(dtype, n=10, f=4, seed=1)
    s = (HUGE if scale == "huge" else TINY)[dtype]
    xs = x.clone()
    xs[[2, 7]] *= s
    m = knn_shapley(k=3, metric="cosine")
    got = m.score({}, m.prepare({}, (xs, y)), None, (xs[:5], y[:5]))
    assert torch.equal(got, m.score({}, m.prepare({}, (x, y)), None, (x[:5], y[:5])))
    # values are multiples of 1/(K i): a reordered pair moves one by >= 1/(K n) ~ 0.03; float32
    # rounds the weights themselves at ~1e-8
    torch.testing.assert_close(got.to(F64), _cosine_reference(x, x[:5], y, y[:5], 3),
                               rtol=0, atol=1e-12 if dtype == F64 else 1e-6)
    self_scaled = m.self_score({}, m.prepare({}, (xs, y)), (xs, y))
    assert torch.equal(self_scaled, m.self_score({}, m.prepare({}, (x, y)), (x, y)))
