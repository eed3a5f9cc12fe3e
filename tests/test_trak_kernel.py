"""TRAK's kernels against dense float64 inverses; the unprojected cache against per-sample grads."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn.attribute import trak_kernel
from dattri_fn.attribute.trak import classification_margin_loss, trak
from dattri_fn.attribute.trak_kernel import dual_kernel, gram_of, primal_kernel
from dattri_fn.model import functional_model
from dattri_fn.transforms.grad import per_sample_grad

F64 = torch.float64


@given(seed=st.integers(0, 2**16), C=st.integers(1, 3), n=st.integers(1, 9),
       extra=st.integers(1, 12), rows=st.integers(1, 5))
def test_dual_kernel_is_the_damped_inverse(seed, C, n, extra, rows):
    """dual_kernel(Phi)[c] == (Phi_c Phi_c^T + damping I)^-1 for every block of feature columns
    (the widened blocks shrunk to ``rows`` columns), float64 features: 1e-10."""
    gen = torch.Generator().manual_seed(seed)
    d = n + extra
    feats = torch.randn(C, n, d, generator=gen, dtype=F64)
    old = trak_kernel._DUAL_ROWS
    trak_kernel._DUAL_ROWS = rows
    try:
        K = dual_kernel("f", feats, d, F64, 0.1)
    finally:
        trak_kernel._DUAL_ROWS = old
    eye = torch.eye(n, dtype=F64)
    for c in range(C):
        want = torch.linalg.inv(feats[c] @ feats[c].T + 0.1 * eye)
        torch.testing.assert_close(K[c], want, rtol=1e-10, atol=1e-10)


def test_dual_kernel_float32_features_keep_a_float64_gram():
    """float32 features: the Gram is summed in float64 (as the float64 product of the widened
    features), so K matches the float64 inverse of the same rounded features to 1e-10 before the
    final cast, here checked through dtype=float64."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 6, 300, generator=gen)  # 300 columns: three blocks of 128
    K = dual_kernel("f", feats, 300, F64, 1e-3)
    f64 = feats.to(F64)
    want = torch.linalg.inv(f64 @ f64.mT + 1e-3 * torch.eye(6, dtype=F64))
    torch.testing.assert_close(K, want, rtol=1e-10, atol=1e-10)
    assert dual_kernel("f", feats, 300, torch.float32, 1e-3).dtype == torch.float32


def test_kernels_name_singular_checkpoints():
    """A Gram that Cholesky cannot factor is refused naming the checkpoints, d and n_train (dual
    and primal forms)."""
    feats = torch.zeros(2, 3, 5, dtype=F64)
    feats[1] = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(ValueError, match=r"f\(damping=...\).*checkpoints \[0\].*d=5, n_train=3"):
        dual_kernel("f", feats, 5, F64, 0.0)
    grams = [gram_of(f) for f in feats]  # [5, 5] of rank <= 3: both singular undamped
    with pytest.raises(ValueError, match=r"f\(damping=...\).*checkpoints \[0, 1\].*d=5, n_train=3"):
        primal_kernel("f", grams, 2, 5, 3, F64, feats.device, 0.0)


def test_unprojected_cache_is_the_per_sample_gradient():
    """trak(proj_dim=None) on a factored model: the state keeps grad f(theta_c; z_i) (the margin) as
    captured, every checkpoint and batch (two batches, the second short), whose dense rows equal
    vmap(grad) (1e-12), and the dual kernel is (Phi_c Phi_c^T + damping I)^-1 (1e-10)."""
    gen = torch.Generator().manual_seed(1)
    models = []
    for _ in range(2):
        m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=gen, dtype=F64) / 2
        models.append(m)
    x, y = torch.randn(7, 4, generator=gen, dtype=F64), torch.randint(0, 3, (7,), generator=gen)
    fms = [functional_model(m, classification_margin_loss) for m in models]
    method = trak(fms[0], proj_dim=None, damping=0.5)
    train = [(x[:4], y[:4]), (x[4:], y[4:])]
    state = method.prepare([f.params for f in fms], train)
    for c, fm in enumerate(fms):
        G = per_sample_grad(fm.loss, fm.params, (x, y))  # [7, P] raveled
        torch.testing.assert_close(state.train_factors.to_dense()[c], G, rtol=1e-12, atol=1e-12)
        want = torch.linalg.inv(G @ G.T + 0.5 * torch.eye(7, dtype=F64))
        torch.testing.assert_close(state.kernel_matrix()[c], want, rtol=1e-10, atol=1e-10)


def test_primal_kernel_is_allocated_after_the_first_gram():
    """A Gram stream that holds X bytes (TRAK's cache fill) until its first Gram is out peaks
    without the [C, d, d] kernel: tensor peak < X + Gram + kernel bytes; the inverse is exact."""
    from benchmarks.peak import tensor_peak

    C, d, X = 2, 16, 2**22
    gram = 2.0 * torch.eye(d, dtype=F64)

    def grams():  # one pass fills the cache, then every Gram is read from it
        big = torch.empty(X, dtype=torch.uint8)  # the fill's temporaries
        first = gram.clone()
        del big
        yield first
        del first
        for _ in range(C - 1):
            yield gram.clone()

    K, peak = tensor_peak(lambda: primal_kernel("f", grams(), C, d, 5, F64, "cpu", 0.5))
    assert torch.allclose(K, torch.eye(d, dtype=F64).expand(C, d, d) / 2.5, rtol=0, atol=1e-15)
    assert peak < X + gram.nbytes + K.nbytes


def test_dual_kernel_holds_one_gram_at_a_time():
    """dual_kernel over C = 3 checkpoints peaks at the kernel + one [n, n] float64 Gram + one
    block product ([n, n] here) + 64 bytes: never a second Gram; the result is the inverse."""
    from benchmarks.peak import tensor_peak

    n, d = 40, 60
    feats = torch.randn(3, n, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    K, peak = tensor_peak(lambda: dual_kernel("f", feats, d, F64, 0.1))
    assert peak <= K.nbytes + 2 * n * n * 8 + 64
    want = torch.linalg.inv(feats @ feats.mT + 0.1 * torch.eye(n, dtype=F64))
    assert torch.allclose(K, want, rtol=1e-10, atol=1e-12)


def test_kronecker_projection_in_float64_draws_its_factors_once(monkeypatch):
    """projection='kronecker' on float64 params: the factor matrices are drawn once per
    checkpoint at construction, in the params' dtype, not again on every call (review R2 F2:
    48 draws over prepare + 3 scores before); the scores repeat exactly."""
    import dattri_fn.transforms.kronecker as kr
    from dattri_fn.attribute.trak import classification_margin_loss, classification_weight_loss

    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
    draws, real = [], kr._Factor.matrix
    monkeypatch.setattr(kr._Factor, "matrix", lambda self, *a, **k: draws.append(1) or real(self, *a, **k))
    m = trak(functional_model(net, classification_margin_loss),
             weight_fn=functional_model(net, classification_weight_loss),
             proj_dim=(4, 4), projection="kronecker", kind="rademacher")
    params = functional_model(net).params
    train = [(torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g))
             for _ in range(3)]
    test = (torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
    state = m.prepare(params, train)
    first = m.score(params, state, None, test)
    after_first = len(draws)
    for _ in range(2):
        assert torch.equal(m.score(params, state, None, test), first)
    assert len(draws) == after_first and after_first <= 4  # 2 layers x (in, out), drawn once
