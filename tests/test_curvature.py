"""hvp, gnvp and fvp against their dense definitions."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import hessian, jacrev

from dattri_fn import cross_entropy_out_hvp, fvp, gnvp, hvp
from dattri_fn.tree import ravel
from problems import PROBLEMS, dense_hessian, dense_per_sample_grads

problem_names = st.sampled_from(sorted(PROBLEMS))


def _V(k, P, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(k, P, generator=g, dtype=torch.float64).to(device)


@given(problem_names, st.integers(1, 10), st.integers(1, 4), st.integers(0, 2**16),
       st.sampled_from([None, 1, 2]), st.sampled_from(["fwd-rev", "rev-rev"]))
def test_hvp_equals_dense_hessian(name, n, k, seed, chunk_size, mode):
    """hvp(loss)(V) == V @ torch.func.hessian(mean loss) (H symmetric) for k rows, both modes."""
    params, loss, batch = PROBLEMS[name](n=n, seed=seed)
    H = dense_hessian(params, loss, batch)
    V = _V(k, H.shape[0], seed)
    op = hvp(loss, params, batch, chunk_size=chunk_size, mode=mode)
    torch.testing.assert_close(op(V), V @ H, rtol=0, atol=1e-11)


@given(problem_names, st.integers(0, 2**16), st.integers(1, 8))
def test_hvp_averaged_over_batches_equals_full_batch(name, seed, split):
    """The operator over a list of mini-batches is the mean over ALL examples, not of batch means."""
    params, loss, (x, y) = PROBLEMS[name](n=9, seed=seed)
    H = dense_hessian(params, loss, (x, y))
    op = hvp(loss, params, [(x[:split], y[:split]), (x[split:], y[split:])])
    V = _V(2, H.shape[0], seed)
    torch.testing.assert_close(op(V), V @ H, rtol=0, atol=1e-11)
    torch.testing.assert_close(op(V[0]), V[0] @ H, rtol=0, atol=1e-11)


@given(problem_names, st.integers(1, 8), st.integers(0, 2**16))
def test_adjoint_identity(name, n, seed):
    """<u, H v> == <H u, v>: the operator is symmetric."""
    params, loss, batch = PROBLEMS[name](n=n, seed=seed)
    op = hvp(loss, params, batch)
    u, v = _V(2, op.dim, seed)
    torch.testing.assert_close(u @ op(v), op(u) @ v, rtol=1e-10, atol=1e-12)


@given(problem_names, st.integers(1, 8), st.integers(0, 2**16))
def test_fvp_equals_empirical_fisher(name, n, seed):
    """fvp(V) == V @ (G^T G / n) with G the [n, P] per-sample gradients."""
    params, loss, batch = PROBLEMS[name](n=n, seed=seed)
    G = dense_per_sample_grads(params, loss, batch)
    V = _V(3, G.shape[1], seed)
    torch.testing.assert_close(fvp(loss, params, batch, chunk_size=2)(V), V @ (G.T @ G / n),
                               rtol=0, atol=1e-11)


def _mlp_forward(p, ex):
    x, _ = ex
    h = torch.tanh(p["l1.weight"] @ x + p["l1.bias"])
    return p["l2.weight"] @ h + p["l2.bias"]


def _ce(out, ex):
    return F.cross_entropy(out.unsqueeze(0), ex[1].unsqueeze(0))


@given(st.integers(1, 8), st.integers(0, 2**16))
def test_gnvp_equals_dense_gauss_newton(n, seed):
    """gnvp(V) == V @ mean_i J_i^T H_out,i J_i with J, H_out from jacrev/hessian (dense)."""
    params, loss, (x, y) = PROBLEMS["mlp"](n=n, seed=seed)
    flat0, unravel = ravel(params)
    G = 0
    for i in range(n):
        ex = (x[i], y[i])
        J = jacrev(lambda f: _mlp_forward(unravel(f), ex))(flat0)
        out = _mlp_forward(params, ex)
        Ho = hessian(lambda o: _ce(o, ex))(out)
        G = G + J.T @ Ho @ J
    G = G / n
    V = _V(3, flat0.numel(), seed)
    torch.testing.assert_close(gnvp(_mlp_forward, _ce, params, (x, y))(V), V @ G,
                               rtol=0, atol=1e-11)
    torch.testing.assert_close(gnvp(_mlp_forward, _ce, params, (x, y),
                                    out_hvp=cross_entropy_out_hvp)(V), V @ G, rtol=0, atol=1e-11)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6), st.integers(0, 2**16))
def test_cross_entropy_out_hvp_equals_autodiff_hessian(T, k, K, seed):
    """cross_entropy_out_hvp(z, ex, u) == hessian(mean_t CE(z_t, y_t)) u for [K] and [T, K],
    tokens with target -100 ignored."""
    g = torch.Generator().manual_seed(seed)
    for shape in ((K,), (T, K)):
        z = torch.randn(*shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, K, shape[:-1], generator=g)
        if len(shape) == 2 and T > 1:
            y[: T // 2] = -100  # ignored tokens: F.cross_entropy averages over the others
        U = torch.randn(k, *shape, generator=g, dtype=torch.float64)
        ce = lambda o: F.cross_entropy(o.reshape(-1, K), y.reshape(-1))
        H = hessian(ce)(z).reshape(z.numel(), z.numel())
        got = torch.stack([cross_entropy_out_hvp(z, (None, y), u) for u in U])
        torch.testing.assert_close(got.reshape(k, -1), U.reshape(k, -1) @ H, rtol=0,
                                   atol=1e-13)
    z, y = torch.randn(T, K, generator=g, dtype=torch.float64), torch.randint(0, K, (T,))
    u = torch.randn(T, K, generator=g, dtype=torch.float64)
    by_dict = cross_entropy_out_hvp(z, {"x": z, "labels": y}, u)
    torch.testing.assert_close(by_dict, cross_entropy_out_hvp(z, (z, y), u), rtol=0, atol=0)
    # no integer target per position: the plain mean over the T positions
    p = torch.softmax(z, -1)
    plain = (p * u - p * (p * u).sum(-1, keepdim=True)) / T
    torch.testing.assert_close(cross_entropy_out_hvp(z, None, u), plain, rtol=0, atol=1e-15)
    if T > 1:  # a target of another shape is not per position: the plain mean again
        torch.testing.assert_close(cross_entropy_out_hvp(z, (z, y[:1]), u), plain, rtol=0,
                                   atol=1e-15)
    with pytest.raises(TypeError, match=r"gnvp\(out_hvp=...\): expected None or a callable"):
        gnvp(_mlp_forward, _ce, {"w": z}, (z[None], y[None]), out_hvp=1.0)


def test_gauss_newton_equals_hessian_for_linear_model():
    """For logistic regression (linear logits) GN == Hessian exactly."""
    params, loss, batch = PROBLEMS["logistic"](n=6)
    fwd = lambda p, ex: p["W"] @ ex[0] + p["b"]
    H = dense_hessian(params, loss, batch)
    V = _V(2, H.shape[0], 0)
    torch.testing.assert_close(gnvp(fwd, _ce, params, batch)(V), V @ H, rtol=0, atol=1e-12)


def test_device_dtype_follow_params(device):
    """The operator and its output live on the params' device and dtype."""
    params, loss, batch = PROBLEMS["mlp"](n=4, device=device)
    op = hvp(loss, params, batch)
    out = op(torch.ones(op.dim, dtype=torch.float64, device=device))
    assert out.device.type == device.type and out.dtype == torch.float64
    assert op.device.type == device.type


