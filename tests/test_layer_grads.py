"""Factored per-example gradients (dattri_fn.transforms.layer_grads) against vmap(grad) in float64."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dattri_fn import functional_model, per_sample_grad
from dattri_fn.attribute import grad_cos, grad_dot, tracin
from dattri_fn.transforms.layer_grads import layer_grads_stacked, layer_plan, per_sample_layer_grads

ATOL = 1e-12
DT = torch.float64


def _mlp(seed, widths, bias, device):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers += [nn.Linear(a, b, bias=bias[i % len(bias)]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double().to(device).eval()


def _data(seed, n, dim, classes, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x.to(device), y.to(device)


class _Seq(nn.Module):
    """Token-wise Linear layers on ``[B, T, d]`` then a mean over T."""

    def __init__(self, d, classes):
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x))).mean(1)


class _Shared(nn.Module):
    """One Linear used twice: captured, its two calls summed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(torch.tanh(self.a(x))))


class _NoLayer(nn.Module):
    """A bare matrix parameter: no layer the capture engine knows."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        return x @ self.w


class _NoLayer3(nn.Module):
    """A bare 3-D parameter: no layer and no bare candidate (those are 1-D or 2-D)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 3, 2))

    def forward(self, x):
        return x @ self.w[0]


def _check(fm, batch, C=1):
    """to_dense, scores, row_dots and sq_norms equal the dense per-sample gradients."""
    G = per_sample_grad(fm.loss, fm.params, batch)
    lg = per_sample_layer_grads(fm, fm.params, batch)
    torch.testing.assert_close(lg.to_dense()[0], G, rtol=0, atol=ATOL)
    torch.testing.assert_close(lg.scores(lg), G @ G.T, rtol=0, atol=ATOL)
    torch.testing.assert_close(lg.row_dots(lg), (G * G).sum(1), rtol=0, atol=ATOL)
    torch.testing.assert_close(lg.sq_norms()[0], (G * G).sum(1), rtol=0, atol=ATOL)
    P = G.shape[1]
    for start, stop in [(0, P), (1, P // 2 + 1), (P // 3, P - 1), (P - 1, P)]:
        if start < stop:
            torch.testing.assert_close(lg.columns(start, stop)[0], G[:, start:stop], rtol=0,
                                       atol=ATOL)
    torch.testing.assert_close(lg.select(0).to_dense(), lg.to_dense(), rtol=0, atol=0)
    n = G.shape[0]
    for start, stop in [(0, n), (n // 2, n), (n - 1, n)]:
        assert torch.equal(lg.rows(start, stop).to_dense(), lg.to_dense()[:, start:stop])
    # a narrower dtype holds each entry rounded once: the full-precision result, cast
    assert torch.equal(lg.to_dense(torch.bfloat16), lg.to_dense().to(torch.bfloat16))
    for dtype in (G.dtype, torch.bfloat16):  # out= is filled whole, in its own dtype
        buf = torch.full((1, *G.shape), float("nan"), dtype=dtype, device=G.device)
        assert lg.to_dense(out=buf) is buf and torch.equal(buf, lg.to_dense(dtype))
    with pytest.raises(ValueError, match=r"LayerGrads.to_dense\(out=...\): expected a Tensor "
                                         r"of shape \[1, "):
        lg.to_dense(out=torch.empty(1, G.shape[0], G.shape[1] + 1, dtype=G.dtype))
    return lg


@given(st.integers(0, 2**16), st.lists(st.integers(1, 6), min_size=2, max_size=4),
       st.lists(st.booleans(), min_size=1, max_size=3), st.integers(1, 9))
def test_mlp_factors_equal_per_sample_grad(device, seed, widths, bias, n):
    """Linear layers: dW_i = g_i a_i^T, db_i = g_i; <grad_i, grad_j> = (ã_i.ã_j)(g_i.g_j)."""
    widths = [*widths, 3]
    fm = functional_model(_mlp(seed, widths, bias, device), F.cross_entropy)
    lg = _check(fm, _data(seed, n, widths[0], 3, device))
    assert lg.dense.shape[-1] == 0 and len(lg.factors) == len(widths) - 1


@given(st.integers(0, 2**16), st.integers(1, 9), st.sampled_from([1, 40, 2**18]))
def test_narrow_to_dense_by_blocks_of_rows(device, monkeypatch, seed, n, entries):
    """A bfloat16 to_dense formed a few rows at a time (bounding torch's float64 temporary)
    is the full-precision result rounded once, whatever the block."""
    monkeypatch.setattr(importlib.import_module("dattri_fn.transforms.factored_grads"), "_NARROW_ENTRIES",
                        entries)
    fm = functional_model(_mlp(seed, [4, 5, 3], [True], device), F.cross_entropy)
    lg = per_sample_layer_grads(fm, fm.params, _data(seed, n, 4, 3, device))
    assert torch.equal(lg.to_dense(torch.bfloat16), lg.to_dense().to(torch.bfloat16))


@given(st.integers(0, 2**16), st.sampled_from(["0.bias", "2", ["0.weight", "2.bias"]]))
def test_partial_selection(device, seed, selection):
    """Only the selected weights/biases enter the factors (ã = [a, 1], [a] or [1])."""
    fm = functional_model(_mlp(seed, [4, 5, 3], [True], device), F.cross_entropy, params=selection)
    _check(fm, _data(seed, 6, 4, 3, device))


@given(st.integers(0, 2**16))
def test_non_linear_parameters_stay_dense(device, seed):
    """Conv2d (materialised) and LayerNorm (captured elementwise rows) parameters: dense
    per-example gradients next to the factors, equal to vmap(grad)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3))
    fm = functional_model(net.double().to(device).eval(), F.cross_entropy)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (5,), generator=g).to(device)
    lg = _check(fm, (x, y))
    assert list(lg.factors) == ["3"] and lg.dense.shape[-1] == 2 * 9 + 2 + 16


@given(st.integers(0, 2**16), st.sampled_from([(2, 32), (3, 4), (4, 2)]))
def test_sequence_layers(device, seed, shape):
    """[B, T, d] inputs: sum_{t,s} (ã_t.ã'_s)(g_t.g'_s), factored when T^2(in+out) < in*out."""
    T, d = shape
    torch.manual_seed(seed)
    fm = functional_model(_Seq(d, 3).double().to(device).eval(), F.cross_entropy)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, T, d, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (6,), generator=g).to(device)
    lg = _check(fm, (x, y))
    factored = [n for n, (a, _) in lg.factors.items() if a.ndim == 4]
    assert (factored == ["inner"]) == (T * T * (d + 1 + d) < (d + 1) * d)


@given(st.integers(0, 2**16), st.booleans())
def test_bare_linear(device, seed, bias):
    """A bare nn.Linear (logistic regression) is factored too."""
    torch.manual_seed(seed)
    fm = functional_model(nn.Linear(4, 3, bias=bias).double().to(device).eval(), F.cross_entropy)
    lg = _check(fm, _data(seed, 6, 4, 3, device))
    assert len(lg.factors) == 1 and lg.dense.shape[-1] == 0


def test_shared_layer_and_no_layer(device):
    """A Linear called twice is captured (its calls summed: two positions, materialised as
    2^2 (4 + 3) >= 4 * 3); a model without a known layer has no plan (generic path)."""
    torch.manual_seed(0)
    fm = functional_model(_Shared().double().to(device).eval(), F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lg = _check(fm, _data(0, 5, 3, 2, device))
    assert list(lg.factors) == ["b"] and lg.dense.shape[-1] == 12
    bare = functional_model(_NoLayer().double().to(device).eval(), F.cross_entropy)
    # its one candidate, w (x @ w, never read by rows), is dropped silently: vmap(grad) rows
    assert layer_plan(bare).bare == ("w",) and not layer_plan(bare).layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lg = per_sample_layer_grads(bare, bare.params, _data(0, 4, 3, 2, device))
    torch.testing.assert_close(lg.to_dense()[0], per_sample_grad(bare.loss, bare.params,
                                                                 _data(0, 4, 3, 2, device)),
                               rtol=0, atol=ATOL)
    bare = functional_model(_NoLayer3().double().to(device).eval(), F.cross_entropy)
    assert layer_plan(bare) is None
    with pytest.raises(ValueError, match=r"per_sample_layer_grads\(model=...\): expected a model "
                                         r"with an attributed nn.Linear"):
        per_sample_layer_grads(bare, bare.params, _data(0, 4, 3, 2, device))


@given(st.integers(0, 2**16), st.integers(2, 3))
def test_stacked_checkpoints(device, seed, C):
    """C checkpoints through vmap(torch.func.grad): row c equals per_sample_grad at theta_c."""
    fm = functional_model(_mlp(seed, [4, 5, 3], [True, False], device), F.cross_entropy)
    batch = _data(seed, 7, 4, 3, device)
    g = torch.Generator().manual_seed(seed)
    ckpts = [{k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype).to(device)
              for k, v in fm.params.items()} for _ in range(C)]
    stacked = {k: torch.stack([c[k] for c in ckpts]) for k in fm.params}
    dense = layer_grads_stacked(layer_plan(fm), stacked, batch).to_dense()
    for c in range(C):
        torch.testing.assert_close(dense[c], per_sample_grad(fm.loss, ckpts[c], batch),
                                   rtol=0, atol=ATOL)


def test_tensor_and_dict_examples(device):
    """Examples without target (loss_fn(output)) and dict examples (keyword inputs)."""
    torch.manual_seed(0)

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, scale):
            return self.lin(x) * scale

    x, _ = _data(0, 5, 3, 2, device)
    fm = functional_model(_mlp(0, [3, 4, 2], [True], device), lambda out: (out ** 2).sum())
    _check(fm, x)
    kw = functional_model(Kw().double().to(device).eval(), F.cross_entropy)
    batch = {"x": x, "scale": torch.rand(5, 1, dtype=torch.float64).to(device),
             "labels": torch.tensor([0, 1, 1, 0, 1]).to(device)}
    _check(kw, batch)


@given(st.integers(0, 2**16), st.sampled_from(["grad_dot", "grad_cos", "tracin"]),
       st.integers(1, 3))
def test_methods_with_a_model_equal_the_generic_path(device, seed, name, C):
    """grad_dot/grad_cos/tracin(model) == the same method on model.loss: scores, self, top-k."""
    fm = functional_model(_mlp(seed, [4, 6, 3], [True], device), F.cross_entropy)
    train = [_data(seed, 5, 4, 3, device), _data(seed + 1, 4, 4, 3, device)]
    test = _data(seed + 2, 3, 4, 3, device)
    g = torch.Generator().manual_seed(seed)
    params = [{k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype).to(device)
               for k, v in fm.params.items()} for _ in range(C)]
    build = {"grad_dot": grad_dot, "grad_cos": grad_cos,
             "tracin": lambda f, **kw: tracin(f, lrs=[0.5 + c for c in range(C)], **kw)}[name]
    fast, slow = build(fm, chunk_size=3), build(fm.loss)
    p = params if name == "tracin" else params[0]
    S = fast.score(p, (), train, test)
    torch.testing.assert_close(S, slow.score(p, (), train, test), rtol=0, atol=ATOL)
    torch.testing.assert_close(fast.self_score(p, (), train), slow.self_score(p, (), train),
                               rtol=0, atol=ATOL)
    top = fast.score(p, (), train, test, top_k=2)
    torch.testing.assert_close(top.values, torch.topk(S, 2, dim=0).values, rtol=0, atol=ATOL)
    proj = dict(proj_dim=8, seed=seed)
    torch.testing.assert_close(build(fm, **proj).score(p, (), train, test),
                               build(fm.loss, **proj).score(p, (), train, test),
                               rtol=0, atol=ATOL)


def test_errors(device):
    """Bad model, params keys or loss give errors naming the argument."""
    fm = functional_model(_mlp(0, [3, 4, 2], [True], device), F.cross_entropy)
    batch = _data(0, 4, 3, 2, device)
    with pytest.raises(TypeError, match=r"layer_plan\(model=...\): expected a FunctionalModel"):
        layer_plan(fm.loss)
    with pytest.raises(ValueError, match=r"per_sample_layer_grads\(params=...\): expected the keys"):
        per_sample_layer_grads(fm, {"0.weight": fm.params["0.weight"]}, batch)
    with pytest.raises(ValueError, match=r"grad_dot\(params=...\): expected the keys of the model"):
        m = grad_dot(fm)
        m.score({"0.weight": fm.params["0.weight"]}, (), batch, batch)
    with pytest.raises(TypeError, match=r"grad_dot\(loss=...\): expected a per-example function"):
        grad_dot(3)
    with pytest.raises(ValueError, match=r"grad_dot\(loss=...\): expected a FunctionalModel built"):
        grad_dot(functional_model(fm.module))
    head_only = functional_model(fm.module, F.cross_entropy, params="2")
    with pytest.raises(ValueError, match=r"grad_dot\(target=...\): expected a FunctionalModel over"):
        grad_dot(fm, target=head_only)


class _Tied(nn.Module):
    """The encoder's weight is reused by F.linear: the layer must not be factored."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.T)


class _SharedWeight(nn.Module):
    """Two Linear modules holding one weight tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


class _Masked(nn.Module):
    """An optional argument: torch.fx traces the ``is None`` branch the wrong way."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x, mask=None):
        h = self.l(x)
        if mask is not None:
            h = h * mask
        return h


class _SeqFirst(nn.Module):
    """A Linear applied to a [T, B, d] tensor: its dim 0 is not the example."""

    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.l(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("build, shape, factored, warning", [
    (_Tied, (5, 4), [], r"densely \(vmap\(grad\)\) instead of from captured factors: enc: .* Tensor\.T\b"),
    (_SharedWeight, (5, 4), ["b"], r"a: shares its weight with layer c"),
    (_Masked, (5, 4), ["l"], None),
    (_SeqFirst, (3, 3, 4), [], "do not match vmap"),
    (_SeqFirst, (5, 2, 4), ["h"], r"l: an input \[2, 3, 4\] that is not batch-first")])
def test_unsafe_layers_fall_back_to_exact_gradients(device, build, shape, factored, warning):
    """A weight read by another op, shared by two layers or fed a non-batch-first input is
    computed densely after a warning naming the layer; a factored path that disagrees with
    vmap(grad) on the first examples (a [T, B, d] input with T = B) warns and goes dense."""
    torch.manual_seed(0)
    fm = functional_model(build().double().to(device).eval(),
                          F.mse_loss if build is _Tied else F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device)
    y = (torch.randn(shape[0], 4, generator=g, dtype=torch.float64).to(device) if build is _Tied
         else torch.randint(0, 3, (shape[0],), generator=g).to(device))
    if warning is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lg = _check(fm, (x, y))
    else:
        with pytest.warns(RuntimeWarning, match=warning):
            lg = _check(fm, (x, y))
    assert list(lg.factors) == factored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the same fallback warning, again
        fast = grad_dot(fm).score(fm.params, (), (x, y), (x, y))
    torch.testing.assert_close(fast, grad_dot(fm.loss).score(fm.params, (), (x, y), (x, y)),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("hooked, kind", [(0, "forward"), (2, "pre")])
def test_hooked_layers_are_factored_exactly(device, hooked, kind):
    """A forward (pre-)hook changes the layer's output or input; the capture sees what F.linear
    itself receives and returns, so the hooked layer is factored and still exact."""
    net = _mlp(0, [4, 5, 3], [True], device)
    if kind == "forward":
        net[hooked].register_forward_hook(lambda mod, inp, out: out * 2)
    else:
        net[hooked].register_forward_pre_hook(lambda mod, inp: (inp[0] * 3,))
    lg = _check(functional_model(net, F.cross_entropy), _data(0, 5, 4, 3, device))
    assert list(lg.factors) == ["0", "2"]


@given(st.integers(0, 2**16), st.sampled_from([(2, 8), (8, 2), (2, 1), (1, 3)]))
def test_sequence_lengths_may_differ_between_batches(device, seed, lengths):
    """Train and test (and train batches) of different T: layouts fixed by the first batch."""
    torch.manual_seed(seed)
    fm = functional_model(_Seq(16, 3).double().to(device).eval(), F.cross_entropy)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(4, T, 16, generator=g, dtype=torch.float64).to(device),
             torch.randint(0, 3, (4,), generator=g).to(device)) for T in lengths]
    S = grad_dot(fm).score(fm.params, (), data, data[1])
    ref = grad_dot(fm.loss).score(fm.params, (), data, data[1])
    torch.testing.assert_close(S, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(grad_dot(fm, chunk_size=2).self_score(fm.params, (), data),
                               grad_dot(fm.loss).self_score(fm.params, (), data),
                               rtol=0, atol=ATOL)


class _Mixing(nn.Module):
    """Subtracts the batch mean: example i's output depends on the others."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True) + 0.5 * h)


def test_mixing_examples_is_caught_even_after_a_one_example_batch(device):
    """A first batch of one example cannot reveal mixing: it is computed exactly and the check
    waits for a batch of >= 2, which then falls back (warning) to vmap(grad)."""
    torch.manual_seed(0)
    fm = functional_model(_Mixing().double().to(device).eval(), F.cross_entropy)
    x, y = _data(0, 8, 4, 3, device)
    train = [(x[:1], y[:1]), (x[1:], y[1:])]
    with pytest.warns(RuntimeWarning, match="do not match vmap"):
        S = grad_dot(fm).score(fm.params, (), train, (x[:3], y[:3]))
    torch.testing.assert_close(S, grad_dot(fm.loss).score(fm.params, (), train, (x[:3], y[:3])),
                               rtol=0, atol=ATOL)


@given(st.integers(0, 2**16), st.integers(1, 40), st.integers(1, 7))
def test_projected_columns_equal_projected_dense(seed, chunk, proj_dim):
    """proj.apply_columns(lg.columns) == proj(lg.to_dense()) for any projector step size."""
    from dattri_fn.transforms.project import make_projector

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
    lg = per_sample_layer_grads(fm, fm.params, batch)
    G = lg.to_dense()[0]
    proj = make_projector(G.shape[1], proj_dim=proj_dim, seed=seed, chunk_size=chunk,
                          dtype=DT)
    got = proj.apply_columns(lambda a, b: lg.columns(a, b)[0], 6, dtype=DT, device="cpu")
    torch.testing.assert_close(got, G @ proj.matrix(), rtol=1e-12, atol=1e-12)


def test_to_dense_differentiable_and_under_vmap():
    """to_dense keeps autograd (d sum/d a_i = sum_o g_o) and works under vmap and forward AD;
    columns/select name a bad range."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fm = functional_model(net, F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 2, (5,), generator=g))
    lg = per_sample_layer_grads(fm, fm.params, batch)
    ref = lg.to_dense()
    factors = {n: (a.clone().requires_grad_(True), g_) for n, (a, g_) in lg.factors.items()}
    lg2 = lg._replace(factors=factors)
    dense = lg2.to_dense()
    torch.testing.assert_close(dense, ref, rtol=0, atol=0)
    with torch.no_grad():  # out= on the autograd path: the values copied into out
        buf = torch.empty_like(ref, dtype=torch.bfloat16)
        assert lg2.to_dense(out=buf) is buf and torch.equal(buf, ref.to(torch.bfloat16))
    dense.sum().backward()
    for a, g_ in factors.values():  # d/da_i sum_oi g_o a_i = sum_o g_o; the ones column: 0
        want = g_.sum(-1, keepdim=True).expand_as(a[..., :-1])
        torch.testing.assert_close(a.grad[..., :-1], want, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.grad[..., -1], torch.zeros_like(a.grad[..., -1]))
    scaled = torch.func.vmap(lambda s: lg._replace(dense=lg.dense * s).to_dense())(
        torch.ones(2, dtype=DT))
    torch.testing.assert_close(scaled[0], ref, rtol=0, atol=0)
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        name, (a, g_) = next(iter(lg.factors.items()))
        dual = forward_ad.make_dual(a, torch.ones_like(a))
        primal = lg._replace(factors={**lg.factors, name: (dual, g_)}).to_dense()
        torch.testing.assert_close(forward_ad.unpack_dual(primal).primal, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"LayerGrads.columns\(start=..., stop=...\): "
                                         r"expected ints with 0 <= start < stop <= P"):
        lg.columns(3, 3)
    with pytest.raises(ValueError, match=r"LayerGrads.select\(c=...\): expected an int"):
        lg.select(1)


@pytest.mark.parametrize("build", [grad_dot, grad_cos, tracin])
def test_one_row_test_set_and_short_last_batch(device, build):
    """A test set of one example meets factored training blocks, with top_k too; a short last
    batch: the same scores as the plain loss."""
    fm = functional_model(_mlp(0, [4, 5, 3], [True], device), F.cross_entropy)
    x, y = _data(0, 9, 4, 3, device)
    train = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    one = (x[:1], y[:1])
    kw = dict(lrs=[0.5]) if build is tracin else {}
    params = [fm.params] if build is tracin else fm.params
    fast, ref = build(fm, **kw), build(fm.loss, **kw)
    S = fast.score(params, (), train, one)
    torch.testing.assert_close(S, ref.score(params, (), train, one), rtol=1e-10, atol=1e-12)
    top = fast.score(params, (), train, one, top_k=2)
    assert torch.equal(top.indices, ref.score(params, (), train, one, top_k=2).indices)


def test_old_import_path_of_layer_grads_value():
    """LayerGrads moved to factored_grads; the old path is the same class (no copy)."""
    from dattri_fn.transforms import factored_grads, layer_grads

    assert layer_grads.LayerGrads is factored_grads.LayerGrads


def test_old_import_paths_of_the_split_paths():
    """The path helpers moved to layer_grads_paths are the same objects under layer_grads."""
    from dattri_fn.transforms import layer_grads, layer_grads_paths

    for name in ("_assemble", "_dense", "_factored", "_loop_grads", "_raw_batched", "_shapes",
                 "_vmap_failed"):
        assert getattr(layer_grads, name) is getattr(layer_grads_paths, name)
