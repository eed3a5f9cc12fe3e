"""RPS's memory: exact tensor peaks of prepare and score, the blocked float64 fit against dense
formulas, and a float32 fit stopping at the float64 gradient bound."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dattri_fn.attribute.representer import representer
from dattri_fn.attribute.representer_fit import _block_rows, _linear_softmax, fit_head

F64 = torch.float64


def _problem(seed, n, m, dtype, D=8, Fd=32, K=4):
    """A tanh body (the features are fresh tensors, not views of the data) and a linear head."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, D, generator=g, dtype=dtype), torch.randint(0, K, (n,), generator=g)
    xt, yt = torch.randn(m, D, generator=g, dtype=dtype), torch.randint(0, K, (m,), generator=g)
    params = {"B": torch.randn(Fd, D, generator=g, dtype=dtype),
              "W": 0.3 * torch.randn(K, Fd, generator=g, dtype=dtype)}
    return (x, y), (xt, yt), params


def _feat(p, ex):
    return torch.tanh(p["B"] @ ex[0])


def _head(p, h):
    return p["W"] @ h


def _ce(z, t):
    return F.cross_entropy(z[None], t[None])


@pytest.mark.slow  # 8-11 s at load 6: the profiler records every operator of the fit
def test_prepare_and_score_tensor_peaks():
    """float32, n=512 in 4 batches, m=64: prepare's exact tensor peak <= state + the features'
    bytes (no float64 copy of the features: that alone is 2x them; stop 19 peaked at 5.8x the
    state); score's <= output + 3/4 of the test features (never held whole), no [n, m]
    coefficient temporary (stop 19: 2.07x the output)."""
    from benchmarks.peak import tensor_peak

    (x, y), test, params = _problem(0, 512, 64, torch.float32)
    meth = representer(_feat, _head, _ce, l2=0.1, refit="predictions")
    train = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    state, peak = tensor_peak(lambda: meth.prepare(params, train))
    assert peak <= sum(t.nbytes for t in state) + state.features.nbytes, peak
    S, peak = tensor_peak(lambda: meth.score(params, state, None, test))
    assert S.shape == (512, 64) and S.is_contiguous()
    assert peak <= S.nbytes + 3 * 64 * 32 * 4 // 4, peak


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), n=st.integers(65, 300), soft=st.booleans())
def test_blocked_value_gradient_and_hvp_equal_dense_formulas(seed, n, soft):
    """_SoftmaxHead over float64 blocks (n > 64 rows: several blocks): f, grad f and the Hessian
    product equal torch.func on the dense objective (1/n) sum CE(W h_i, t_i) + l2 |W|^2 to 1e-12
    relative; with float32 features the values and gradients are still float64 sums of the
    exactly upcast rows (1e-12), the Hessian product float32 (1e-5)."""
    g = torch.Generator().manual_seed(seed)
    K, Fd, l2 = 3, 5, 0.05
    H = torch.randn(n, Fd, generator=g, dtype=F64)
    t = (torch.softmax(torch.randn(n, K, generator=g, dtype=F64), -1) if soft
         else torch.randint(0, K, (n,), generator=g))
    W = torch.randn(K, Fd, generator=g, dtype=F64)
    v = torch.randn(K * Fd, generator=g, dtype=F64)
    assert _block_rows(n, Fd) < n
    for dtype, hvp_tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        h = H.to(dtype)
        h64, t64 = h.double(), t if not soft else t.to(dtype).double()
        head = _linear_softmax(_head, F.cross_entropy, {}, ["W"], {"W": W.to(dtype)}, h,
                               t if not soft else t.to(dtype), l2)
        assert head is not None

        def f(w):
            return F.cross_entropy(h64 @ w.view(K, Fd).T, t64) + l2 * (w * w).sum()

        w = W.reshape(-1)
        P = h.new_empty(n, K, dtype=head.work_dtype)
        value, grad = head.value_grad(w, P)
        torch.testing.assert_close(value, f(w), rtol=1e-12, atol=0)
        ref_g = torch.func.grad(f)(w)
        torch.testing.assert_close(grad, ref_g, rtol=0, atol=1e-12 * float(ref_g.abs().max()))
        torch.testing.assert_close(P.double(), torch.softmax(h64 @ W.T, 1), rtol=0,
                                   atol=1e-12 if dtype == F64 else 1e-6)
        ref_hv = torch.func.jvp(torch.func.grad(f), (w,), (v,))[1]
        torch.testing.assert_close(head.hvp(P, v), ref_hv, rtol=0,
                                   atol=hvp_tol * float(ref_hv.abs().max()))


@pytest.mark.parametrize("soft", [False, True])
def test_float32_fit_matches_the_float64_fit(soft):
    """fit_head on float32 features (float32 Hessian products, float64 values and gradients) and
    on the same features upcast to float64 minimise the same objective to the same float64
    bound b = 1e-7 max(1, max|grad f(W0)|): f being 2 l2-strongly convex, both iterates lie
    within sqrt(KF) b / (2 l2) of the minimiser; the float32 result adds its rounding,
    eps_32 |W| per entry."""
    (x, y), _, params = _problem(1, 400, 1, torch.float32)
    h = torch.tanh(x @ params["B"].T)
    targets = torch.softmax(h @ params["W"].T, 1) if soft else y
    l2 = 1e-2
    fit32 = fit_head(_head, F.cross_entropy, {"W": params["W"]}, h, targets, l2=l2)["W"]
    assert fit32.dtype == torch.float32
    h64, t64 = h.double(), targets.double() if soft else targets
    fit64 = fit_head(_head, F.cross_entropy, {"W": params["W"].double()}, h64, t64, l2=l2)["W"]

    def grad(w):
        return torch.func.grad(lambda v: F.cross_entropy(h64 @ v.T, t64) + l2 * (v * v).sum())(w)

    bound = 1e-7 * max(1.0, float(grad(params["W"].double()).abs().max()))
    assert float(grad(fit64).abs().max()) <= bound
    root = fit64.numel() ** 0.5
    slack = 2 * root * bound / (2 * l2) + root * torch.finfo(torch.float32).eps * float(
        fit64.abs().max())
    assert float((fit32.double() - fit64).norm()) <= slack * 1.01