def test_bad_inputs():
    """Wrong V shape, empty data, one-shot iterator: errors name the argument."""
    params, loss, (x, y) = PROBLEMS["linear"](n=4)
    op = hvp(loss, params, (x, y))
    with pytest.raises(ValueError, match=r"hvp\(V=...\): expected shape \[k, 5\]"):
        op(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hvp\(mode=...\): expected one of"):
        hvp(loss, params, (x, y), mode="fwd")
    with pytest.raises(ValueError, match=r"hvp\(data=...\): expected at least one batch"):
        hvp(loss, params, [])
    with pytest.raises(TypeError, match=r"fvp\(data=...\): expected a re-iterable"):
        fvp(loss, params, iter([(x, y)]))
    with pytest.raises(ValueError, match=r"hvp\(data=...\): expected a non-empty batch"):
        hvp(loss, params, (x[:0], y[:0]))


@given(problem_names, st.integers(0, 2**16), st.sampled_from([None, 1, 3, 7, 256]))
def test_dense_in_chunks_equals_dense_hessian(name, seed, chunk_size):
    """LinOp.dense(chunk_size) == torch.func.hessian, whatever rows per operator call."""
    params, loss, batch = PROBLEMS[name](n=6, seed=seed)
    H = dense_hessian(params, loss, batch)
    torch.testing.assert_close(hvp(loss, params, batch).dense(chunk_size), H, rtol=0, atol=1e-11)


@given(problem_names, st.integers(0, 2**16), st.integers(1, 12), st.sampled_from(["hvp", "fvp"]))
def test_batch_rows_merging_keeps_the_operator(name, seed, rows, kind):
    """Merging batches into calls of >= batch_rows examples leaves C V unchanged (mean over ALL)."""
    params, loss, (x, y) = PROBLEMS[name](n=9, seed=seed)
    data = [(x[:2], y[:2]), (x[2:3], y[2:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]
    V = _V(3, sum(v.numel() for v in params.values()), seed)
    build = hvp if kind == "hvp" else fvp
    torch.testing.assert_close(build(loss, params, data, batch_rows=rows)(V),
                               build(loss, params, data)(V), rtol=0, atol=1e-11)


@given(st.integers(0, 2**16), st.integers(1, 12))
def test_gnvp_batch_rows(seed, rows):
    """gnvp with merged batches == gnvp batch by batch (softmax regression, W x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    params = {"W": torch.randn(3, 4, generator=g, dtype=torch.float64)}
    forward = lambda p, ex: p["W"] @ ex[0]
    out_loss = lambda out, ex: F.cross_entropy(out[None], ex[1][None])
    data = [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:], y[5:])]
    V = _V(2, 12, seed)
    torch.testing.assert_close(gnvp(forward, out_loss, params, data, batch_rows=rows)(V),
                               gnvp(forward, out_loss, params, data)(V), rtol=0, atol=1e-12)


def test_batch_rows_is_validated():
    """batch_rows must be a positive int; the error names the factory and the argument."""
    params, loss, batch = PROBLEMS["mlp"](n=4, seed=0)
    with pytest.raises(ValueError, match=r"hvp\(batch_rows=...\)"):
        hvp(loss, params, batch, batch_rows=0)
    x = torch.randn(4, 5, dtype=torch.float64)
    padded = [(x[:2, :3], torch.tensor([0, 1])), (x[2:], torch.tensor([1, 0]))]
    f = lambda p, ex: (p["w"][: ex[0].shape[0]] * ex[0]).sum() ** 2
    # batches of different trailing shapes are no longer merged (RU2 M3): the operator is the
    # example-weighted mean of the per-batch ones
    w = {"w": torch.ones(5, dtype=torch.float64)}
    V = torch.ones(1, 5, dtype=torch.float64)
    got = hvp(f, w, padded, batch_rows=4)(V)
    ref = sum(2 * hvp(f, w, [b])(V) for b in padded) / 4
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@given(st.integers(0, 2**16), st.integers(1, 4))
def test_recipe_gauss_newton_closed_form_equals_autodiff(seed, T):
    """recipes.gauss_newton (closed-form CE Hessian, classes on dim 1) == gnvp by autodiff for
    [B, K] and [B, K, T] logits; lm_loss (autodiff there) with ignored tokens on [B, T, V]."""
    from torch import nn

    from dattri_fn import functional_model
    from dattri_fn.app.recipes import gauss_newton
    from dattri_fn.eval.tasks import classification_loss, lm_loss

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, T, generator=g, dtype=torch.float64)
    cases = [
        (nn.Sequential(nn.Flatten(), nn.Linear(3 * T, 4)), classification_loss,
         torch.randint(0, 4, (5,), generator=g)),
        (nn.Conv1d(3, 4, 1), classification_loss, torch.randint(0, 4, (5, T), generator=g)),
        (nn.Sequential(nn.Conv1d(3, 4, 1), _Swap()), lm_loss,
         torch.randint(0, 4, (5, T), generator=g).masked_fill(torch.arange(T) == 0, -100)),
    ]
    for module, loss_fn, y in cases:
        fm = functional_model(module.double(), loss_fn)
        V = _V(2, sum(v.numel() for v in fm.params.values()), seed)
        out_loss = lambda out, ex, f=loss_fn: f(out[None], ex[-1][None])
        ref = gnvp(fm.forward, out_loss, fm.params, (x, y))(V)
        got = gauss_newton(fm, loss_fn)(fm.params, (x, y))(V)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


class _Swap(torch.nn.Module):
    def forward(self, h):
        return h.transpose(1, 2)


def test_data_readable_once_is_refused_not_silently_shortened():
    """A DataLoader over a one-shot generator passes the re-iterability check: its first batch
    is peeked without loss (the first product uses all 12 rows, as the list does), and a later
    pass that yields other rows raises naming data (issue 15, item 3); the Gauss-Newton builder
    keeps its factors after one pass, so its later products stay right."""
    from torch.utils.data import DataLoader, IterableDataset

    from dattri_fn import functional_model, gauss_newton

    torch.manual_seed(0)
    fm = functional_model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                              torch.nn.Linear(4, 2)).double(),
                          torch.nn.functional.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)

    class Once(IterableDataset):
        def __init__(self):
            self.rows = ((x[i], y[i]) for i in range(12))

        def __iter__(self):
            return self.rows

    V = torch.randn(2, 26, generator=g, dtype=torch.float64)
    for build in (lambda d: hvp(fm.loss, fm.params, d), lambda d: gauss_newton(fm)(fm.params, d)):
        op = build(DataLoader(Once(), batch_size=4))
        want = build([(x, y)])(V)
        torch.testing.assert_close(op(V), want, rtol=1e-10, atol=1e-12)
        if op.name == "linear_gnvp":
            torch.testing.assert_close(op(V), want, rtol=1e-10, atol=1e-12)
            continue
        with pytest.raises(ValueError, match=r"hvp\(data=...\): expected the same 12 rows on every "
                                             r"pass over the data, got 0 rows on a later pass"):
            op(V)


def test_gnvp_refuses_a_non_scalar_out_loss():
    """An out_loss returning a vector per example is refused at construction, naming out_loss."""
    params, loss, batch = PROBLEMS["logistic"](n=5)
    forward = lambda p, ex: p["W"] @ ex[0]
    with pytest.raises(ValueError, match=r"gnvp\(out_loss=...\): expected a 0-d Tensor for one "
                                         r"example's output, got shape \["):
        gnvp(forward, lambda out, ex: out * 2, params, batch)
    with pytest.raises(TypeError, match=r"gnvp\(out_loss=...\): expected a callable"):
        gnvp(forward, None, params, batch)


def test_cross_entropy_out_hessian_and_hvp_refuse_bad_inputs():
    """Integer or wrongly shaped logits and a u of another shape name the argument."""
    from dattri_fn import cross_entropy_out_hessian

    with pytest.raises(ValueError, match=r"cross_entropy_out_hessian\(out=...\): expected "
                                         r"floating logits \[B, K\], got torch.int64 \[3\]"):
        cross_entropy_out_hessian(torch.tensor([1, 2, 3]))
    out = torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cross_entropy_out_hvp\(u=...\): expected a tensor "
                                         r"shaped like out \[4\], got torch.float64 \[3\]"):
        cross_entropy_out_hvp(out, (None, torch.tensor(1)), torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"cross_entropy_out_hvp\(out=...\): expected floating"):
        cross_entropy_out_hvp(torch.tensor([1, 2]), (None, torch.tensor(1)), torch.ones(2))
